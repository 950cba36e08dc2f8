"""`rectiflow encode RUN_DIR`: kept samples -> SD3 training shards in RUN_DIR/encode."""

from __future__ import annotations

import json

from pipeline.core.command import StageCommand
from pipeline.encode.stage import EncodeConfig, run_encode


def run(args, sections) -> None:
    manifest = run_encode(sections["encode"], args.run_dir, verify=args.verify)
    print(json.dumps({"counts": manifest.counts, "shards": len(manifest.shards)}, indent=1))


COMMAND = StageCommand(
    name="encode",
    description="Precompute SD3 training shards (VAE latents, CLIP-L/G and T5 embeddings per "
    "caption variant) for the kept samples of a run, into RUN_DIR/encode/, e.g. "
    "--encode.model=SD3_DIR --encode.bucket.resolution=1024 --encode.runner.backend=ray.",
    schema={"encode": EncodeConfig},
    needs="download",
    verifies=True,
    run=run,
)
main = COMMAND.main
