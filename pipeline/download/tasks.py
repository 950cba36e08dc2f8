"""Independent tasks of the download stage (cutting URL-list parts, downloading shards) run in
this process, in a local process pool, or as Ray tasks with bounded submission.

Why not Ray Data here, as `pipeline/core/runners.py` does for model stages: a download shard
is one long network-bound task writing a tar, with nothing to load once per actor; plain Ray
tasks submitted `concurrency` at a time (ray.wait) give what is needed, which img2dataset
1.47's `ray_distributor` does not: at most `runner.concurrency` tasks in flight, each
reserving `runner.num_cpus`, and a failed task resubmitted up to `retries` times, with the
tasks that still failed reported instead of discarded.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class TaskResults:
    """Results by task index, and the tasks that failed every attempt (index -> last error)."""

    results: dict[int, Any] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    errors: dict[int, BaseException] = field(default_factory=dict)  # the exceptions themselves
    attempts: dict[int, int] = field(default_factory=dict)


def _call(fn: Callable[[Any], Any], item: Any) -> Any:
    return fn(item)


def _cause(error: BaseException) -> BaseException:
    """The task's own exception rather than Ray's wrapper (whose text repeats the traceback)."""
    return getattr(error, "cause", None) or error


def ray_map(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    concurrency: int,
    num_cpus: float = 1.0,
    retries: int = 0,
) -> TaskResults:
    """Run fn(item) as Ray tasks, at most `concurrency` in flight, each retried `retries` times.

    A task fails when fn raises or its worker dies; Ray's own retries are off
    (`max_retries=0`) so `retries` is the one count. Call after `ray.init` / `ensure_ray`.
    """
    import ray

    remote = ray.remote(num_cpus=num_cpus, max_retries=0)(_call)
    fn_ref = ray.put(fn)  # shipped once, not with every task
    queue = deque((i, 1) for i in range(len(items)))
    pending: dict[Any, tuple[int, int]] = {}
    out = TaskResults()
    while queue or pending:
        while queue and len(pending) < concurrency:
            index, attempt = queue.popleft()
            pending[remote.remote(fn_ref, items[index])] = (index, attempt)
        (ready, *_), _ = ray.wait(list(pending), num_returns=1)
        index, attempt = pending.pop(ready)
        out.attempts[index] = attempt
        try:
            out.results[index] = ray.get(ready)
        except (ray.exceptions.RayError, Exception) as e:  # noqa: BLE001 -- counted, reported
            error = _cause(e)
            if attempt <= retries:
                log.warning("task %d failed (attempt %d of %d), retrying: %s",
                            index, attempt, retries + 1, error)
                queue.append((index, attempt + 1))
            else:
                out.failed[index] = f"{type(error).__name__}: {error}"
                out.errors[index] = error
    return out


def map_in_order(
    fn: Callable[[Any], Any], items: Sequence[Any], processes: int = 0, ray_runner: Any = None
) -> list[Any]:
    """[fn(item) for item in items], on Ray (`ray_runner`: a RunnerConfig, no retries: these
    tasks are deterministic), in `processes` spawned processes, or in this process. The first
    error is raised, as the task raised it."""
    if not items:
        return []
    if ray_runner is not None:
        from pipeline.core.runners import ensure_ray

        ensure_ray(ray_runner.ray_address)
        done = ray_map(fn, items, ray_runner.concurrency, ray_runner.num_cpus, retries=0)
        if done.errors:
            raise done.errors[min(done.errors)]
        return [done.results[i] for i in range(len(items))]
    if processes > 1 and len(items) > 1:
        # spawn: the parent may hold threads (fetch pools, Ray); children import only this
        # package, not the caller's state
        with ProcessPoolExecutor(min(processes, len(items)), mp_context=get_context("spawn")) as pool:
            return list(pool.map(fn, items))
    return [fn(item) for item in items]
