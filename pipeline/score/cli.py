"""`rectiflow score RUN_DIR`: score every downloaded image of a run (RUN_DIR/download -> score)."""

from __future__ import annotations

from pipeline.core.command import StageCommand
from pipeline.core.manifest import stage_stats
from pipeline.core.runners import run_stage
from pipeline.score.stage import ClipScorer, ScoreConfig, score_shards


def run(args, sections) -> None:
    config: ScoreConfig = sections["score"]
    score_dir = args.run_dir / "score"
    run_stage(lambda: ClipScorer(config), score_shards(args.run_dir / "download"), score_dir,
              config.runner, verify=args.verify)
    stats = stage_stats(score_dir)
    print(f"scored {stats['rows_out']} of {stats['rows_in']} images in {stats['shards']} shards; "
          f"dropped: {stats['reasons'] or 'none'}; {stats['rows_per_second']} rows/s")


COMMAND = StageCommand(
    name="score",
    description="Compute CLIP embeddings and scores for RUN_DIR/download into RUN_DIR/score, "
    "e.g. --score.model=ViT-L-14 --score.pretrained=openai --score.runner.backend=ray.",
    schema={"score": ScoreConfig},
    needs="download",
    verifies=True,
    run=run,
)
main = COMMAND.main
