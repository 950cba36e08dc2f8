"""Where shards run: in this process (tests, small runs) or on Ray (an actor pool per stage).

The Ray runner maps Ray Data over the list of shards still to do, with the stage living in a
pool of actors (`concurrency`, `num_cpus`, `num_gpus` from the config), so a model is loaded
once per actor and each actor writes whole shards atomically. Between tasks only shard paths
and manifests travel, never decoded arrays.

Planning happens on the driver, before any worker exists: `run_stage` reads the manifests,
keeps the shards that are done, and starts the stage (`setup`, the actor pool) only for the
rest, so a rerun with nothing to do loads no model. The whole stage runs under the run
directory's lock (pipeline/core/run_lock.py).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from pipeline.core.manifest import ShardManifest, remove_stale_temporaries
from pipeline.core.run_lock import run_lock
from pipeline.core.stage import ShardSpec, Stage, shard_done, write_shard

log = logging.getLogger(__name__)
StageFactory = Callable[[], Stage]


@dataclass
class RunnerConfig:
    backend: Literal["local", "ray"] = "local"
    concurrency: int = 1  # actors (model stages) or parallel shard tasks
    num_cpus: float = 1.0  # per actor
    num_gpus: float = 0.0  # per actor; fractions share a GPU
    ray_address: str | None = None  # None: RAY_ADDRESS if set (ray job submit), else embedded

    def __post_init__(self):
        if self.concurrency < 1:
            raise ValueError(f"concurrency = {self.concurrency} must be at least 1")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("num_cpus and num_gpus must not be negative")


def run_stage(
    factory: StageFactory,
    shards: list[ShardSpec],
    stage_dir: Path,
    runner: RunnerConfig,
    verify: bool = False,
) -> list[ShardManifest]:
    """Run every shard of a stage that is not done; return all manifests in shard order.

    `verify`: also re-hash the outputs of done shards against their recorded sha256.
    """
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(stage_dir.parent):
        remove_stale_temporaries(stage_dir)  # a SIGKILLed run leaves them; shards redo anyway
        fingerprint = factory().fingerprint()  # a bare stage: no setup, no model
        done, todo = plan_shards(shards, stage_dir, fingerprint, verify)
        log.info("%s: %d shards done, %d to run", stage_dir.name, len(done), len(todo))
        if todo and runner.backend == "ray":
            done += _run_on_ray(factory, todo, stage_dir, runner, fingerprint)
        elif todo:
            done += _run_locally(factory, todo, stage_dir, fingerprint)
    return sorted(done, key=lambda m: m.shard)


def plan_shards(
    shards: list[ShardSpec], stage_dir: Path, fingerprint: str, verify: bool = False
) -> tuple[list[ShardManifest], list[ShardSpec]]:
    """(manifests of the shards that are done, shards still to run), from manifests alone."""
    done, todo = [], []
    for shard in shards:
        manifest = shard_done(shard, stage_dir, fingerprint, verify)
        if manifest is None:
            todo.append(shard)
        else:
            done.append(manifest)
    return done, todo


def _run_locally(factory: StageFactory, shards: list[ShardSpec], stage_dir: Path, fingerprint: str):
    stage = factory()
    stage.setup()
    return [write_shard(stage, shard, stage_dir, fingerprint)
            for shard in tqdm(shards, desc=stage.name, unit="shard")]


class _ShardWorker:
    """A Ray Data actor: builds the stage once, then runs the whole shards it is given."""

    def __init__(self, factory: StageFactory, stage_dir: str, fingerprint: str):
        self.stage = factory()
        self.stage.setup()
        self.stage_dir, self.fingerprint = Path(stage_dir), fingerprint

    def __call__(self, batch: dict) -> dict:
        manifests = []
        for item in batch["shard"]:
            spec = _spec_from_json(item)
            manifest = write_shard(self.stage, spec, self.stage_dir, self.fingerprint)
            manifests.append(json.dumps(asdict(manifest)))
        return {"manifest": manifests}


def _spec_to_json(spec: ShardSpec) -> str:
    inputs = {k: str(v) for k, v in spec.inputs.items()}
    return json.dumps({"shard": spec.shard, "inputs": inputs, "checksums": spec.checksums})


def _spec_from_json(text: str) -> ShardSpec:
    data = json.loads(text)
    inputs = {k: Path(v) for k, v in data["inputs"].items()}
    return ShardSpec(data["shard"], inputs, data["checksums"])


def ensure_ray(address: str | None = None) -> None:
    """Connect to a cluster (explicit address or RAY_ADDRESS) or start an embedded Ray."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # An embedded Ray is a local service: keep every Ray process on loopback rather than
        # the host's network address.
        ray.init(include_dashboard=False, log_to_driver=True, _node_ip_address="127.0.0.1")


def _run_on_ray(factory, shards, stage_dir, runner, fingerprint):
    import ray.data

    ensure_ray(runner.ray_address)
    items = [{"shard": _spec_to_json(s)} for s in shards]
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _ShardWorker,
        fn_constructor_args=(factory, str(stage_dir), fingerprint),
        batch_size=1,
        concurrency=min(runner.concurrency, len(items)),  # no idle actors loading a model
        num_cpus=runner.num_cpus,
        num_gpus=runner.num_gpus,
    )
    return [ShardManifest(**json.loads(row["manifest"])) for row in dataset.take_all()]
