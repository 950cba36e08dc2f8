"""The order in which a reader slot visits samples, computed from the shard indices alone.

A slot is one (rank, worker) pair: slot = rank * workers + worker, of S = ranks * workers.
Every epoch permutes the shards with (seed, epoch); the permuted list is cut into units and
unit u goes to slot u % S. When there are fewer shards than slots, each shard is cut into
k = ceil(S / shards) parts by sample index (part p holds positions p, p + k, ...), so every
slot has work and no rank waits forever on a collective.

Each slot streams its units epoch after epoch without end (training is counted in steps),
and a bucketer turns that stream into batches of one bucket shape: a batch is emitted when
its bucket holds `batch_size` samples, and the rest carries over into the next epoch, so no
sample is dropped and every batch is full. Because the plan depends only on the indices,
a resumed slot recomputes it to find exactly where batch n begins.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count

import torch


@dataclass(frozen=True, order=True)
class SampleRef:
    """One visit of one sample: ordered like the slot's stream (epoch, unit, position)."""

    epoch: int
    unit: int  # index of the unit in this slot's list for the epoch
    shard: int
    position: int  # index of the sample inside its shard


@dataclass(frozen=True)
class Unit:
    shard: int
    part: int
    parts: int


@dataclass(frozen=True)
class PlannedBatch:
    index: int  # n-th batch of this slot
    bucket: str
    refs: tuple[SampleRef, ...]


def epoch_units(num_shards: int, num_slots: int, slot: int, seed: int, epoch: int) -> list[Unit]:
    """The units that `slot` reads in `epoch`, in reading order."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_shards, generator=generator).tolist()
    parts = max(1, math.ceil(num_slots / num_shards))
    units = [Unit(shard, part, parts) for shard in order for part in range(parts)]
    return units[slot::num_slots]


def slot_stream(
    buckets_per_shard: list[list[str]], num_slots: int, slot: int, seed: int
) -> Iterator[tuple[SampleRef, str]]:
    """Every sample visit of `slot`, forever, with its bucket."""
    for epoch in count():
        visited = 0
        units = epoch_units(len(buckets_per_shard), num_slots, slot, seed, epoch)
        for unit_index, unit in enumerate(units):
            buckets = buckets_per_shard[unit.shard]
            for position in range(unit.part, len(buckets), unit.parts):
                visited += 1
                yield SampleRef(epoch, unit_index, unit.shard, position), buckets[position]
        if visited == 0:
            raise ValueError(
                f"reader slot {slot} of {num_slots} (ranks x workers) gets no samples from "
                f"{len(buckets_per_shard)} shard(s); use fewer data workers or more shards"
            )


@dataclass
class Bucketer:
    """Groups a stream into batches of one bucket each; remembers what it still holds."""

    batch_size: int
    pending: dict[str, list[SampleRef]] = field(default_factory=dict)
    emitted: int = 0
    last: SampleRef | None = None  # the last stream item consumed

    def batches(self, stream: Iterator[tuple[SampleRef, str]]) -> Iterator[PlannedBatch]:
        for ref, bucket in stream:
            self.last = ref
            held = self.pending.setdefault(bucket, [])
            held.append(ref)
            if len(held) == self.batch_size:
                del self.pending[bucket]
                self.emitted += 1
                yield PlannedBatch(self.emitted - 1, bucket, tuple(held))


@dataclass
class SlotPlan:
    """Batches of a slot from batch `start` on, and which stream items they still need."""

    batches: Iterator[PlannedBatch]
    resume_from: SampleRef | None  # earliest stream item that any coming batch needs
    needed_before: frozenset[SampleRef]  # items before the cut that coming batches hold
    cut: SampleRef | None  # items after this one are all needed


def plan_slot(
    buckets_per_shard: list[list[str]], num_slots: int, slot: int, seed: int,
    batch_size: int, start: int = 0,
) -> SlotPlan:
    """Replay the plan up to batch `start` (index-only, no data read) and continue from it."""
    bucketer = Bucketer(batch_size)
    batches = bucketer.batches(slot_stream(buckets_per_shard, num_slots, slot, seed))
    for _ in range(start):
        next(batches)
    held = frozenset(ref for refs in bucketer.pending.values() for ref in refs)
    resume_from = min(held) if held else None
    return SlotPlan(batches, resume_from, held, bucketer.last)
