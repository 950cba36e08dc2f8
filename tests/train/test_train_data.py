"""The trainer's shard loader: order, resume, split, bucketing, caption choice, dropout, errors."""

from __future__ import annotations

import functools
import math
import threading
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from shard_factory import DatasetSpec, TinyDims, write_dataset
from train_helpers import single_thread  # noqa: F401 (fixture)

from pipeline.encode.training_shards import DatasetManifest
from train.config import DataConfig, ModelConfig
from train.data import (
    DataPosition,
    SampleDecoder,
    ShardBatches,
    ShardError,
    iterate_tar,
    load_null_prompt,
    make_loader,
    read_shard_index,
)
from train.model_setup import DatasetMismatchError, build_model_config, check_dataset
from train.shard_order import plan_slot

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("single_thread")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_dataset(root, DatasetSpec(samples_per_shard=[5, 7, 3], seed=1))
    return root


def take(config: DataConfig, count: int, rank=0, world=1, position=None) -> list[dict]:
    loader = iter(make_loader(ShardBatches(config, rank, world, position)))
    return [next(loader) for _ in range(count)]


def test_batches_hold_one_bucket_and_are_deterministic(dataset):
    config = DataConfig(path=str(dataset), batch_size=2)
    first, again = take(config, 6), take(config, 6)
    assert [b["keys"] for b in first] == [b["keys"] for b in again]
    for batch in first:
        assert batch["latent"].shape[0] == 2  # full batches: leftovers carry over, never cut
        h, w = (int(v) // 8 for v in batch["bucket"].split("x"))
        assert batch["latent"].shape[1:] == (16, h, w)
        assert batch["context"].shape == (2, 77 + 16, 64) and batch["pooled"].shape == (2, 64)
    other_seed = take(DataConfig(path=str(dataset), batch_size=2, seed=5), 6)
    assert [b["keys"] for b in other_seed] != [b["keys"] for b in first]


def test_resume_from_a_position_continues_the_same_sequence(dataset):
    config = DataConfig(path=str(dataset), batch_size=2)
    straight = take(config, 9)
    position = {"num_slots": 1, "slots": {"0": {"batches": 4}}}
    resumed = take(config, 5, position=position)
    assert [b["keys"] for b in resumed] == [b["keys"] for b in straight[4:]]
    for a, b in zip(resumed, straight[4:], strict=True):
        assert torch.equal(a["latent"], b["latent"]) and torch.equal(a["context"], b["context"])
    with pytest.raises(ValueError, match="reader slots"):
        take(config, 1, position={"num_slots": 2, "slots": {}})


def test_resume_with_several_workers_continues_their_round_robin(dataset):
    config = DataConfig(path=str(dataset), batch_size=1, num_workers=2)
    straight = take(config, 7)
    position = DataPosition(num_slots=2)
    for batch in straight[:3]:  # an odd count: worker 1's slot is next
        position.record(batch)
    resumed = take(config, 4, position=position.state_dict())
    assert [b["keys"] for b in resumed] == [b["keys"] for b in straight[3:]]


def test_every_sample_is_used_once_per_epoch_across_ranks_and_workers():
    # 3 shards but 2 ranks x 4 workers = 8 slots: shards are split by sample index, no slot idles.
    buckets = [["a", "b"] * 3, ["a"] * 5, ["b", "b", "a", "a"]]
    total = sum(len(b) for b in buckets)
    seen: Counter = Counter()
    for slot in range(8):
        plan = plan_slot(buckets, num_slots=8, slot=slot, seed=0, batch_size=1, start=0)
        batches = [next(plan.batches) for _ in range(total)]  # far into later epochs
        assert batches, f"slot {slot} idle"
        seen.update((r.shard, r.position) for b in batches for r in b.refs if r.epoch == 0)
    assert sorted(seen) == sorted((s, p) for s, b in enumerate(buckets) for p in range(len(b)))
    assert set(seen.values()) == {1}


def test_bucket_leftovers_carry_over_instead_of_being_dropped():
    buckets = [["a", "a", "a", "b"], ["b", "a", "b"]]  # 4 a, 3 b: batch 2 leaves 1 b pending
    plan = plan_slot(buckets, num_slots=1, slot=0, seed=0, batch_size=2)
    epoch0 = [r for _ in range(4) for r in next(plan.batches).refs]
    next_batches = [next(plan.batches) for _ in range(4)]
    used_epoch0 = {(r.shard, r.position) for r in epoch0 + [r for b in next_batches for r in b.refs]
                   if r.epoch == 0}
    assert len(used_epoch0) == 7  # the odd "b" of epoch 0 rides in a batch of epoch 1


def test_each_worker_of_each_rank_reads_its_own_slot_of_the_plan(dataset):
    config = DataConfig(path=str(dataset), batch_size=1, num_workers=2)
    manifest = DatasetManifest.load(str(dataset))
    index = [read_shard_index(str(dataset), s.name) for s in manifest.shards]
    uids, buckets = [u for u, _ in index], [b for _, b in index]
    for rank in (0, 1):
        batches = take(config, 4, rank=rank, world=2)
        assert {b["slot"] for b in batches} == {2 * rank, 2 * rank + 1}
        for batch in batches:
            plan = plan_slot(buckets, 4, batch["slot"], 0, 1, start=batch["batch_index"])
            planned = next(plan.batches)
            assert batch["keys"] == [uids[r.shard][r.position] for r in planned.refs]


def _raw_sample(dataset: Path) -> dict:
    manifest = DatasetManifest.load(str(dataset))
    return next(iterate_tar(f"{dataset}/{manifest.shards[0].name}"))


def test_caption_variant_and_encoder_dropout_rates(dataset):
    manifest = DatasetManifest.load(str(dataset))
    raw = _raw_sample(dataset)
    decoder = SampleDecoder(manifest, DataConfig(path=str(dataset)))
    n, dropped, synthetic = 1500, Counter(), 0
    for i in range(n):
        sample = decoder.decode(raw, epoch=0, uid=f"u{i}")
        ctx, pooled = sample["context"].float(), sample["pooled"].float()
        dropped["clip_l"] += bool((ctx[:77, :32] == 0).all() and (pooled[:32] == 0).all())
        dropped["clip_g"] += bool((ctx[:77, 32:64] == 0).all() and (pooled[32:] == 0).all())
        dropped["t5"] += bool((ctx[77:] == 0).all())
        # the factory's synthetic embeddings are offset by +0.01 from the original ones
        kept_t5 = ctx[77:]
        if not (kept_t5 == 0).all():
            synthetic += bool(kept_t5.mean() > _t5_mean(raw, "original") + 0.005)
    tolerance = 4 * math.sqrt(0.464 * 0.536 / n)  # 4 sigma of a binomial proportion
    for encoder, count in dropped.items():
        assert abs(count / n - 0.464) < tolerance, (encoder, count / n)
    kept = n - dropped["t5"]
    assert abs(synthetic / kept - 0.5) < 4 * math.sqrt(0.25 / kept)


def test_null_prompt_fill_gives_dropped_encoders_the_encoding_of_the_empty_prompt(dataset):
    # What sampling's unconditional branch feeds the model (the encoding of ""), so that
    # classifier-free guidance extrapolates from a branch the model was trained on.
    from train.data import assemble_context

    manifest = DatasetManifest.load(str(dataset))
    expected_context, expected_pooled = assemble_context(load_null_prompt(str(dataset)))
    raw = _raw_sample(dataset)
    for fill in ("null_prompt", "zeros"):
        config = DataConfig(path=str(dataset), encoder_dropout=1.0, dropout_fill=fill)
        null = load_null_prompt(str(dataset)) if fill == "null_prompt" else None
        decoder = SampleDecoder(manifest, config, null)
        sample = decoder.decode(raw, epoch=0, uid="u0")
        if fill == "null_prompt":
            torch.testing.assert_close(sample["context"].float(), expected_context.float())
            torch.testing.assert_close(sample["pooled"].float(), expected_pooled.float())
            assert sample["context"].abs().sum() > 0
        else:
            assert (sample["context"] == 0).all() and (sample["pooled"] == 0).all()


def _t5_mean(raw: dict, variant: str) -> float:
    from pipeline.encode.training_shards import npy_to_tensor

    return npy_to_tensor(raw[f"{variant}.t5.npy"], "float16").float().mean().item()


def test_latents_are_normalised_with_the_manifest_factors(dataset):
    manifest = DatasetManifest.load(str(dataset))
    raw = _raw_sample(dataset)
    from pipeline.encode.training_shards import npy_to_tensor

    mean = npy_to_tensor(raw["latent_mean.npy"], "float16").float()
    decoder = SampleDecoder(manifest, DataConfig(path=str(dataset), sample_posterior=False))
    latent = decoder.decode(raw, 0, raw["__key__"])["latent"]
    torch.testing.assert_close(latent, (mean - 0.0609) * 1.5305)


def test_corrupt_shard_is_named_or_skipped_and_counted(tmp_path):
    write_dataset(tmp_path, DatasetSpec(samples_per_shard=[4, 4], buckets=[(64, 64)]))
    tar = tmp_path / "shards/00001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 3])  # a truncated upload
    with pytest.raises(ShardError, match="00001.tar"):
        take(DataConfig(path=str(tmp_path), batch_size=2), 4)
    batches = take(DataConfig(path=str(tmp_path), batch_size=2, on_corrupt="skip"), 6)
    assert batches[-1]["bad_shards"] == ["shards/00001.tar"] and batches[-1]["missing"] > 0
    keys = {k for b in batches for k in b["keys"]}
    assert {f"s000_{i:04d}" for i in range(4)} <= keys


def test_manifest_mismatch_is_refused_with_every_reason(tmp_path):
    write_dataset(tmp_path, DatasetSpec(samples_per_shard=[2], dims=TinyDims(t5=48)))
    manifest = DatasetManifest.load(str(tmp_path))
    section = ModelConfig(preset="tiny", mmdit={"pooled_projection_dim": 48, "joint_attention_dim": 64},
                          vae_id="stabilityai/sd3-vae")
    with pytest.raises(DatasetMismatchError) as error:
        check_dataset(manifest, build_model_config(section), section, str(tmp_path))
    message = str(error.value)
    assert "joint_attention_dim 64" in message and "pooled_projection_dim 48" in message
    assert "tiny-vae" in message and str(tmp_path) in message


def test_shards_stream_from_an_fsspec_url_like_from_a_path(dataset):
    handler = functools.partial(_QuietFiles, directory=str(dataset))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        remote = take(DataConfig(path=url, batch_size=2), 5)
    finally:
        server.shutdown()
        server.server_close()
    local = take(DataConfig(path=str(dataset), batch_size=2), 5)
    for a, b in zip(remote, local, strict=True):
        assert a["keys"] == b["keys"] and torch.equal(a["context"], b["context"])


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        pass
