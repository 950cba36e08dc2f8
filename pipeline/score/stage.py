"""The score stage: score every downloaded image once; deciding what to keep comes later.

One pass per shard decodes each image once (Pillow draft mode, to about the model's input
size) and computes with open_clip: L2-normalised image and caption embeddings (float16, for
dedup), the CLIP score (their cosine), an aesthetic score and an NSFW probability from heads
on the normalised image embedding, the original width, height and aspect ratio, and the
caption length. Rows are keyed by uid (`score_*` columns, docs/formats.md).

Which rows: only successful downloads are scored; failed downloads already carry their
reason in `download/` and are absent here, so the score stage's rows in = download's rows
out. An image that cannot be decoded keeps its row with `score_reason` (a reason of
pipeline/core/decode.py: `decode_error`, `not_an_image`, `empty_body`, `too_many_pixels`; or
`missing_image` when the tar has no original for the uid) and null scores.

Without head weights the aesthetic and NSFW columns are null (the manifest says no head was
given) rather than a made-up number. Decoding, the model's preprocessing and tokenizing run
in a thread pool one batch ahead of the model, so the forward pass, not Pillow, sets the pace.
"""

from __future__ import annotations

import tarfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline.core.config import config_hash
from pipeline.core.decode import ImageRejected, decode_for_model, original_image_key
from pipeline.core.lineage import download_shards
from pipeline.core.runners import RunnerConfig
from pipeline.core.stage import ShardSpec, Stage
from pipeline.score.open_clip_models import (
    LoadedClip,
    file_id,
    is_local_clip,
    load_head,
    load_scoring_clip,
)

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ScoreConfig:
    model: str = "ViT-L-14"  # open_clip name, "hf-hub:org/repo", or a local folder
    pretrained: str | None = "openai"  # open_clip tag or weights file; ignored for local-dir
    aesthetic_weights: str | None = None  # improved-aesthetic-predictor state dict; None: null
    nsfw_weights: str | None = None  # head state dict giving an NSFW logit; None: null
    device: str = "cpu"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    batch_size: int = 64
    decode_threads: int = 4
    max_pixels: int = 89_478_485  # header check; Pillow's own MAX_IMAGE_PIXELS applies too
    runner: RunnerConfig = field(default_factory=RunnerConfig)

    def __post_init__(self):
        if self.batch_size < 1 or self.decode_threads < 1:
            raise ValueError("batch_size and decode_threads must be at least 1")


def score_schema(embed_dim: int) -> pa.Schema:
    embedding = pa.list_(pa.float16(), embed_dim)
    return pa.schema(
        [
            ("uid", pa.string()),
            ("score_reason", pa.string()),
            ("score_width", pa.int32()),
            ("score_height", pa.int32()),
            ("score_aspect", pa.float32()),  # width / height
            ("score_caption_length", pa.int32()),  # characters
            ("score_caption_words", pa.int32()),
            ("score_clip", pa.float32()),  # cosine of image and caption embeddings
            ("score_aesthetic", pa.float32()),
            ("score_nsfw", pa.float32()),  # probability
            ("score_image_embedding", embedding),  # L2-normalised
            ("score_text_embedding", embedding),
        ]
    )


class ClipScorer(Stage):
    name = "score"

    def __init__(self, config: ScoreConfig):
        super().__init__(config)
        self.batch_size = config.batch_size
        self.clip: LoadedClip | None = None
        self.heads: dict[str, torch.nn.Module] = {}
        self._decoded: deque[_PendingBatch] = deque()  # prepared one batch ahead
        self._pool: ThreadPoolExecutor | None = None

    def setup(self) -> None:
        cfg = self.config
        self.clip = load_scoring_clip(cfg.model, cfg.pretrained, cfg.device)
        for role, path in (("aesthetic", cfg.aesthetic_weights), ("nsfw", cfg.nsfw_weights)):
            if path:
                self.heads[role] = load_head(path, self.clip.embed_dim).to(cfg.device)
        self._pool = ThreadPoolExecutor(cfg.decode_threads, thread_name_prefix="score-decode")

    def models(self) -> dict[str, str]:
        cfg = self.config
        pretrained = None if is_local_clip(cfg.model) else cfg.pretrained
        return {
            "clip": f"{cfg.model}@{pretrained}" if pretrained else cfg.model,
            "aesthetic": file_id(cfg.aesthetic_weights) or "none (score_aesthetic is null)",
            "nsfw": file_id(cfg.nsfw_weights) or "none (score_nsfw is null)",
        }

    def fingerprint(self) -> str:
        # Where and how fast it runs does not change the scores; the weights' bytes do.
        what = replace(self.config, runner=RunnerConfig(), decode_threads=1, batch_size=1)
        return config_hash(what) + "-" + config_hash(_Models(self.models()))

    def output_schema(self) -> pa.Schema:
        return score_schema(self.clip.embed_dim)

    def read_batches(self, shard: ShardSpec) -> Iterator[pa.Table]:
        """Successful downloads with their original bytes, decoding one batch ahead."""
        index = TarIndex(shard.inputs["tar"])
        parquet = pq.ParquetFile(shard.inputs["table"])
        columns = ["uid", "caption", "download_status"]
        self._decoded.clear()
        pending: pa.Table | None = None
        for record_batch in parquet.iter_batches(batch_size=self.batch_size, columns=columns):
            batch = pa.Table.from_batches([record_batch])
            batch = batch.filter(pc.equal(batch["download_status"], "success"))
            if batch.num_rows == 0:
                continue
            images = index.read_many(batch["uid"].to_pylist())
            captions = [c or "" for c in batch["caption"].to_pylist()]
            self._decoded.append(self._prepare_async(images, captions))
            if pending is not None:
                yield pending
            pending = batch
        if pending is not None:
            yield pending

    def _prepare_async(self, images: list[bytes | None], captions: list[str]) -> _PendingBatch:
        """Decode + preprocess each image and tokenize the captions in the thread pool."""
        size, cap, preprocess = self.clip.image_size, self.config.max_pixels, self.clip.preprocess
        return _PendingBatch(
            [self._pool.submit(_prepare, data, size, cap, preprocess) for data in images],
            self._pool.submit(self.clip.tokenizer, captions),
            captions,
        )

    def process(self, batch: pa.Table) -> pa.Table:
        pending = self._decoded.popleft()
        prepared = [future.result() for future in pending.images]
        ok = [i for i, p in enumerate(prepared) if isinstance(p, _Prepared)]
        image_emb, text_emb = self._embed([prepared[i].pixels for i in ok],
                                          pending.tokens.result()[ok])
        rows, captions = len(prepared), pending.captions
        columns = {
            "uid": batch["uid"],
            "score_reason": [None if isinstance(p, _Prepared) else p for p in prepared],
            "score_width": _scatter([prepared[i].width for i in ok], ok, rows),
            "score_height": _scatter([prepared[i].height for i in ok], ok, rows),
            "score_aspect": _scatter([prepared[i].width / prepared[i].height for i in ok], ok, rows),
            "score_caption_length": [len(c) for c in captions],
            "score_caption_words": [len(c.split()) for c in captions],
            "score_clip": _scatter((image_emb * text_emb).sum(-1).tolist(), ok, rows),
        }
        for role in ("aesthetic", "nsfw"):
            columns[f"score_{role}"] = _scatter(self._head(role, image_emb), ok, rows)
        schema = self.output_schema()
        columns["score_image_embedding"] = _embedding_array(image_emb, ok, rows, schema)
        columns["score_text_embedding"] = _embedding_array(text_emb, ok, rows, schema)
        return pa.table(columns, schema=schema)

    @torch.inference_mode()
    def _embed(self, pixels: list[torch.Tensor], tokens: torch.Tensor):
        """L2-normalised image and caption embeddings, float32 on the CPU: (N, D) each."""
        clip, device = self.clip, self.config.device
        if not pixels:
            empty = torch.zeros(0, clip.embed_dim)
            return empty, empty
        images = torch.stack(pixels).to(device, non_blocking=True)  # (N, 3, S, S)
        tokens = tokens.to(device, non_blocking=True)  # (N, L)
        dtype = _AUTOCAST.get(self.config.precision)
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            image = clip.model.encode_image(images)  # (N, D)
            text = clip.model.encode_text(tokens)  # (N, D)
        image = torch.nn.functional.normalize(image.float(), dim=-1)
        text = torch.nn.functional.normalize(text.float(), dim=-1)
        return image.cpu(), text.cpu()

    @torch.inference_mode()
    def _head(self, role: str, image_emb: torch.Tensor) -> list[float] | None:
        head = self.heads.get(role)
        if head is None or image_emb.shape[0] == 0:
            return None
        out = head(image_emb.to(self.config.device)).float().cpu()  # (N,)
        return (torch.sigmoid(out) if role == "nsfw" else out).tolist()


@dataclass
class _Models:
    ids: dict[str, str]


@dataclass
class _Prepared:
    width: int  # of the original, after EXIF orientation
    height: int
    pixels: torch.Tensor  # (3, S, S): the model's own eval transform of the decoded image


@dataclass
class _PendingBatch:
    images: list[Future]  # each -> _Prepared, or the drop reason
    tokens: Future  # -> (B, L) token ids
    captions: list[str]


class TarIndex:
    """uid -> (offset, size) of each sample's original image in a WebDataset tar."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: dict[str, tuple[int, int]] = {}
        with tarfile.open(self.path, "r:") as tar:
            for member in tar:  # headers only: the data is skipped, not read
                key = original_image_key(member.name) if member.isfile() else None
                if key is not None:
                    self.entries[key] = (member.offset_data, member.size)

    def read_many(self, uids: list[str]) -> list[bytes | None]:
        out = []
        with open(self.path, "rb") as f:
            for uid in uids:
                where = self.entries.get(uid)
                if where is None:
                    out.append(None)
                    continue
                f.seek(where[0])
                out.append(f.read(where[1]))
        return out


def _prepare(data: bytes | None, target: int, max_pixels: int, preprocess) -> _Prepared | str:
    if data is None:
        return "missing_image"
    try:
        decoded = decode_for_model(data, target, max_pixels)
    except ImageRejected as e:
        return e.reason
    return _Prepared(decoded.width, decoded.height, preprocess(decoded.image))


def _scatter(values: list | None, positions: list[int], rows: int) -> list:
    """Place per-valid-row values at their row positions, null elsewhere."""
    out = [None] * rows
    for position, value in zip(positions, values or [], strict=False):
        out[position] = value
    return out


def _embedding_array(emb: torch.Tensor, ok: list[int], rows: int, schema: pa.Schema) -> pa.Array:
    dim = schema.field("score_image_embedding").type.list_size
    values = np.zeros((rows, dim), dtype=np.float16)
    values[ok] = emb.numpy().astype(np.float16)
    mask = np.ones(rows, dtype=bool)
    mask[ok] = False
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), dim, mask=pa.array(mask))


def score_shards(download_dir: Path) -> list[ShardSpec]:
    """Score shard k per completed download shard k: it reads download k's table and tar, and
    records the checksums download k's manifest holds (pipeline/core/lineage.py), so deciding
    that a score shard is done never re-reads a tar."""
    return download_shards(Path(download_dir).parent)
