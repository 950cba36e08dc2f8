"""Training batches from precomputed SD3 shards (docs/formats.md, "Training shards").

Each DataLoader worker of each rank is one reader slot (see shard_order.py). It follows its
slot's plan: it streams the planned shards with webdataset's tar iterator, keeps the raw
entries of samples that a coming batch needs, and, when a batch is complete, decodes it:
latents normalised with the manifest's VAE factors, one caption variant per sample, each
text encoder zeroed independently (encoder dropout) and the SD3 context assembled.
Random choices come from a generator seeded by (seed, epoch, uid), so they do not depend on
which worker read the sample and a resumed run makes the same ones without saved RNG state.

Start-up reads only the dataset manifest: the plan takes per-shard sample counts from it, and
a slot opens a shard's Parquet index (uids and buckets) only when its stream reaches that
shard, so a slot never reads the indexes of shards other slots read, and the cost of
starting does not grow with the dataset.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq
import torch
import webdataset.tariterators as wds_tar
from safetensors.torch import load as load_safetensors
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.core import storage
from pipeline.encode.training_shards import (
    MANIFEST_NAME,
    NULL_PROMPT_NAME,
    DatasetManifest,
    npy_to_tensor,
    text_entry,
)
from train.config import DataConfig
from train.shard_order import (
    PlannedBatch,
    PlanState,
    SampleRef,
    ShardTable,
    SlotPlan,
    plan_slot,
    slot_units,
)

log = logging.getLogger(__name__)
ENCODERS = {"clip_l": ("clip_l", "clip_l_pooled"), "clip_g": ("clip_g", "clip_g_pooled"),
            "t5": ("t5",)}


class ShardError(RuntimeError):
    """A shard that cannot be read or disagrees with its index; the message names it."""


def bucket_key(value: Any) -> str:
    """'HxW' from the index's bucket column, stored either as 'HxW' or as [h, w]."""
    return value if isinstance(value, str) else f"{int(value[0])}x{int(value[1])}"


def read_shard_index(dataset: str, shard_name: str) -> tuple[list[str], list[str]]:
    """(uids, buckets) in tar order from the Parquet index beside the shard."""
    url = storage.join(dataset, shard_name.removesuffix(".tar") + ".parquet")
    try:
        with storage.open_file(url, "rb") as f:
            table = pq.read_table(f, columns=["uid", "bucket"])
    except Exception as e:
        raise ShardError(f"cannot read the index {url} of shard {shard_name}: {e}") from e
    return table.column("uid").to_pylist(), [bucket_key(b) for b in table.column("bucket").to_pylist()]


@dataclass
class ShardIndex:
    uids: list[str]
    buckets: list[str]


class ShardIndexes:
    """The indexes of the shards one slot reaches, read on first use, the last few kept.

    The plan asks for a shard's buckets a little before the reader asks for its uids, so a
    small cache serves both from one read; a shard the cache has dropped is read again.
    """

    def __init__(self, dataset: str, manifest: DatasetManifest, keep: int = 64):
        self.dataset, self.manifest, self.keep = dataset, manifest, keep
        self.cache: OrderedDict[int, ShardIndex] = OrderedDict()
        self.reads: Counter[int] = Counter()  # shard -> index reads (start-up cost, tested)
        self.counts = [s.samples for s in manifest.shards]

    def get(self, shard: int) -> ShardIndex:
        if shard in self.cache:
            self.cache.move_to_end(shard)
            return self.cache[shard]
        info = self.manifest.shards[shard]
        uids, buckets = read_shard_index(self.dataset, info.name)
        self.reads[shard] += 1
        if len(uids) != info.samples:
            raise ShardError(f"the index of shard {info.name} in {self.dataset} holds {len(uids)} "
                             f"samples but {MANIFEST_NAME} records {info.samples}")
        self.cache[shard] = ShardIndex(uids, buckets)
        if len(self.cache) > self.keep:
            self.cache.popitem(last=False)
        return self.cache[shard]

    def table(self) -> ShardTable:
        return ShardTable(self.counts, lambda shard: self.get(shard).buckets)


def iterate_tar(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard: {'__key__': uid, entry name: bytes}. Errors name the shard."""
    try:
        with storage.open_file(url, "rb") as f:
            files = ({**entry, "__url__": url} for entry in wds_tar.tar_file_iterator(f))
            yield from wds_tar.group_by_keys(files)
    except Exception as e:
        raise ShardError(f"shard {url} is corrupt or unreadable: {type(e).__name__}: {e}") from e


def sample_generator(seed: int, epoch: int, uid: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{epoch}/{uid}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


@dataclass
class SampleDecoder:
    """Turns the raw entries of one sample into (latent, context, pooled) training tensors."""

    manifest: DatasetManifest
    config: DataConfig
    null_prompt: dict[str, torch.Tensor] | None = None

    def latent(self, raw: dict[str, bytes], gen: torch.Generator) -> torch.Tensor:
        dtype, vae = self.manifest.latent_dtype, self.manifest.vae
        z = npy_to_tensor(raw["latent_mean.npy"], dtype).float()  # (16, h, w)
        if self.config.sample_posterior and "latent_std.npy" in raw:
            std = npy_to_tensor(raw["latent_std.npy"], dtype).float()
            z = z + std * torch.randn(z.shape, generator=gen)
        return (z - vae.shift_factor) * vae.scaling_factor

    def variant(self, gen: torch.Generator) -> str:
        variants = self.manifest.variants
        if "synthetic" not in variants or "original" not in variants:
            return variants[0]
        synthetic = torch.rand((), generator=gen).item() < self.config.synthetic_caption_prob
        return "synthetic" if synthetic else "original"

    def text(self, raw: dict[str, bytes], variant: str, gen: torch.Generator) -> dict:
        # Kept in the stored half precision: half the bytes to collate and copy to the device,
        # where the trainer casts to fp32.
        dtype = self.manifest.text_dtype
        parts = {}
        for components in ENCODERS.values():
            dropped = torch.rand((), generator=gen).item() < self.config.encoder_dropout
            for name in components:
                tensor = npy_to_tensor(raw[text_entry(variant, name)], dtype)
                if dropped:
                    fill = self.null_prompt
                    tensor = fill[name].to(tensor.dtype) if fill is not None else torch.zeros_like(tensor)
                parts[name] = tensor
        return parts

    def decode(self, raw: dict[str, bytes], epoch: int, uid: str) -> dict[str, torch.Tensor]:
        gen = sample_generator(self.config.seed, epoch, uid)
        variant = self.variant(gen)
        latent = self.latent(raw, gen)
        context, pooled = assemble_context(self.text(raw, variant, gen))
        return {"latent": latent, "context": context, "pooled": pooled}


def assemble_context(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's context [pad(cat(clip_l, clip_g), D_t5) ; t5] (77 + T, D_t5) and pooled vector."""
    clip = torch.cat([parts["clip_l"], parts["clip_g"]], dim=-1)  # (77, D_l + D_g)
    t5 = parts["t5"]  # (T, D_t5)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # (77, D_t5)
    pooled = torch.cat([parts["clip_l_pooled"], parts["clip_g_pooled"]], dim=-1)
    return torch.cat([clip, t5], dim=0), pooled


@dataclass
class SlotReader:
    """Executes one slot's plan over the real shards (one DataLoader worker)."""

    dataset: str
    manifest: DatasetManifest
    indexes: ShardIndexes
    decoder: SampleDecoder
    config: DataConfig
    slot: int
    num_slots: int
    start: int = 0
    plan_state: PlanState | None = None  # the plan at batch `start`, from a checkpoint
    bad_shards: set[str] = field(default_factory=set)
    missing: int = 0

    def batches(self) -> Iterator[dict[str, Any]]:
        plan = plan_slot(self.indexes.table(), self.num_slots, self.slot, self.config.seed,
                         self.config.batch_size, self.start, self.plan_state)
        stream = self._stream(plan)
        held: dict[SampleRef, dict[str, bytes] | None] = {}
        for planned in plan.batches:
            samples = []
            for ref in planned.refs:
                while ref not in held:
                    item_ref, raw = next(stream)
                    held[item_ref] = raw
                raw = held.pop(ref)
                if raw is not None:
                    samples.append((ref, raw))
            batch = self._collate(planned, samples) if samples else None
            if batch is not None:
                yield batch

    def _stream(self, plan: SlotPlan) -> Iterator[tuple[SampleRef, dict[str, bytes] | None]]:
        """(ref, raw entries or None when unreadable) of every needed item, in stream order:
        first what coming batches hold from before the cut, then everything after it."""
        by_unit: dict[tuple[int, int], list[SampleRef]] = {}
        for ref in sorted(plan.needed_before):
            by_unit.setdefault((ref.epoch, ref.unit), []).append(ref)
        cut_unit = (plan.cut.epoch, plan.cut.unit) if plan.cut else None
        tail = by_unit.pop(cut_unit, [])  # read with the rest of its unit: one pass per tar
        for refs in by_unit.values():
            yield from self._read_unit(refs[0].shard, refs)
        for epoch, index, unit, positions in slot_units(self.indexes.counts, self.num_slots, self.slot,
                                                        self.config.seed, plan.cut):
            refs = [SampleRef(epoch, index, unit.shard, p) for p in positions]
            if (epoch, index) == cut_unit:
                refs, tail = tail + refs, []
            if tail:
                yield from self._read_unit(tail[0].shard, tail)
                tail = []
            yield from self._read_unit(unit.shard, refs)

    def _read_unit(self, shard: int, refs: list[SampleRef]):
        name = self.manifest.shards[shard].name
        by_position = {r.position: r for r in refs}
        if name not in self.bad_shards:
            try:
                yield from self._read_positions(shard, name, by_position)
            except ShardError as e:
                if self.config.on_corrupt == "error":
                    raise
                log.warning("skipping corrupt shard (on_corrupt=skip): %s", e)
                self.bad_shards.add(name)
        for position in sorted(by_position):  # what could not be read: counted, not hidden
            self.missing += 1
            yield by_position.pop(position), None

    def _read_positions(self, shard: int, name: str, by_position: dict):
        uids = self.indexes.get(shard).uids
        last = max(by_position)
        for position, raw in enumerate(iterate_tar(storage.join(self.dataset, name))):
            if position < len(uids) and raw["__key__"] != uids[position]:
                raise ShardError(f"shard {name}: sample {position} is {raw['__key__']!r} in the "
                                 f"tar but {uids[position]!r} in its index")
            if position in by_position:
                yield by_position.pop(position), raw
            if position >= last:
                return
        if by_position:
            raise ShardError(f"shard {name} ends before sample {min(by_position)} of its index")

    def _collate(self, planned: PlannedBatch, samples: list) -> dict[str, Any] | None:
        decoded, keys = [], []
        for ref, raw in samples:
            uid = raw["__key__"]
            try:
                decoded.append(self.decoder.decode(raw, ref.epoch, uid))
            except Exception as e:
                error = ShardError(f"shard {self.manifest.shards[ref.shard].name}: sample {uid} "
                                   f"cannot be decoded: {type(e).__name__}: {e}")
                if self.config.on_corrupt == "error":
                    raise error from e
                log.warning("skipping a sample (on_corrupt=skip): %s", error)
                self.missing += 1
                continue
            keys.append(uid)
        if not decoded:
            return None
        batch = {name: torch.stack([d[name] for d in decoded]) for name in decoded[0]}
        return {**batch, "keys": keys, "bucket": planned.bucket, "slot": self.slot,
                "batch_index": planned.index, "bad_shards": sorted(self.bad_shards),
                "missing": self.missing, "plan": planned.state.to_json()}


class ShardBatches(IterableDataset):
    """The batches of one rank; each DataLoader worker reads its own slot."""

    def __init__(self, config: DataConfig, rank: int = 0, world_size: int = 1,
                 position: dict[str, Any] | None = None):
        self.config, self.rank, self.world_size = config, rank, world_size
        self.manifest = DatasetManifest.load(config.path)
        self.workers = max(1, config.num_workers)
        self.num_slots = world_size * self.workers
        self.position = check_position(position, self.num_slots)
        self.null_prompt = load_null_prompt(config.path) if config.dropout_fill == "null_prompt" else None

    def reader(self, worker: int) -> SlotReader:
        slot = self.rank * self.workers + (worker + self._rotation()) % self.workers
        saved = self.position["slots"].get(str(slot), {})
        decoder = SampleDecoder(self.manifest, self.config, self.null_prompt)
        state = PlanState.from_json(saved["plan"]) if saved.get("plan") else None
        indexes = ShardIndexes(self.config.path, self.manifest)
        return SlotReader(self.config.path, self.manifest, indexes, decoder, self.config, slot,
                          self.num_slots, start=saved.get("batches", 0), plan_state=state,
                          bad_shards=set(saved.get("bad_shards", [])),
                          missing=saved.get("missing", 0))

    def _rotation(self) -> int:
        """The DataLoader takes batches from its workers in turn, starting with worker 0; on
        resume, worker 0 must read the slot whose turn was next, so slots are rotated."""
        slots = range(self.rank * self.workers, (self.rank + 1) * self.workers)
        taken = sum(self.position["slots"].get(str(s), {}).get("batches", 0) for s in slots)
        return taken % self.workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        return self.reader(info.id if info else 0).batches()


def load_null_prompt(dataset: str) -> dict[str, torch.Tensor]:
    return load_safetensors(storage.read_bytes(storage.join(dataset, NULL_PROMPT_NAME)))


def check_position(position: dict[str, Any] | None, num_slots: int) -> dict[str, Any]:
    """A saved data position, refused when it was written with another slot layout."""
    if not position:
        return {"num_slots": num_slots, "slots": {}}
    if position["num_slots"] != num_slots:
        raise ValueError(
            f"the checkpoint's data position was written with {position['num_slots']} reader "
            f"slots (ranks x workers) but this run has {num_slots}; exact resume needs the same"
        )
    return position


@dataclass
class DataPosition:
    """What a rank consumed: per slot, batches taken, shards found corrupt and the plan's
    state after the last batch taken (so that resume reads no index it does not need)."""

    num_slots: int
    slots: dict[str, dict[str, Any]] = field(default_factory=dict)

    def record(self, batch: dict[str, Any]) -> None:
        self.slots[str(batch["slot"])] = {
            "batches": int(batch["batch_index"]) + 1,
            "bad_shards": list(batch["bad_shards"]),
            "missing": int(batch["missing"]),
            "plan": batch["plan"],
        }

    def state_dict(self) -> dict[str, Any]:
        return {"num_slots": self.num_slots, "slots": dict(self.slots)}


def make_loader(dataset: ShardBatches) -> DataLoader:
    workers = dataset.config.num_workers
    return DataLoader(
        dataset, batch_size=None, num_workers=workers,
        prefetch_factor=dataset.config.prefetch_factor if workers else None,
        persistent_workers=False, in_order=True, pin_memory=torch.cuda.is_available(),
    )
