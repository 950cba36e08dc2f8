"""Start-up independent of dataset size: a reader slot opens only the indexes of the shards
it reads, when it reaches them, and resumes from a saved plan state without replaying."""

from __future__ import annotations

import itertools
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from shard_factory import DatasetSpec, write_dataset
from train_helpers import single_thread  # noqa: F401 (fixture)

from train.config import DataConfig
from train.data import DataPosition, ShardBatches, ShardError
from train.shard_order import epoch_units

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("single_thread")]
SHARDS, PER_SHARD, RANKS, WORKERS = 40, 3, 2, 2
SLOTS = RANKS * WORKERS


@pytest.fixture(scope="module")
def forty(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("forty")
    write_dataset(root, DatasetSpec(samples_per_shard=[PER_SHARD] * SHARDS, seed=3))
    return root


def slot_reader(path: Path, slot: int, position=None, batch_size: int = 1):
    """The reader of `slot` (on resume, the DataLoader worker that reads it is rotated)."""
    config = DataConfig(path=str(path), batch_size=batch_size, num_workers=WORKERS)
    dataset = ShardBatches(config, slot // WORKERS, RANKS, position)
    return next(r for r in map(dataset.reader, range(WORKERS)) if r.slot == slot)


def own_shards(slot: int, epoch: int = 0) -> set[int]:
    return {u.shard for u in epoch_units(SHARDS, SLOTS, slot, 0, epoch)}


def test_each_slot_opens_only_its_own_shards_indexes_once(forty):
    per_epoch = SHARDS // SLOTS * PER_SHARD  # batch_size 1: one epoch of the slot, no more
    opened = {}
    for slot in range(SLOTS):
        reader = slot_reader(forty, slot)
        batches = reader.batches()
        next(batches)
        assert sum(reader.indexes.reads.values()) == 1  # start-up: one index, not forty
        for _ in range(per_epoch - 1):
            next(batches)
        assert set(reader.indexes.reads) == own_shards(slot), slot
        assert set(reader.indexes.reads.values()) == {1}
        opened[slot] = set(reader.indexes.reads)
    assert sorted(s for shards in opened.values() for s in shards) == list(range(SHARDS))


def test_a_slot_needs_no_file_of_the_shards_it_does_not_read(forty, tmp_path):
    # A copy of the dataset holding only slot 0's epoch-0 shards (and dataset.json): if start-up
    # or reading touched any other shard's index or tar, this would fail with its name.
    keys = lambda reader: [b["keys"] for b in itertools.islice(reader.batches(), 30)]  # noqa: E731
    expected = keys(slot_reader(forty, 0))
    for item in forty.rglob("*"):
        relative = item.relative_to(forty)
        stem = relative.name.split(".")[0]
        if item.is_dir() or (relative.parts[0] == "shards" and int(stem) not in own_shards(0)):
            continue
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(item.read_bytes())
    assert len(list((tmp_path / "shards").glob("*.parquet"))) == SHARDS // SLOTS
    assert keys(slot_reader(tmp_path, 0)) == expected


def test_resume_from_the_saved_plan_state_reads_only_what_coming_batches_need(forty):
    straight = list(itertools.islice(slot_reader(forty, 1, batch_size=2).batches(), 40))
    position = DataPosition(SLOTS)
    for batch in straight[:24]:  # into epoch 1, with a sample of an earlier unit pending
        position.record(batch)
    state = position.state_dict()
    plan = state["slots"]["1"]["plan"]
    pending = {ref[2] for refs in plan["pending"].values() for ref in refs}
    assert pending and plan["last"][:2] == [1, 6]
    resumed_reader = slot_reader(forty, 1, position=state, batch_size=2)
    resumed = resumed_reader.batches()
    assert next(resumed)["keys"] == straight[24]["keys"]
    reads = sum(resumed_reader.indexes.reads.values())
    assert pending <= set(resumed_reader.indexes.reads) and reads <= len(pending) + 2
    assert [b["keys"] for b in itertools.islice(resumed, 15)] == [b["keys"] for b in straight[25:]]

    # A position without a plan state (older checkpoints) replays the plan: same batches,
    # but every index the slot passed is read again.
    del state["slots"]["1"]["plan"]
    replay_reader = slot_reader(forty, 1, position=state, batch_size=2)
    assert next(replay_reader.batches())["keys"] == straight[24]["keys"]
    assert sum(replay_reader.indexes.reads.values()) >= SHARDS // SLOTS + 5 > reads


def test_an_index_that_disagrees_with_the_manifest_is_named(tmp_path):
    write_dataset(tmp_path, DatasetSpec(samples_per_shard=[3, 3], buckets=[(64, 64)]))
    index = tmp_path / "shards/00001.parquet"
    pq.write_table(pq.read_table(index).slice(0, 2), index)
    reader = ShardBatches(DataConfig(path=str(tmp_path), batch_size=1)).reader(0)
    with pytest.raises(ShardError, match=r"00001.tar .* holds 2 samples but dataset.json records 3"):
        list(itertools.islice(reader.batches(), 6))
