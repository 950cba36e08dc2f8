"""Checkpoints that make resume exact, written atomically, last N kept.

Layout of CHECKPOINTS/step-000123/:
  model.safetensors, ema.safetensors     weights (fp32 master weights, fp32 EMA)
  model_config.json                      MMDiTConfig, to rebuild the network for export
  optimizer.pt, scheduler.pt             state dicts (plain tensors, loaded weights_only)
  rank-00000.pt                          per rank: every RNG state and the data position
  trainer.json                           step, counters, config hash
A checkpoint is written under a temporary name and renamed when complete, so a killed run
leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
            and p.name[len(PREFIX):].isdigit() and (p / "trainer.json").exists()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def rng_state(noise_generator: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": np_state[2], "numpy_gauss": [np_state[3], np_state[4]],
        "torch": torch.get_rng_state(),
        "noise": noise_generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], noise_generator: torch.Generator) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], *state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    noise_generator.set_state(state["noise"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def staging_dir(root: Path, step: int) -> Path:
    """Where all ranks write checkpoint `step` before rank 0 renames it into place."""
    return root / f".{checkpoint_name(step)}.partial"


def write_shared(staging: Path, model_state: dict, ema_state: dict | None, model_config: dict,
                 optimizer_state: dict, scheduler_state: dict, trainer: dict) -> None:
    """The replicated parts (rank 0 only)."""
    save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()},
              staging / "model.safetensors")
    if ema_state is not None:
        save_file({k: v.cpu() for k, v in ema_state.items()}, staging / "ema.safetensors")
    (staging / "model_config.json").write_text(json.dumps(model_config, indent=1))
    torch.save(optimizer_state, staging / "optimizer.pt")
    torch.save(scheduler_state, staging / "scheduler.pt")
    (staging / "trainer.json.tmp").write_text(json.dumps(trainer, indent=1))


def write_rank(staging: Path, rank: int, rng: dict, data_position: dict) -> None:
    torch.save({"rng": rng, "data": json.dumps(data_position)}, staging / f"rank-{rank:05d}.pt")


def publish(root: Path, staging: Path, step: int, keep_last: int) -> Path:
    """Rank 0, after every rank wrote: mark complete, rename into place, prune old ones."""
    os.replace(staging / "trainer.json.tmp", staging / "trainer.json")
    final = root / checkpoint_name(step)
    if final.exists():  # a rerun of the same step after a resume
        shutil.rmtree(final)
    os.replace(staging, final)
    for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, rank: int) -> dict[str, Any]:
    """Everything a rank needs to resume; tensors only, nothing unpickled."""
    rank_file = path / f"rank-{rank:05d}.pt"
    if not rank_file.exists():
        raise FileNotFoundError(f"{rank_file} is missing: was {path} written with fewer ranks?")
    per_rank = torch.load(rank_file, weights_only=True)
    ema_file = path / "ema.safetensors"
    return {
        "model": load_file(path / "model.safetensors"),
        "ema": load_file(ema_file) if ema_file.exists() else None,
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True),
        "scheduler": torch.load(path / "scheduler.pt", weights_only=True),
        "trainer": json.loads((path / "trainer.json").read_text()),
        "rng": per_rank["rng"],
        "data": json.loads(per_rank["data"]),
    }


def find_resume(root: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: 'auto' = latest complete one, 'none', or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "trainer.json").exists():
        raise FileNotFoundError(f"checkpoint.resume={resume!r} is not a complete checkpoint")
    return path
