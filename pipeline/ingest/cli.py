"""`rectiflow ingest RUN_DIR --webdataset|--folder|--hf SOURCE`: local data -> download shards.

    rectiflow ingest runs/r1 --webdataset 'shards/{00000..00099}.tar' [--ingest.caption_field=caption]
    rectiflow ingest runs/r1 --folder photos/ [--ingest.class_folders=true]
    rectiflow ingest runs/r1 --hf data/saved [--ingest.split=train --ingest.image_column=image]

See docs/inputs.md. The shards land in RUN_DIR/download with the download stage's contract.
"""

from __future__ import annotations

import hashlib
import json
import os

from pipeline.core.command import InputError, StageCommand
from pipeline.download.cli import summarize
from pipeline.download.stage import INPUTS_DIR
from pipeline.ingest.hf import hf_records
from pipeline.ingest.sources import expand_specs, folder_records, webdataset_records
from pipeline.ingest.stage import STAGE, IngestConfig, run_ingest


def flags(parser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--webdataset", nargs="+", metavar="TARS",
                        help="WebDataset / img2dataset tars: files, globs, {00000..00099} braces")
    source.add_argument("--folder", metavar="DIR", help="images with .txt/.caption/.json sidecars")
    source.add_argument("--hf", metavar="PATH", help="a save_to_disk folder, Parquet or imagefolder")


def check(args) -> None:
    if (args.run_dir / STAGE / INPUTS_DIR).exists():
        raise InputError(f"{args.run_dir} already holds a URL-list download "
                         f"({args.run_dir / STAGE / INPUTS_DIR}); ingest into a new run directory")
    if args.webdataset:
        args.webdataset = expand_specs(args.webdataset)


def run(args, sections) -> int:
    config: IngestConfig = sections["ingest"]
    if args.webdataset:
        records = webdataset_records(args.webdataset, config.caption_field, config.max_bytes)
        source = "webdataset:" + _digest(args.webdataset)
    elif args.folder:
        records = folder_records(args.folder, config.caption_field, config.class_folders,
                                 config.class_template, config.max_bytes)
        source = f"folder:{os.path.abspath(args.folder)}"
    else:
        records = hf_records(args.hf, config.split, config.image_column, config.caption_column,
                             config.id_column)
        source = f"hf:{os.path.abspath(args.hf) if os.path.exists(args.hf) else args.hf}"
    manifests, ran = run_ingest(config, records, source, args.run_dir)
    if not manifests:
        raise InputError(f"{source}: the source holds no sample")
    print(summarize(manifests).replace("download:", "ingest:", 1)
          + f"\n  ({ran} shard(s) written, {len(manifests) - ran} already done)")
    return 0


def _digest(listing) -> str:
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


COMMAND = StageCommand(
    name="ingest",
    description="Ingest local WebDataset tars, an image folder or a Hugging Face dataset into "
    "download-stage shards (RUN_DIR/download), resumable; --ingest.KEY=VALUE overrides.",
    schema={"ingest": IngestConfig},
    flags=flags,
    check=check,
    run_dir_exists=False,
    output_dir=lambda args: args.run_dir / STAGE,
    run=run,
)
main = COMMAND.main
