"""Two CPU processes (gloo), with DDP or FSDP2, train like one process on the combined batch."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from ddp_train_check import TINY, fixed_problem
from safetensors.torch import load_file
from shard_factory import DatasetSpec, write_dataset
from train_helpers import REPO, finish, single_thread, start, step_records  # noqa: F401 (fixture)

from model.flow import RectifiedFlow
from train.config import load_train_config
from train.objective import flow_config, per_sample_loss
from train.optim import build_optimizer


def single_process_step(sections) -> dict[str, torch.Tensor]:
    model, data, t, noise = fixed_problem(sections)
    flow = RectifiedFlow(flow_config(sections["objective"]))
    optimizer = build_optimizer(model, sections["optim"])
    per_sample_loss(model, flow, data, t, noise).mean().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), sections["optim"].max_grad_norm)
    optimizer.step()
    return model.state_dict()


@pytest.mark.timeout(240)
@pytest.mark.usefixtures("single_thread")
def test_two_process_ddp_matches_one_process_on_the_combined_batch(tmp_path):
    dataset = tmp_path / "data"
    write_dataset(dataset, DatasetSpec(samples_per_shard=[6, 6, 6], buckets=[(64, 64)]))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--nnodes", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0",
               str(REPO / "tests" / "ddp_train_check.py"), str(dataset), str(tmp_path)]
    returncode, stderr = finish(start(command), timeout=200)
    assert returncode == 0, stderr[-4000:]

    sections = load_train_config(str(TINY), [f"--data.path={dataset}"])
    reference = single_process_step(sections)
    for kind in ("ddp", "fsdp"):
        stepped = load_file(tmp_path / f"{kind}_step.safetensors")
        assert stepped.keys() == reference.keys()
        for name, value in reference.items():
            torch.testing.assert_close(stepped[name], value, rtol=1e-5, atol=1e-6, msg=f"{kind} {name}")

    for run in ("ddp", "fsdp"):
        checkpoint = tmp_path / run / "checkpoints" / "step-00000003"
        assert (checkpoint / "rank-00000.pt").exists() and (checkpoint / "rank-00001.pt").exists()
        assert json.loads((checkpoint / "trainer.json").read_text())["world_size"] == 2
        logged = json.loads((tmp_path / run / "validation.jsonl").read_text().splitlines()[-1])
        assert logged["step"] == 3 and all(math.isfinite(v) for v in logged.values())
    assert (tmp_path / "fsdp" / "samples" / "step-00000003.png").exists()

    # FSDP resume: step 3 after resuming from checkpoint 2 repeats the uninterrupted step 3
    straight, resumed = step_records(tmp_path / "fsdp"), step_records(tmp_path / "fsdp_resumed")
    assert resumed[3]["loss"] == straight[3]["loss"] and resumed[3]["keys"] == straight[3]["keys"]
    final = [load_file(tmp_path / run / "checkpoints" / "step-00000003" / "ema.safetensors")
             for run in ("fsdp", "fsdp_resumed")]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
