"""The training loop: the tiny model learns, non-finite steps are skipped, bad data refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from shard_factory import DatasetSpec, TinyDims, write_dataset
from train_helpers import TINY, single_thread, step_records  # noqa: F401 (fixture)

from train.cli import main as train_main
from train.config import load_train_config
from train.trainer import Trainer

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("single_thread")]


def test_loss_of_a_tiny_model_falls_on_tiny_shards(tmp_path):
    dataset = tmp_path / "data"
    write_dataset(dataset, DatasetSpec(samples_per_shard=[8, 8], buckets=[(64, 64)]))
    sections = load_train_config(str(TINY), [
        f"--data.path={dataset}", f"--validation.path={dataset}", f"--run.output_dir={tmp_path / 'run'}",
        "--run.max_steps=30", "--validation.every=30", "--checkpoint.every=30",
        "--logging.every=15", "--validation.sample_every=30", "--validation.sample_steps=4",
    ])
    trainer = Trainer(sections)
    before = trainer.validator.loss(trainer.raw_model)["loss"]
    trainer.fit()
    logged = [json.loads(x) for x in (tmp_path / "run" / "validation.jsonl").read_text().splitlines()]
    after = logged[-1]["loss"]  # EMA weights, same fixed t and noise as `before`
    assert after < 0.75 * before, (before, after)
    assert (tmp_path / "run" / "samples" / "step-00000030.png").stat().st_size > 0
    events = list((tmp_path / "run" / "tensorboard").iterdir())
    assert events and events[0].stat().st_size > 0


def test_non_finite_loss_skips_the_step_and_names_the_samples(tmp_path, caplog):
    dataset = tmp_path / "data"
    bad = "s000_0001"
    write_dataset(dataset, DatasetSpec(samples_per_shard=[4], buckets=[(64, 64)], nan_uids=(bad,)))
    out = tmp_path / "run"
    with caplog.at_level("WARNING"):
        assert train_main(["--config", str(TINY), f"--data.path={dataset}", f"--run.output_dir={out}",
                           "--run.max_steps=4", "--data.batch_size=2", "--logging.tensorboard=false",
                           "--checkpoint.every=4"]) == 0
    records = step_records(out)
    skipped = [r for r in records.values() if r["skipped"]]
    assert skipped and all(bad in r["keys"] for r in skipped)
    assert any(not r["skipped"] for r in records.values())
    assert bad in caplog.text
    checkpoint = out / "checkpoints" / "step-00000004"
    assert json.loads((checkpoint / "trainer.json").read_text())["nan_skips"] == len(skipped)
    weights = load_file(checkpoint / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_the_command_refuses_data_made_for_another_model(tmp_path, capsys):
    dataset = tmp_path / "data"
    write_dataset(dataset, DatasetSpec(samples_per_shard=[2], dims=TinyDims(t5=48)))
    code = train_main(["--config", str(TINY), f"--data.path={dataset}",
                       f"--run.output_dir={tmp_path / 'run'}"])
    assert code == 2
    error = capsys.readouterr().err
    assert "does not match the model config" in error and "joint_attention_dim 64" in error
