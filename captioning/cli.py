"""`rectiflow caption RUN_DIR`: recaption the kept samples of a run with a VLM."""

from __future__ import annotations

import json

from captioning.config import CaptionConfig
from captioning.stage import run_caption
from pipeline.core.command import StageCommand
from pipeline.core.manifest import stage_stats


def run(args, sections) -> None:
    run_caption(sections["caption"], args.run_dir, verify=args.verify)
    print(json.dumps(stage_stats(args.run_dir / "caption"), indent=1))


COMMAND = StageCommand(
    name="caption",
    description="Recaption the kept samples of a run with a VLM into RUN_DIR/caption/, e.g. "
    "--caption.model=DIR --caption.runner.backend=ray --caption.runner.num_gpus=0.5.",
    schema={"caption": CaptionConfig},
    needs="download",
    verifies=True,
    run=run,
)
main = COMMAND.main
