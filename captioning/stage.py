"""The caption stage: a VLM caption for every kept sample, cleaned, with its provenance.

Rows in are the samples of download shard k that shard k's decisions kept (download, select,
dedup when they ran: pipeline/core/lineage.py); each row keeps the
original caption beside the synthetic one, so the trainer can mix them (SD3: 50/50). A row
whose image cannot be decoded or whose caption is rejected (`empty_caption`, `refusal`,
`repetitive_caption`) keeps its raw output and gets `caption_reason`; the encode stage skips
such rows unless told to fall back to the original caption.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pyarrow as pa

from captioning.backends import Captioner, TransformersCaptioner
from captioning.cleaning import TokenCounter, approximate_tokens, clean_caption
from captioning.config import CaptionConfig
from captioning.templates import resolve_prompt
from pipeline.core.config import ConfigError, config_hash
from pipeline.core.decode import ImageRejected, decode_for_model
from pipeline.core.lineage import decode_ahead, iter_kept_rows, plan_lineage
from pipeline.core.manifest import ShardManifest
from pipeline.core.runners import RunnerConfig, run_stage
from pipeline.core.stage import ShardSpec, Stage
from pipeline.score.stage import TarIndex

CAPTION_SCHEMA = pa.schema([
    ("uid", pa.string()),
    ("caption_original", pa.string()),
    ("caption_synthetic", pa.string()),  # cleaned; null when rejected
    ("caption_raw", pa.string()),  # the model's text before cleaning, for audits
    ("caption_model_id", pa.string()),
    ("caption_model_revision", pa.string()),
    ("caption_prompt_id", pa.string()),
    ("caption_prompt_hash", pa.string()),
    ("caption_generation", pa.string()),  # json of the generate parameters in effect
    ("caption_reason", pa.string()),
])


class CaptionStage(Stage):
    name = "caption"

    def __init__(self, config: CaptionConfig):
        super().__init__(config)
        self.batch_size = config.batch_size
        self.prompt = resolve_prompt(config.prompt_id, config.prompt_text)
        self.captioner: Captioner | None = None
        self.count_tokens: TokenCounter = approximate_tokens
        self._decoded: deque[list] = deque()
        self._pool: ThreadPoolExecutor | None = None

    def setup(self) -> None:
        captioner = TransformersCaptioner(self.config)
        self.count_tokens = captioner.token_counter() or approximate_tokens
        self.captioner = captioner

    def models(self) -> dict[str, str]:
        revision = self.captioner.model_revision if self.captioner else self.config.revision
        return {"captioner": f"{self.config.model}@{revision}",
                "prompt": f"{self.prompt.id}@{self.prompt.hash}"}

    def fingerprint(self) -> str:
        # Where it runs does not change captions; the model, prompt and params do (and the
        # shard's inputs, whose recorded checksums its manifest compares).
        what = replace(self.config, runner=RunnerConfig(), device="auto", decode_threads=1)
        return f"{config_hash(what)}-{self.prompt.hash}"

    def output_schema(self) -> pa.Schema:
        return CAPTION_SCHEMA

    def read_batches(self, shard: ShardSpec) -> Iterator[pa.Table]:
        """Kept rows of the download shard with their original image bytes."""
        index = TarIndex(shard.inputs["tar"])
        batches = (batch.append_column("image", pa.array(index.read_many(batch["uid"].to_pylist()),
                                                         pa.binary()))
                   for batch in iter_kept_rows(shard, self.batch_size, ["uid", "caption"]))
        self._decoded.clear()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.config.decode_threads, thread_name_prefix="decode")
        for batch, decoded in decode_ahead(batches, self._decode, self._pool):
            self._decoded.append(decoded)
            yield batch

    def process(self, batch: pa.Table) -> pa.Table:
        decoded = self._decoded.popleft()  # decoded in the pool while the previous batch ran
        ok = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
        raw: list[str | None] = [None] * batch.num_rows
        for i, text in zip(ok, self.captioner.caption([decoded[i] for i in ok]), strict=True):
            raw[i] = text
        synthetic, reasons = [], []
        for i, d in enumerate(decoded):
            cleaned = clean_caption(raw[i], self.config.cleaning, self.count_tokens)
            synthetic.append(cleaned.text)
            reasons.append(d if isinstance(d, str) else cleaned.reason)
        return self._rows(batch, raw, synthetic, reasons)

    def _decode(self, data: bytes | None):
        if data is None:
            return "missing_image"
        try:
            return decode_for_model(data, self.config.image_size, self.config.max_pixels).image
        except ImageRejected as e:
            return e.reason

    def _rows(self, batch: pa.Table, raw, synthetic, reasons) -> pa.Table:
        n = batch.num_rows
        provenance = {
            "caption_model_id": [self.config.model] * n,
            "caption_model_revision": [self.captioner.model_revision] * n,
            "caption_prompt_id": [self.prompt.id] * n,
            "caption_prompt_hash": [self.prompt.hash] * n,
            "caption_generation": [self.config.generation.to_json()] * n,
        }
        columns = {"uid": batch["uid"], "caption_original": batch["caption"],
                   "caption_synthetic": synthetic, "caption_raw": raw,
                   **provenance, "caption_reason": reasons}
        return pa.table(columns, schema=CAPTION_SCHEMA)


CAPTION_READS = ("select", "dedup")  # besides download k: the decisions it applies


def run_caption(
    config: CaptionConfig, run_dir: str | Path, runner: RunnerConfig | None = None,
    verify: bool = False,
) -> list[ShardManifest]:
    """Caption every ready download shard of `run_dir` into RUN_DIR/caption/ (resumable).

    Shards whose upstream decisions are missing are not run: NotReady names them, after the
    ready ones are done.
    """
    if not config.model:
        raise ConfigError("caption.model is empty: give a captioner id or local path")
    run_dir = Path(run_dir)
    plan = plan_lineage(run_dir, CAPTION_READS)
    factory = functools.partial(CaptionStage, config)
    manifests = run_stage(factory, plan.shards, run_dir / "caption", runner or config.runner,
                          verify)
    if (error := plan.not_ready("caption")) is not None:
        raise error
    return manifests
