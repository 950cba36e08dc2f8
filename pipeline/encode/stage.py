"""The encode stage: kept samples -> precomputed SD3 training shards.

For each sample that shard k keeps (pipeline/core/lineage.py: download k, score k, select k,
dedup k and caption k, those of them that ran; with captions, those whose synthetic caption
was accepted): decode once at about the bucket size, resize and centre-crop into its aspect
bucket, encode with the VAE, and encode each caption variant with CLIP-L, CLIP-G and T5.

Latents: the VAE's latent distribution is stored as its mean and std (documented choice), so
the trainer can draw z = mean + std * eps afresh each epoch like diffusers' training scripts
(`latent_dist.sample()`), or use the mean alone; `latent_std = false` halves the latent bytes.
Latents are raw: shift and scale stay in the manifest, never baked in (SD3_SPEC).
Text: penultimate CLIP hidden states, projected pooled vectors and the T5 last hidden state,
computed by model/text_encoding.py, which equals StableDiffusion3Pipeline.encode_prompt.

Outputs (RUN_DIR/encode/): shards/NNNNN.tar + shards/NNNNN.parquet (training shards),
NNNNN.parquet (every input row with `encode_reason`, for the funnel), the shard manifests,
null_prompt.safetensors and encoders.json (written by `setup`, with dataset_files.json naming
the fingerprint they were made for) and, once all shards are done, dataset.json. A rerun with
every shard done loads no model: it only rebuilds dataset.json, unless the dataset-level
files are missing or were made for another fingerprint.
"""

from __future__ import annotations

import functools
import json
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from model.loading import load_text_encoders, load_vae
from model.text_encoding import CLIP_MAX_LENGTH, encode_prompts
from pipeline.core.command import InputError
from pipeline.core.config import ConfigError, config_hash
from pipeline.core.decode import ImageRejected
from pipeline.core.devices import resolve_device, resolve_dtype
from pipeline.core.lineage import decode_ahead, iter_kept_rows, plan_lineage, recorded_outputs
from pipeline.core.manifest import ShardOutputs, write_json_atomic
from pipeline.core.runners import RunnerConfig, run_stage
from pipeline.core.stage import ShardSpec, Stage
from pipeline.encode.buckets import (
    BucketConfig,
    Placement,
    bucket_name,
    load_bucketed,
    make_buckets,
    to_vae_input,
)
from pipeline.encode.training_shards import NULL_PROMPT_NAME, DatasetManifest, EncoderInfo, VaeInfo
from pipeline.encode.writer import (
    ENCODERS_NAME,
    EncodedSample,
    TrainingShardWriter,
    write_dataset_manifest,
    write_encoders,
    write_null_prompt,
)
from pipeline.score.stage import TarIndex

ENCODE_SCHEMA = pa.schema([
    ("uid", pa.string()),
    ("encode_bucket", pa.string()),  # "HxW"; null when dropped
    ("encode_reason", pa.string()),
])
SCORE_COLUMNS = ["uid", "score_clip", "score_aesthetic"]
ENCODE_READS = ("score", "select", "dedup", "caption")  # besides download k, when they ran
DATASET_FILES = "dataset_files.json"  # the fingerprint null_prompt and encoders.json are for


@dataclass
class EncodeConfig:
    model: str = ""  # SD3 diffusers folder or hub id (vae, text_encoder, _2, _3, tokenizers)
    revision: str | None = None
    bucket: BucketConfig = field(default_factory=BucketConfig)
    latent_dtype: Literal["float16", "bfloat16"] = "float16"
    text_dtype: Literal["float16", "bfloat16"] = "float16"
    latent_std: bool = True  # store the latent distribution's std beside its mean
    t5_max_length: int = 77  # the paper's 77 (diffusers' pipeline defaults to 256)
    # SD3 keeps all 77 CLIP positions. CLIP is causal, so fewer only drop trailing padding
    # states: a cheaper context for short captions (the demo's are <= 16 tokens).
    clip_max_length: int = 77
    batch_size: int = 16
    decode_threads: int = 4  # images decode in threads, one batch ahead of the models
    device: str = "auto"  # auto: cuda when available, else cpu
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU
    # A sample whose synthetic caption was rejected: false -> not encoded (the caption stage
    # counted the drop); true -> encoded with its original caption in the synthetic slot.
    synthetic_fallback: bool = False
    max_pixels: int = 89_478_485
    runner: RunnerConfig = field(default_factory=RunnerConfig)

    def __post_init__(self):
        if min(self.batch_size, self.t5_max_length, self.decode_threads) < 1:
            raise ValueError("batch_size, t5_max_length and decode_threads must be at least 1")
        if not 1 <= self.clip_max_length <= CLIP_MAX_LENGTH:
            raise ValueError(f"clip_max_length={self.clip_max_length}: CLIP allows 1..{CLIP_MAX_LENGTH}")


class EncodeStage(Stage):
    name = "encode"

    def __init__(self, config: EncodeConfig, out_dir: str | Path, variants: list[str]):
        super().__init__(config)
        self.batch_size = config.batch_size
        self.out_dir, self.variants = Path(out_dir), variants
        self.buckets = make_buckets(config.bucket)
        self.writer: TrainingShardWriter | None = None
        self._decoded: deque[list] = deque()
        self._pool: ThreadPoolExecutor | None = None

    def setup(self) -> None:
        cfg = self.config
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.compute_dtype, self.device)
        self.vae = load_vae(cfg.model, cfg.revision, self.dtype).to(self.device)
        self.text_encoders = load_text_encoders(cfg.model, cfg.revision, self.dtype).to(self.device)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        null = self.encode_texts([""])[0]
        write_null_prompt(self.out_dir, null, cfg.text_dtype)
        write_encoders(self.out_dir, *self.encoder_info(null))
        write_json_atomic(self.out_dir / DATASET_FILES, {"fingerprint": self.fingerprint()})

    def encoder_info(self, null: dict[str, torch.Tensor]) -> tuple[VaeInfo, dict[str, EncoderInfo]]:
        cfg, vae = self.config, self.vae.config
        revision = cfg.revision or getattr(vae, "_commit_hash", None)
        vae_info = VaeInfo(cfg.model, revision, vae.latent_channels,
                           2 ** (len(vae.block_out_channels) - 1),
                           float(vae.shift_factor or 0.0), float(vae.scaling_factor))
        encoders = {
            role: EncoderInfo(cfg.model, revision, null[role].shape[-1],
                              null[f"{role}_pooled"].shape[-1], null[role].shape[0])
            for role in ("clip_l", "clip_g")
        }
        encoders["t5"] = EncoderInfo(cfg.model, revision, null["t5"].shape[-1], 0, cfg.t5_max_length)
        return vae_info, encoders

    def models(self) -> dict[str, str]:
        return {"sd3": f"{self.config.model}@{self.config.revision}"}

    def fingerprint(self) -> str:
        what = replace(self.config, runner=RunnerConfig(), device="auto", decode_threads=1)
        return f"{config_hash(what)}-{'+'.join(self.variants)}"

    def output_schema(self) -> pa.Schema:
        return ENCODE_SCHEMA

    def begin_shard(self, shard: ShardSpec, outputs: ShardOutputs) -> None:
        tar, index = outputs.path(f"shards/{shard.shard}.tar"), outputs.path(f"shards/{shard.shard}.parquet")
        self.writer = TrainingShardWriter(tar, index, self.config.latent_dtype, self.config.text_dtype)

    def end_shard(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def read_batches(self, shard: ShardSpec) -> Iterator[pa.Table]:
        """Kept rows with their captions and scores, images decoded one batch ahead."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.config.decode_threads, thread_name_prefix="decode")
        self._decoded.clear()
        for batch, placed in decode_ahead(self._rows(shard), self._place, self._pool):
            self._decoded.append(placed)
            yield batch

    def _rows(self, shard: ShardSpec) -> Iterator[pa.Table]:
        """Kept rows with their captions, scores and original image bytes, in shard order."""
        index = TarIndex(shard.inputs["tar"])
        captions = self._synthetic_captions(shard)
        scores = self._scores(shard)
        for batch in iter_kept_rows(shard, self.batch_size, ["uid", "caption"]):
            rows = [r | captions.get(r["uid"], {}) | scores.get(r["uid"], {})
                    for r in batch.to_pylist()]
            if "caption" in shard.inputs:  # recaptioned: a sample needs an accepted caption
                fallback = self.config.synthetic_fallback
                rows = [r for r in rows if r.get("caption_synthetic") or fallback]
            if rows:
                images = index.read_many([r["uid"] for r in rows])
                yield pa.Table.from_pylist([r | {"image": im} for r, im in zip(rows, images, strict=True)])

    def _synthetic_captions(self, shard: ShardSpec) -> dict[str, dict]:
        """uid -> synthetic caption, from caption k (per shard: small)."""
        if "caption" not in shard.inputs:
            return {}
        table = pq.read_table(shard.inputs["caption"], columns=["uid", "caption_synthetic"])
        return {r["uid"]: {"caption_synthetic": r["caption_synthetic"]} for r in table.to_pylist()}

    def _scores(self, shard: ShardSpec) -> dict[str, dict]:
        if "score" not in shard.inputs:
            return {}
        path = shard.inputs["score"]
        columns = [c for c in SCORE_COLUMNS if c in pq.read_schema(path).names]
        return {r.pop("uid"): r for r in pq.read_table(path, columns=columns).to_pylist()}

    def process(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        placed = self._decoded.popleft()  # decoded in the pool while the previous batch ran
        ok = [i for i, p in enumerate(placed) if not isinstance(p, str)]
        means, stds = self.encode_images([placed[i][0] for i in ok])
        texts = self.encode_texts([self._captions(rows[i]) for i in ok])
        samples = []
        for j, i in enumerate(ok):
            row, placement = rows[i], placed[i][1]
            scores = {k: row.get(k) for k in SCORE_COLUMNS[1:]}
            samples.append(EncodedSample(
                row["uid"], placement, means[j], stds[j] if self.config.latent_std else None,
                self._captions(rows[i]), texts[j], scores,
                "synthetic" in self.variants and not row.get("caption_synthetic")))
        self.writer.write(samples)
        buckets = [None if isinstance(p, str) else bucket_name(p[1].bucket) for p in placed]
        reasons = [p if isinstance(p, str) else None for p in placed]
        return pa.table({"uid": batch["uid"], "encode_bucket": buckets, "encode_reason": reasons},
                        schema=ENCODE_SCHEMA)

    def _captions(self, row: dict) -> dict[str, str]:
        original = row.get("caption") or ""
        captions = {"original": original}
        if "synthetic" in self.variants:
            captions["synthetic"] = row.get("caption_synthetic") or original
        return captions

    def _place(self, data: bytes | None) -> tuple[torch.Tensor, Placement] | str:
        """(VAE input (3, H, W), placement) of one image, or the reason it cannot be used."""
        if data is None:
            return "missing_image"
        try:
            image, placement = load_bucketed(data, self.buckets, self.config.max_pixels)
        except ImageRejected as e:
            return e.reason
        return to_vae_input(image), placement

    @torch.inference_mode()
    def encode_images(self, pixels: list[torch.Tensor]) -> tuple[list, list]:
        """Latent mean and std per image, one VAE call per bucket shape in the batch."""
        means: list = [None] * len(pixels)
        stds: list = [None] * len(pixels)
        by_shape: dict[tuple, list[int]] = {}
        for i, p in enumerate(pixels):
            by_shape.setdefault(tuple(p.shape), []).append(i)
        for positions in by_shape.values():
            x = torch.stack([pixels[i] for i in positions]).to(self.device, self.dtype)  # (B, 3, H, W)
            dist = self.vae.encode(x).latent_dist  # mean, std: (B, 16, H/8, W/8)
            for k, i in enumerate(positions):
                means[i], stds[i] = dist.mean[k].float().cpu(), dist.std[k].float().cpu()
        return means, stds

    def encode_texts(self, captions: list[dict[str, str]] | list[str]) -> list:
        """Per sample: variant -> component -> tensor (or, for plain strings, component -> tensor)."""
        plain = bool(captions) and isinstance(captions[0], str)
        items = [{"": c} for c in captions] if plain else captions
        keys = [(i, v) for i, item in enumerate(items) for v in item]
        if not keys:
            return []
        out = encode_prompts(self.text_encoders, [items[i][v] for i, v in keys],
                             self.config.t5_max_length, self.config.clip_max_length)
        parts = {"clip_l": out.clip_l_hidden, "clip_l_pooled": out.clip_l_pooled,
                 "clip_g": out.clip_g_hidden, "clip_g_pooled": out.clip_g_pooled, "t5": out.t5_hidden}
        result: list[dict] = [{} for _ in items]
        for n, (i, v) in enumerate(keys):
            result[i][v] = {name: t[n].float().cpu() for name, t in parts.items()}
        return [r[""] for r in result] if plain else result


def run_encode(
    config: EncodeConfig, run_dir: str | Path, runner: RunnerConfig | None = None,
    verify: bool = False,
) -> DatasetManifest:
    """Encode every ready download shard of `run_dir` into training shards under RUN_DIR/encode/.

    dataset.json is written only when every shard is done; shards whose upstream tables are
    missing are not run, and NotReady names them.
    """
    if not config.model:
        raise ConfigError("encode.model is empty: give an SD3 diffusers folder or hub id")
    run_dir, out_dir = Path(run_dir), Path(run_dir) / "encode"
    plan = plan_lineage(run_dir, ENCODE_READS)
    if not plan.shards and not plan.missing:
        raise InputError(f"{run_dir / 'download'} has no completed download shards")
    recaptioned = recorded_outputs(run_dir / "caption") is not None
    variants = ["original", "synthetic"] if recaptioned else ["original"]
    factory = functools.partial(EncodeStage, config, out_dir, variants)
    manifests = run_stage(factory, plan.shards, out_dir, runner or config.runner, verify)
    if (error := plan.not_ready("encode")) is not None:
        raise error
    _ensure_dataset_files(factory)
    base = DatasetManifest(
        vae=VaeInfo(""), text_encoders={}, buckets=[list(b) for b in make_buckets(config.bucket)],
        variants=variants, latent_dtype=config.latent_dtype, text_dtype=config.text_dtype,
        latent_std=config.latent_std, t5_max_length=config.t5_max_length,
        clip_max_length=config.clip_max_length,
        config_hash=config_hash(replace(config, runner=RunnerConfig())),
    )
    return write_dataset_manifest(out_dir, manifests, base)


def _ensure_dataset_files(factory) -> None:
    """null_prompt and encoders.json for this fingerprint: `setup` writes them when shards ran;
    a rerun that ran none loads the models only if they are missing or were made for another
    config (e.g. by a later run that crashed before finishing a shard)."""
    stage: EncodeStage = factory()
    path = stage.out_dir / DATASET_FILES
    made_for = json.loads(path.read_text()).get("fingerprint") if path.exists() else None
    present = all((stage.out_dir / name).exists() for name in (NULL_PROMPT_NAME, ENCODERS_NAME))
    if made_for != stage.fingerprint() or not present:
        stage.setup()
