"""Checkpoints that make resume exact, on local disk or an object store, last N kept.

Layout of ROOT/step-00000123/ (ROOT = checkpoint.dir, by default OUTPUT_DIR/checkpoints; a
local path or an fsspec URL such as s3://bucket/run/checkpoints):
  model.safetensors, ema.safetensors     weights (fp32 master weights, fp32 EMA)
  model_config.json                      MMDiTConfig, to rebuild the network for export
  optimizer.pt, scheduler.pt             state dicts (plain tensors, loaded weights_only)
  rank-00000.pt                          per rank: every RNG state and the data position
  trainer.json                           step, counters, config hash: written last
Every file is written locally and published whole (a rename on disk, one upload on an object
store, pipeline/core/storage.py). trainer.json is the marker: rank 0 writes it after every
rank has published its files, and it is the first file removed when a checkpoint is
rewritten or pruned, so a folder without it is incomplete and ignored; a killed run leaves
the previous checkpoint usable and never passes off half of a new one.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.core import storage

PREFIX = "step-"
MARKER = "trainer.json"
Location = str | Path  # a Path means local disk; a str may also be a URL


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def checkpoint_path(root: Location, step: int) -> Location:
    return _child(root, checkpoint_name(step))


def _child(root: Location, name: str) -> Location:
    """root/name, of the same kind as root (so local callers keep getting Paths)."""
    return root / name if isinstance(root, Path) else storage.join(root, name)


def _step_folders(root: Location) -> tuple[dict[int, str], set[int]]:
    """{step: folder name} of every step-N folder under root, and the steps whose marker
    exists. One listing, which on an object store is one request per 1,000 keys."""
    try:
        files = storage.list_files(root)
    except storage.MissingPath:
        return {}, set()
    # listed files keep a URL's scheme; plain local paths come back absolute
    base = storage.join(root if storage.scheme(root) else storage.filesystem(root)[1], "")
    folders, complete = {}, set()
    for file in files:
        parts = file[len(base):].split("/") if file.startswith(base) else []
        if len(parts) == 2 and parts[0].startswith(PREFIX) and parts[0][len(PREFIX):].isdigit():
            step = int(parts[0][len(PREFIX):])
            folders[step] = parts[0]
            if parts[1] == MARKER:
                complete.add(step)
    return folders, complete


def list_checkpoints(root: Location) -> list[Location]:
    """Complete checkpoints under `root`, oldest first."""
    folders, complete = _step_folders(root)
    return [_child(root, folders[step]) for step in sorted(complete)]


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


def _write(path: Location, save: Callable[[Path], None]) -> None:
    """Save to a local temporary with `save(tmp)`, then publish it whole at `path`."""
    with storage.staged(path) as tmp:
        save(tmp)


def begin(checkpoint: Location) -> None:
    """Rank 0, before any rank writes: whatever an earlier save of this step left (a complete
    checkpoint before a resume, or a killed save, perhaps with more ranks) goes, marker first."""
    delete_checkpoint(checkpoint)


def write_shared(checkpoint: Location, model_state: dict, ema_state: dict | None,
                 model_config: dict, optimizer_state: dict, scheduler_state: dict) -> None:
    """The replicated parts (rank 0 only)."""
    model = {k: v.detach().cpu().contiguous() for k, v in model_state.items()}
    _write(_child(checkpoint, "model.safetensors"), lambda tmp: save_file(model, str(tmp)))
    if ema_state is not None:
        ema = {k: v.cpu() for k, v in ema_state.items()}
        _write(_child(checkpoint, "ema.safetensors"), lambda tmp: save_file(ema, str(tmp)))
    storage.write_bytes_atomic(_child(checkpoint, "model_config.json"),
                               json.dumps(model_config, indent=1).encode())
    _write(_child(checkpoint, "optimizer.pt"), lambda tmp: torch.save(optimizer_state, tmp))
    _write(_child(checkpoint, "scheduler.pt"), lambda tmp: torch.save(scheduler_state, tmp))


def write_rank(checkpoint: Location, rank: int, rng: dict, data_position: dict) -> None:
    state = {"rng": rng, "data": json.dumps(data_position)}  # the position as text: no pickle
    _write(_child(checkpoint, f"rank-{rank:05d}.pt"), lambda tmp: torch.save(state, tmp))


def finish(root: Location, step: int, trainer: dict, keep_last: int) -> Location:
    """Rank 0, after every rank published its files: write the marker, prune old ones."""
    final = checkpoint_path(root, step)
    storage.write_bytes_atomic(_child(final, MARKER), json.dumps(trainer, indent=1).encode())
    prune(root, keep_last)
    return final


def prune(root: Location, keep_last: int) -> None:
    """Delete complete checkpoints but the newest `keep_last`, and incomplete folders older
    than the newest complete one (what killed saves left). Incomplete folders newer than it
    are left: a rerun overwrites them when it gets there."""
    folders, complete = _step_folders(root)
    if not complete:
        return
    newest = max(complete)
    kept = set(sorted(complete)[-keep_last:]) if keep_last > 0 else set(complete)
    for step, name in folders.items():
        if step not in kept and (step in complete or step < newest):
            delete_checkpoint(_child(root, name))


def delete_checkpoint(checkpoint: Location) -> None:
    storage.remove(_child(checkpoint, MARKER))  # first: from here on it reads as incomplete
    if not storage.is_remote(checkpoint):
        shutil.rmtree(storage.filesystem(checkpoint)[1], ignore_errors=True)
        return
    try:
        files = storage.list_files(checkpoint)
    except storage.MissingPath:
        return
    for file in files:
        storage.remove(file)


def load_tensors(path: Location) -> dict[str, torch.Tensor]:
    with storage.local_copy(path) as local:
        return load_file(local)


def _torch_load(path: Location) -> Any:
    with storage.local_copy(path) as local:
        return torch.load(local, weights_only=True)  # tensors and plain containers only


def load_checkpoint(path: Location, rank: int) -> dict[str, Any]:
    """Everything a rank needs to resume; tensors only, nothing unpickled."""
    rank_file = _child(path, f"rank-{rank:05d}.pt")
    if not storage.exists(rank_file):
        raise FileNotFoundError(f"{rank_file} is missing: was {path} written with fewer ranks?")
    per_rank = _torch_load(rank_file)
    ema_file = _child(path, "ema.safetensors")
    return {
        "model": load_tensors(_child(path, "model.safetensors")),
        "ema": load_tensors(ema_file) if storage.exists(ema_file) else None,
        "optimizer": _torch_load(_child(path, "optimizer.pt")),
        "scheduler": _torch_load(_child(path, "scheduler.pt")),
        "trainer": json.loads(storage.read_bytes(_child(path, MARKER))),
        "rng": per_rank["rng"],
        "data": json.loads(per_rank["data"]),
    }


def find_resume(root: Location, resume: str) -> Location | None:
    """The checkpoint to resume from: 'auto' = latest complete one, 'none', or a path/URL."""
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(root)
        return found[-1] if found else None
    if not storage.exists(storage.join(resume, MARKER)):
        raise FileNotFoundError(f"checkpoint.resume={resume!r} is not a complete checkpoint "
                                f"(no {MARKER})")
    return resume
