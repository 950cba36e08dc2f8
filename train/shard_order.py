"""The order in which a reader slot visits samples, computed from shard counts and buckets.

A slot is one (rank, worker) pair: slot = rank * workers + worker, of S = ranks * workers.
Every epoch permutes the shards with (seed, epoch); the permuted list is cut into units and
unit u goes to slot u % S. When there are fewer shards than slots, each shard is cut into
k = ceil(S / shards) parts by sample index (part p holds positions p, p + k, ...), so every
slot has work and no rank waits forever on a collective.

Each slot streams its units epoch after epoch without end (training is counted in steps),
and a bucketer turns that stream into batches of one bucket shape: a batch is emitted when
its bucket holds `batch_size` samples, and the rest carries over into the next epoch, so no
sample is dropped and every batch is full.

What the plan needs up front is only each shard's sample count (the dataset manifest has
it); a shard's per-sample buckets are asked for when the slot's stream reaches that shard,
so a slot reads only the indexes of the shards it visits, when it visits them. The
bucketer's state after each batch (`PlanState`: the last stream item and the samples still
pending) is small and saved with checkpoints; a resumed slot continues from it without
replaying the stream. Without a saved state the plan is replayed from batch 0 (exact too,
but it reads every index the slot visited so far).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import count
from typing import Any

import torch


@dataclass(frozen=True, order=True)
class SampleRef:
    """One visit of one sample: ordered like the slot's stream (epoch, unit, position)."""

    epoch: int
    unit: int  # index of the unit in this slot's list for the epoch
    shard: int
    position: int  # index of the sample inside its shard

    def to_list(self) -> list[int]:
        return [self.epoch, self.unit, self.shard, self.position]


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
    state: PlanState | None = None  # the bucketer right after this batch (for checkpoints)


@dataclass(frozen=True)
class ShardTable:
    """What the plan knows of the shards: sample counts up front, buckets when reached."""

    counts: Sequence[int]
    buckets: Callable[[int], Sequence[str]]  # shard -> bucket of each position, in order

    @classmethod
    def of(cls, buckets_per_shard: Sequence[Sequence[str]]) -> ShardTable:
        """A table held in memory (tests, small datasets)."""
        return cls([len(b) for b in buckets_per_shard], buckets_per_shard.__getitem__)


def epoch_units(num_shards: int, num_slots: int, slot: int, seed: int, epoch: int) -> list[Unit]:
    """The units that `slot` reads in `epoch`, in reading order."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_shards, generator=generator).tolist()
    parts = max(1, math.ceil(num_slots / num_shards))
    units = [Unit(shard, part, parts) for shard in order for part in range(parts)]
    return units[slot::num_slots]


def slot_units(
    counts: Sequence[int], num_slots: int, slot: int, seed: int, after: SampleRef | None = None
) -> Iterator[tuple[int, int, Unit, range]]:
    """(epoch, unit index, unit, positions) of `slot`, forever, strictly after `after`."""
    first_epoch = after.epoch if after else 0
    for epoch in count(first_epoch):
        units = epoch_units(len(counts), num_slots, slot, seed, epoch)
        if not any(range(u.part, counts[u.shard], u.parts) for u in units):
            raise ValueError(
                f"reader slot {slot} of {num_slots} (ranks x workers) gets no samples from "
                f"{len(counts)} shard(s); use fewer data workers or more shards"
            )
        first_unit = after.unit if after and epoch == after.epoch else 0
        for index in range(first_unit, len(units)):
            unit = units[index]
            start = unit.part
            if after and (epoch, index) == (after.epoch, after.unit):
                start = after.position + unit.parts
            positions = range(start, counts[unit.shard], unit.parts)
            if positions:
                yield epoch, index, unit, positions


def slot_stream(
    shards: ShardTable, num_slots: int, slot: int, seed: int, after: SampleRef | None = None
) -> Iterator[tuple[SampleRef, str]]:
    """Every sample visit of `slot` after `after`, forever, with its bucket."""
    for epoch, index, unit, positions in slot_units(shards.counts, num_slots, slot, seed, after):
        buckets = shards.buckets(unit.shard)
        for position in positions:
            yield SampleRef(epoch, index, unit.shard, position), buckets[position]


@dataclass(frozen=True)
class PlanState:
    """The bucketer after `emitted` batches: what a resumed slot needs to continue exactly."""

    emitted: int
    last: SampleRef | None  # the last stream item consumed
    pending: dict[str, tuple[SampleRef, ...]]  # per bucket, samples waiting for a full batch

    def to_json(self) -> dict[str, Any]:
        return {"emitted": self.emitted, "last": self.last.to_list() if self.last else None,
                "pending": {b: [r.to_list() for r in refs] for b, refs in self.pending.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PlanState:
        last = SampleRef(*data["last"]) if data["last"] is not None else None
        pending = {b: tuple(SampleRef(*r) for r in refs) for b, refs in data["pending"].items()}
        return cls(int(data["emitted"]), last, pending)


@dataclass
class Bucketer:
    """Groups a stream into batches of one bucket each; remembers what it still holds."""

    batch_size: int
    pending: dict[str, list[SampleRef]] = field(default_factory=dict)
    emitted: int = 0
    last: SampleRef | None = None  # the last stream item consumed

    @classmethod
    def restore(cls, batch_size: int, state: PlanState) -> Bucketer:
        pending = {b: list(refs) for b, refs in state.pending.items()}
        return cls(batch_size, pending, state.emitted, state.last)

    def state(self) -> PlanState:
        return PlanState(self.emitted, self.last, {b: tuple(r) for b, r in self.pending.items()})

    def batches(self, stream: Iterator[tuple[SampleRef, str]]) -> Iterator[PlannedBatch]:
        for ref, bucket in stream:
            self.last = ref
            held = self.pending.setdefault(bucket, [])
            held.append(ref)
            if len(held) == self.batch_size:
                del self.pending[bucket]
                self.emitted += 1
                yield PlannedBatch(self.emitted - 1, bucket, tuple(held), self.state())


@dataclass
class SlotPlan:
    """Batches of a slot from batch `start` on, and which stream items they still need."""

    batches: Iterator[PlannedBatch]
    resume_from: SampleRef | None  # earliest stream item that any coming batch needs
    needed_before: frozenset[SampleRef]  # items before the cut that coming batches hold
    cut: SampleRef | None  # items after this one are all needed


def plan_slot(
    shards: ShardTable | Sequence[Sequence[str]], num_slots: int, slot: int, seed: int,
    batch_size: int, start: int = 0, state: PlanState | None = None,
) -> SlotPlan:
    """The plan of `slot` from batch `start` on: continued from a saved `state` of batch
    `start`, or else replayed from batch 0 (reading no data, only the indexes it passes)."""
    if not isinstance(shards, ShardTable):
        shards = ShardTable.of(shards)
    if state is not None:
        if state.emitted != start:
            raise ValueError(f"the saved plan state of slot {slot} is at batch {state.emitted}, "
                             f"its data position at batch {start}")
        bucketer = Bucketer.restore(batch_size, state)
        batches = bucketer.batches(slot_stream(shards, num_slots, slot, seed, after=state.last))
    else:
        bucketer = Bucketer(batch_size)
        batches = bucketer.batches(slot_stream(shards, num_slots, slot, seed))
        for _ in range(start):
            next(batches)
    held = frozenset(ref for refs in bucketer.pending.values() for ref in refs)
    resume_from = min(held) if held else None
    return SlotPlan(batches, resume_from, held, bucketer.last)
