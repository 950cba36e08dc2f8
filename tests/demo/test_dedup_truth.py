"""Dedup checked against the shapes world's planted copies (demo/dedup_truth.py)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from demo.dedup_truth import dedup_against_truth


def _write(tmp_path, decisions):
    world = [{"id": "a", "duplicate_of": None}, {"id": "a2", "duplicate_of": "a"},
             {"id": "b", "duplicate_of": None}, {"id": "b2", "duplicate_of": "b"},
             {"id": "c", "duplicate_of": None}, {"id": "d", "duplicate_of": None}]
    pq.write_table(pa.Table.from_pylist(world), tmp_path / "urls.parquet")
    rows = [{"uid": uid, "dedup_representative": rep, "dedup_reason": reason}
            for uid, rep, reason in decisions]
    (tmp_path / "dedup").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "dedup" / "00000.parquet")
    return dedup_against_truth(tmp_path / "dedup", tmp_path / "urls.parquet")


def test_a_copy_dropped_for_its_source_is_right_and_a_distinct_image_is_not(tmp_path):
    truth = _write(tmp_path, [
        ("a", "a", None), ("a2", "a", "perceptual_duplicate"),  # the planted copy: right
        ("b", "b", None), ("b2", "b2", None),  # a planted pair dedup missed
        ("c", "c", None), ("d", "c", "perceptual_duplicate"),  # a distinct image lost
    ])
    assert (truth.dropped, truth.correct, truth.planted_pairs) == (2, 1, 2)
    assert truth.precision == pytest.approx(0.5) and truth.recall == pytest.approx(0.5)


def test_dropping_nothing_is_precise_and_finds_nothing(tmp_path):
    truth = _write(tmp_path, [(u, u, None) for u in ("a", "a2", "b", "b2", "c", "d")])
    assert truth.precision == 1.0 and truth.recall == 0.0
