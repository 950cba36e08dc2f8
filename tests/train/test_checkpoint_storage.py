"""Checkpoints and exports on local disk and on a real S3-API server (moto, 127.0.0.1):
marker last, incomplete folders ignored, keep_last rotation, exact resume, export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from s3_server import moto_s3, s3_bucket  # noqa: F401 (fixtures)
from shard_factory import DatasetSpec, write_dataset
from train_helpers import TINY, single_thread, step_records  # noqa: F401 (fixture)

from pipeline.core import storage
from train import checkpoint as ckpt
from train.cli import main as train_main
from train.export import main as export_main

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("single_thread")]


def save(root, step: int, complete: bool = True) -> None:
    """What the trainer writes for one step, with one rank and a one-tensor model."""
    target = ckpt.checkpoint_path(root, step)
    ckpt.begin(target)
    ckpt.write_rank(target, 0, {"torch": torch.get_rng_state()}, {"num_slots": 1, "slots": {}})
    if complete:
        ckpt.write_shared(target, {"w": torch.full((2,), float(step))}, None, {"step": step},
                          {"state": {}}, {"last_epoch": step})
        ckpt.finish(root, step, {"step": step, "nan_skips": 0}, keep_last=2)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "checkpoints")
    return storage.join(request.getfixturevalue("s3_bucket"), "run", "checkpoints")


def test_only_complete_checkpoints_count_and_old_ones_are_pruned(root):
    save(root, 1)
    save(root, 2)
    save(root, 3, complete=False)  # a save killed half way: no marker
    assert [Path(str(p)).name for p in ckpt.list_checkpoints(root)] == ["step-00000001",
                                                                       "step-00000002"]
    save(root, 4)
    save(root, 5, complete=False)  # newer than the newest complete one: left for a rerun
    names = [Path(str(p)).name for p in ckpt.list_checkpoints(root)]
    assert names == ["step-00000002", "step-00000004"]  # keep_last=2; step 3's leftovers gone
    assert not storage.exists(storage.join(root, "step-00000003", "rank-00000.pt"))
    assert not storage.exists(storage.join(root, "step-00000001", "model.safetensors"))
    assert str(ckpt.find_resume(root, "auto")).endswith("step-00000004")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.find_resume(storage.join(root, "step-00000005"), "x")  # a path, not auto
    state = ckpt.load_checkpoint(ckpt.find_resume(root, "auto"), rank=0)
    assert torch.equal(state["model"]["w"], torch.full((2,), 4.0))
    assert state["trainer"]["step"] == 4 and state["data"] == {"num_slots": 1, "slots": {}}
    with pytest.raises(FileNotFoundError, match="rank-00001.pt is missing"):
        ckpt.load_checkpoint(ckpt.find_resume(root, "auto"), rank=1)
    ckpt.begin(ckpt.checkpoint_path(root, 4))  # rewriting step 4: it stops counting first
    assert [Path(str(p)).name for p in ckpt.list_checkpoints(root)] == ["step-00000002"]
    assert not storage.exists(storage.join(root, "step-00000004", "rank-00000.pt"))  # no stale rank


def test_train_on_s3_resume_and_export_equal_a_local_run(tmp_path, request):
    bucket = request.getfixturevalue("s3_bucket")
    local_data = tmp_path / "data"
    write_dataset(local_data, DatasetSpec(samples_per_shard=[4, 5, 3]))
    data = storage.join(bucket, "data")
    fs, inside = storage.filesystem(data)
    fs.put(str(local_data), inside, recursive=True)
    checkpoints = storage.join(bucket, "run", "checkpoints")
    common = ["--config", str(TINY), "--logging.tensorboard=false", "--data.batch_size=2",
              "--data.num_workers=2", "--checkpoint.every=1", "--checkpoint.keep_last=1",
              "--optim.schedule=constant", "--ema.decay=0.5"]

    straight = tmp_path / "straight"
    assert train_main([*common, f"--data.path={local_data}", f"--run.output_dir={straight}",
                       "--run.max_steps=3"]) == 0
    remote_run = [*common, f"--data.path={data}", f"--run.output_dir={tmp_path / 'remote'}",
                  f"--checkpoint.dir={checkpoints}"]
    assert train_main([*remote_run, "--run.max_steps=2"]) == 0
    assert ckpt.list_checkpoints(checkpoints) == [storage.join(checkpoints, "step-00000002")]
    assert train_main([*remote_run, "--run.max_steps=3"]) == 0  # resume=auto finds step 2

    expected, resumed = step_records(straight), step_records(tmp_path / "remote")
    for step in (1, 2, 3):
        assert resumed[step]["keys"] == expected[step]["keys"], step
        assert resumed[step]["loss"] == expected[step]["loss"], step  # bitwise on CPU
    last = storage.join(checkpoints, "step-00000003")
    assert ckpt.list_checkpoints(checkpoints) == [last]

    exported = storage.join(bucket, "export")
    assert export_main([last, exported]) == 0
    assert export_main([str(straight / "checkpoints" / "step-00000003"), str(tmp_path / "local")]) == 0
    names = sorted(f[len(exported) + 1:] for f in storage.list_files(exported))
    assert "transformer/config.json" in names
    for name in names:  # same weights, byte for byte, wherever they were trained and written
        assert storage.read_bytes(storage.join(exported, name)) == \
            (tmp_path / "local" / name).read_bytes(), name


def test_missing_checkpoint_on_s3_is_named(request, capsys):
    bucket = request.getfixturevalue("s3_bucket")
    missing = storage.join(bucket, "nothing", "step-00000001")
    assert export_main([missing, storage.join(bucket, "out")]) == 2
    assert missing in capsys.readouterr().err
