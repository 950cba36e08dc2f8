"""The encode stage on the tiny SD3 bundle: kept samples -> training shards anyone can read."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from decision_factory import scored_uids, write_caption_shard, write_dedup, write_select_shard
from download_factory import write_download_run
from safetensors.torch import load_file

from pipeline.core.lineage import iter_kept_rows, plan_lineage
from pipeline.core.manifest import read_manifests
from pipeline.encode.buckets import BucketConfig, load_bucketed, make_buckets, to_vae_input
from pipeline.encode.stage import DATASET_FILES, ENCODE_READS, EncodeConfig, EncodeStage, run_encode
from pipeline.encode.training_shards import (
    TEXT_COMPONENTS,
    DatasetManifest,
    npy_to_tensor,
    text_entry,
)

pytestmark = pytest.mark.timeout(240)
BUCKETS = BucketConfig(resolution=64, multiple=16)


def _corrupt_one_image(run_dir: Path, uid: str) -> None:
    """Cut one sample's image bytes in its download tar in half: a corrupt, truncated file."""
    tar_path = run_dir / "download" / "00001.tar"
    members = []
    with tarfile.open(tar_path) as tar:
        for member in tar:
            data = tar.extractfile(member).read()
            if member.name.startswith(f"{uid}.") and not member.name.endswith(".json"):
                data = data[: len(data) // 2]
            members.append((member.name, data))
    with tarfile.open(tar_path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _write_decisions(run_dir: Path) -> None:
    """select drops s000r0001, dedup drops s001r0000; the caption stage rejected s000r0002."""
    statuses = {}
    for shard in ("00000", "00001"):
        uids = scored_uids(run_dir, shard)
        write_select_shard(run_dir, shard, {u: u != "s000r0001" for u in uids})
        statuses[shard] = {u: None if u == "s000r0001" else "dropped" if u == "s001r0000" else "kept"
                           for u in uids}
    write_dedup(run_dir, statuses)
    for shard in ("00000", "00001"):
        write_caption_shard(run_dir, shard, _captions(run_dir, shard, "detailed"))


def _captions(run_dir: Path, shard: str, word: str) -> dict[str, str | None]:
    table = pq.read_table(run_dir / "download" / f"{shard}.parquet", columns=["uid", "caption"])
    return {r["uid"]: None if r["uid"] == "s000r0002" else f"A {word} recaption of {r['caption']}"
            for r in table.to_pylist()}


@pytest.fixture(scope="module")
def encoded(tiny_models, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("encode_run")
    write_download_run(run_dir, shards=2, rows=6)  # rows 3 of each shard failed to download
    _corrupt_one_image(run_dir, "s001r0001")
    _write_decisions(run_dir)
    config = EncodeConfig(model=str(tiny_models / "sd3"), bucket=BUCKETS, batch_size=3)
    manifest = run_encode(config, run_dir)
    return run_dir, config, manifest


def _read_shard(path: Path) -> list[dict]:
    """Samples of a tar with plain `webdataset`, decoding only .npy (no pickle) and json."""
    import webdataset as wds

    def safe(key: str, data: bytes):
        if key.endswith(".npy"):
            return np.load(io.BytesIO(data), allow_pickle=False)
        if key.endswith("json"):
            return json.loads(data)
        return None

    return list(wds.WebDataset(str(path), shardshuffle=False).decode(safe))


def test_kept_rows_join_each_shards_own_decisions(encoded):
    run_dir, _, _ = encoded
    plan = plan_lineage(run_dir, ENCODE_READS)
    kept = {u for spec in plan.shards for b in iter_kept_rows(spec, 2, ["uid"])
            for u in b["uid"].to_pylist()}
    assert "s000r0001" not in kept and "s001r0000" not in kept  # select, dedup
    assert "s000r0003" not in kept  # failed download
    assert {"s000r0000", "s000r0002", "s001r0001"} <= kept
    manifest = {m.shard: m for m in read_manifests(run_dir / "encode")}["00001"]
    assert set(manifest.inputs) == {f"{stage}/00001.{ext}" for stage, ext in (
        ("download", "parquet"), ("download", "tar"), ("select", "parquet"),
        ("dedup", "parquet"), ("caption", "parquet"))}


def test_shards_hold_the_kept_samples_with_drops_recorded(encoded):
    run_dir, _, manifest = encoded
    index = pq.read_table(run_dir / "encode/shards/00000.parquet").to_pylist()
    assert [r["uid"] for r in index] == ["s000r0000", "s000r0004", "s000r0005"]
    funnel = pq.read_table(run_dir / "encode/00001.parquet").to_pylist()
    reasons = {r["uid"]: r["encode_reason"] for r in funnel}
    assert reasons == {"s001r0001": "decode_error", "s001r0002": None, "s001r0004": None,
                       "s001r0005": None}
    assert manifest.counts["samples"] == 6 and manifest.counts["dropped_decode_error"] == 1
    by_shard = {m.shard: m for m in read_manifests(run_dir / "encode")}
    assert by_shard["00001"].reasons == {"decode_error": 1} and by_shard["00001"].rows_out == 3
    assert sum(s.samples for s in manifest.shards) == 6


def test_dataset_manifest_describes_the_data(encoded, tiny_models):
    run_dir, config, _ = encoded
    manifest = DatasetManifest.load(run_dir / "encode")
    assert manifest.vae.shift_factor == pytest.approx(0.0609)
    assert manifest.vae.scaling_factor == pytest.approx(1.5305)
    assert (manifest.vae.latent_channels, manifest.vae.downsample) == (16, 8)
    assert manifest.text_encoders["clip_l"].hidden == 32 and manifest.text_encoders["t5"].hidden == 64
    assert manifest.variants == ["original", "synthetic"]
    assert manifest.buckets == [list(b) for b in make_buckets(BUCKETS)]
    assert manifest.t5_max_length == 77 and manifest.latent_dtype == "float16"
    tar = run_dir / "encode" / manifest.shards[0].name
    import hashlib

    assert hashlib.sha256(tar.read_bytes()).hexdigest() == manifest.shards[0].sha256


def test_plain_webdataset_reads_every_tensor(encoded):
    run_dir, _, _ = encoded
    samples = _read_shard(run_dir / "encode/shards/00000.tar")
    index = pq.read_table(run_dir / "encode/shards/00000.parquet").to_pylist()
    assert [s["__key__"] for s in samples] == [r["uid"] for r in index]
    for sample, row in zip(samples, index, strict=True):
        meta = sample["json"]
        h, w = meta["bucket"]
        assert row["bucket"] == f"{h}x{w}"
        assert sample["latent_mean.npy"].shape == (16, h // 8, w // 8)
        assert sample["latent_mean.npy"].dtype == np.float16
        assert (sample["latent_std.npy"] > 0).all()
        assert sample["original.clip_l.npy"].shape == (77, 32)
        assert sample["synthetic.t5.npy"].shape == (77, 64)
        assert meta["captions"]["synthetic"].startswith("A detailed recaption")
        assert meta["original_size"][0] > 0 and len(meta["crop"]) == 4


def test_hugging_face_datasets_loads_the_shards(encoded):
    import datasets

    run_dir, _, _ = encoded
    tars = sorted(str(p) for p in (run_dir / "encode/shards").glob("*.tar"))
    ds = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train",
                               cache_dir=str(run_dir / "hf_cache"))
    assert len(ds) == 6
    row = ds[0]
    assert np.asarray(row["original.clip_g_pooled.npy"]).shape == (32,)
    assert np.asarray(row["latent_mean.npy"]).shape[0] == 16


def test_text_embeddings_equal_diffusers_encode_prompt(encoded, tiny_models):
    from diffusers import StableDiffusion3Pipeline

    run_dir, _, _ = encoded
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_models / "sd3", transformer=None)
    sample = _read_shard(run_dir / "encode/shards/00000.tar")[0]
    null = load_file(run_dir / "encode/null_prompt.safetensors")
    for variant, parts in (("original", None), ("synthetic", None), ("null", null)):
        prompt = "" if variant == "null" else sample["json"]["captions"][variant]
        if parts is None:
            parts = {c: torch.from_numpy(sample[text_entry(variant, c)]) for c in TEXT_COMPONENTS}
        context, _, pooled, _ = pipe.encode_prompt(
            prompt, prompt, prompt, device="cpu", do_classifier_free_guidance=False,
            max_sequence_length=77)
        clip = torch.cat([parts["clip_l"], parts["clip_g"]], -1).float()  # (77, 64)
        ours = torch.cat([torch.nn.functional.pad(clip, (0, 64 - clip.shape[-1])),
                          parts["t5"].float()])  # (154, 64)
        ours_pooled = torch.cat([parts["clip_l_pooled"], parts["clip_g_pooled"]]).float()
        torch.testing.assert_close(ours, context[0], rtol=2e-3, atol=2e-3)  # fp16 storage
        torch.testing.assert_close(ours_pooled, pooled[0], rtol=2e-3, atol=2e-3)


def test_latents_are_the_vae_distribution_of_the_bucketed_image(encoded, tiny_models):
    from diffusers import AutoencoderKL

    run_dir, _, _ = encoded
    sample = _read_shard(run_dir / "encode/shards/00001.tar")[0]
    with tarfile.open(run_dir / "download/00001.tar") as tar:
        image_name = next(n for n in tar.getnames()
                          if n.startswith(sample["__key__"] + ".") and not n.endswith(".json"))
        data = tar.extractfile(image_name).read()
    image, placement = load_bucketed(data, make_buckets(BUCKETS))
    assert list(placement.bucket) == sample["json"]["bucket"]
    vae = AutoencoderKL.from_pretrained(tiny_models / "sd3", subfolder="vae")
    with torch.no_grad():
        dist = vae.encode(to_vae_input(image)[None]).latent_dist
    stored = torch.from_numpy(sample["latent_mean.npy"]).float()
    torch.testing.assert_close(stored, dist.mean[0], rtol=2e-3, atol=2e-3)  # raw: no shift/scale
    torch.testing.assert_close(torch.from_numpy(sample["latent_std.npy"]).float(), dist.std[0],
                               rtol=2e-3, atol=2e-3)


def test_rerun_skips_done_shards_and_redoes_changed_ones(encoded):
    run_dir, config, _ = encoded
    before = {m.shard: m for m in read_manifests(run_dir / "encode")}
    run_encode(config, run_dir)  # nothing changed: same manifests, nothing rewritten
    assert {m.shard: m for m in read_manifests(run_dir / "encode")} == before
    write_caption_shard(run_dir, "00001", _captions(run_dir, "00001", "new"))
    manifest = run_encode(config, run_dir)  # caption 1 changed: encode 1 is redone, 0 is not
    after = {m.shard: m for m in read_manifests(run_dir / "encode")}
    assert after["00000"] == before["00000"] and after["00001"] != before["00001"]
    samples = _read_shard(run_dir / "encode/shards/00001.tar")
    assert samples[0]["json"]["captions"]["synthetic"].startswith("A new recaption")
    assert manifest.counts["samples"] == 6


def test_a_noop_rerun_loads_no_model_and_still_writes_a_correct_dataset(encoded, monkeypatch):
    run_dir, config, first = encoded
    run_encode(config, run_dir)
    calls = []
    monkeypatch.setattr(EncodeStage, "setup", lambda self: calls.append(self.fingerprint()))
    (run_dir / "encode" / "dataset.json").unlink()
    manifest = run_encode(config, run_dir)
    assert calls == [] and manifest.counts == first.counts and manifest.vae == first.vae
    assert DatasetManifest.load(run_dir / "encode").shards == manifest.shards
    # Dataset-level files made for another config (a run that crashed before finishing any
    # shard) are remade, even though every shard is done.
    files = run_dir / "encode" / DATASET_FILES
    files.write_text(json.dumps({"fingerprint": "another config"}))
    run_encode(config, run_dir)
    assert len(calls) == 1
    files.write_text(json.dumps({"fingerprint": calls[0]}))  # as the real setup leaves it


def test_bfloat16_latents_round_trip_through_uint16(tiny_models, tmp_path):
    run_dir = tmp_path / "run"
    write_download_run(run_dir, shards=1, rows=2, failures_every=0)
    config = EncodeConfig(model=str(tiny_models / "sd3"), bucket=BUCKETS, latent_dtype="bfloat16",
                          latent_std=False, t5_max_length=16)
    manifest = run_encode(config, run_dir)
    assert manifest.variants == ["original"] and not manifest.latent_std
    sample = _read_shard(run_dir / "encode/shards/00000.tar")[0]
    assert "latent_std.npy" not in sample and sample["original.t5.npy"].shape == (16, 64)
    raw = sample["latent_mean.npy"]
    assert raw.dtype == np.uint16
    buffer = io.BytesIO()
    np.save(buffer, raw, allow_pickle=False)
    latent = npy_to_tensor(buffer.getvalue(), "bfloat16")
    assert latent.dtype == torch.bfloat16 and torch.isfinite(latent.float()).all()
    assert latent.float().abs().max() > 0


def test_the_trainer_reads_the_shards(encoded):
    import itertools

    from train.config import DataConfig
    from train.data import ShardBatches

    run_dir, _, _ = encoded
    batches = list(itertools.islice(iter(ShardBatches(DataConfig(path=str(run_dir / "encode"),
                                                                 batch_size=2))), 2))
    for batch in batches:
        h, w = (int(v) for v in batch["bucket"].split("x"))
        assert batch["latent"].shape == (2, 16, h // 8, w // 8)
        assert batch["context"].shape == (2, 154, 64) and batch["pooled"].shape == (2, 64)
        assert torch.isfinite(batch["context"]).all()
