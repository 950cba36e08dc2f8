"""Where shards run: in this process (tests, small runs) or on Ray (an actor pool per stage).

The Ray runner maps Ray Data over the list of shards still to do, with the stage living in a
pool of actors (`concurrency`, `num_cpus`, `num_gpus` from the config), so a model is loaded
once per actor and each actor writes whole shards atomically. Between tasks only shard paths
and manifests travel, never decoded arrays.
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
from pipeline.core.stage import ShardSpec, Stage, run_shard

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
    factory: StageFactory, shards: list[ShardSpec], stage_dir: Path, runner: RunnerConfig
) -> list[ShardManifest]:
    """Run every shard of a stage (skipping completed ones); return manifests in shard order."""
    Path(stage_dir).mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(stage_dir)  # a SIGKILLed run leaves them; shards redo anyway
    if not shards:
        return []
    if runner.backend == "ray":
        return _run_on_ray(factory, shards, Path(stage_dir), runner)
    return _run_locally(factory, shards, Path(stage_dir))


def _run_locally(factory: StageFactory, shards: list[ShardSpec], stage_dir: Path):
    stage = factory()
    stage.setup()
    manifests = []
    for shard in tqdm(shards, desc=stage.name, unit="shard"):
        manifest, _ = run_shard(stage, shard, stage_dir)
        manifests.append(manifest)
    return manifests


class _ShardWorker:
    """A Ray Data actor: builds the stage once, then runs whole shards."""

    def __init__(self, factory: StageFactory, stage_dir: str):
        self.stage = factory()
        self.stage.setup()
        self.stage_dir = Path(stage_dir)

    def __call__(self, batch: dict) -> dict:
        manifests = []
        for shard, inputs in zip(batch["shard"], batch["inputs"], strict=True):
            spec = ShardSpec(str(shard), {k: Path(v) for k, v in json.loads(inputs).items()})
            manifest, _ = run_shard(self.stage, spec, self.stage_dir)
            manifests.append(json.dumps(asdict(manifest)))
        return {"manifest": manifests}


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


def _run_on_ray(factory, shards, stage_dir, runner):
    import ray.data

    ensure_ray(runner.ray_address)
    items = [
        {"shard": s.shard, "inputs": json.dumps({k: str(v) for k, v in s.inputs.items()})}
        for s in shards
    ]
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _ShardWorker,
        fn_constructor_args=(factory, str(stage_dir)),
        batch_size=1,
        concurrency=runner.concurrency,
        num_cpus=runner.num_cpus,
        num_gpus=runner.num_gpus,
    )
    manifests = [ShardManifest(**json.loads(row["manifest"])) for row in dataset.take_all()]
    return sorted(manifests, key=lambda m: m.shard)
