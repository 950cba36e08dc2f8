"""The dedup step over Parquet tables of real photos, its outputs, resume and the CLI."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from decision_factory import publish, write_select_shard
from PIL import Image
from test_dedup_colour import COPIES, recoloured_scenes
from test_dedup_photos import EDITS, PHOTOS, descriptor, edited, jpeg, photo, signatures

from dedup.cli import main as dedup_main
from dedup.config import DedupConfig
from dedup.exact import sha256_hex
from dedup.stage import run_dedup, run_dedup_for_run
from pipeline.core.command import InputError
from pipeline.core.manifest import ShardManifest, shard_outputs

pytestmark = pytest.mark.timeout(60)

BEST_COPY = "coffee_resized"  # scored above its original, so it represents the group


def photo_rows():
    """(uid, jpeg bytes, descriptor, aesthetic) for originals, edited copies, one byte copy."""
    rows = []
    for name in PHOTOS:
        original = photo(name)
        data = jpeg(original)
        rows.append((name, data, descriptor(original), 5.0))
        for edit in EDITS:
            copy = edited(original, edit)
            uid = f"{name}_{edit}"
            rows.append((uid, jpeg(copy), descriptor(copy), 6.0 if uid == BEST_COPY else 4.0))
        if name == "astronaut":
            rows.append(("astronaut_bytes", data, descriptor(original), 5.0))
    return rows


def write_score_tables(folder, rows, files: int = 2) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    dim = len(rows[0][2])
    for k, part in enumerate(np.array_split(np.arange(len(rows)), files)):
        chunk = [rows[i] for i in part]
        embeddings = np.stack([r[2] for r in chunk]).astype(np.float16)
        flat = pa.array(embeddings.ravel(), pa.float16())
        table = pa.table({
            "uid": [r[0] for r in chunk],
            "image": pa.array([r[1] for r in chunk], pa.binary()),
            "score_image_embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
            "score_aesthetic": [r[3] for r in chunk],
        })  # fmt: skip
        pq.write_table(table, folder / f"{k:05d}.parquet")


@pytest.fixture(scope="module")
def score_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run") / "score"
    write_score_tables(folder, photo_rows())
    return folder


def photo_config(**changes) -> DedupConfig:
    # The 8x8 descriptor puts copies at >= 0.87 and different photos at <= 0.64.
    base = dict(semantic_threshold=0.8, n_clusters=3, sweep_thresholds=[0.8, 0.9, 0.95])
    return DedupConfig(**{**base, **changes})


def read_output(folder) -> dict[str, dict]:
    tables = [pq.read_table(p) for p in sorted(folder.glob("*.parquet"))]
    return {row["uid"]: row for row in pa.concat_tables(tables).to_pylist()}


def test_copies_are_dropped_with_their_reason_and_best_representative(score_dir, tmp_path):
    out = tmp_path / "dedup"
    result = run_dedup(photo_config(), score_dir, out)
    assert result.ran
    rows = read_output(out)
    assert len(rows) == len(PHOTOS) * (1 + len(EDITS)) + 1
    for name in PHOTOS:
        group = BEST_COPY if name == "coffee" else name
        members = [name] + [f"{name}_{e}" for e in EDITS]
        assert {rows[uid]["dedup_group"] for uid in members} == {group}, name
        assert [uid for uid in members if rows[uid]["dedup_status"] == "kept"] == [group]
    exact = rows["astronaut_bytes"]
    assert exact["dedup_reason"] == "exact_duplicate" and exact["dedup_method"] == "exact"
    assert exact["dedup_representative"] == "astronaut" and exact["dedup_similarity"] == 1.0
    # pHash catches resizes, recompression and colour shifts; crops fall to the semantic step.
    assert rows["camera_recompressed"]["dedup_reason"] == "perceptual_duplicate"
    assert all(rows[f"{n}_cropped"]["dedup_reason"] in ("near_duplicate", "perceptual_duplicate")
               for n in PHOTOS)  # fmt: skip
    assert any(rows[f"{n}_cropped"]["dedup_reason"] == "near_duplicate" for n in PHOTOS)
    for row in rows.values():  # what `rectiflow inspect` needs for every dropped row
        if row["dedup_status"] == "dropped":
            assert row["dedup_representative"] != row["uid"]
            assert 0.8 <= row["dedup_similarity"] <= 1.0
        else:
            assert row["dedup_reason"] is None and row["dedup_similarity"] is None
    coffee = rows["coffee"]
    assert coffee["dedup_status"] == "dropped" and coffee["dedup_representative"] == BEST_COPY
    manifest = result.manifest
    assert manifest.rows_out == len(PHOTOS) and sum(manifest.reasons.values()) == len(rows) - 12
    assert (out / "sweep.csv").exists() and (out / "sweep.png").stat().st_size > 1000


def test_rerun_skips_until_config_or_inputs_change(score_dir, tmp_path):
    out = tmp_path / "dedup"
    assert run_dedup(photo_config(), score_dir, out).ran
    assert not run_dedup(photo_config(), score_dir, out).ran
    stricter = run_dedup(photo_config(semantic_threshold=0.99, sweep=False), score_dir, out)
    assert stricter.ran and not (out / "sweep.csv").exists()  # no stale sweep left behind
    assert read_output(out)["chelsea_cropped"]["dedup_reason"] != "near_duplicate"


def test_keep_column_limits_who_takes_part(tmp_path):
    rows = photo_rows()[:5]  # astronaut and its 4 edits
    folder = tmp_path / "score"
    write_score_tables(folder, rows, files=1)
    table = pq.read_table(folder / "00000.parquet")
    keep = pa.array([True, False, True, True, True])
    pq.write_table(table.append_column("select_keep", keep), folder / "00000.parquet")
    run_dedup(photo_config(keep_column="select_keep"), folder, tmp_path / "dedup")
    out = read_output(tmp_path / "dedup")
    assert out["astronaut_resized"]["dedup_status"] is None  # not selected: not considered
    assert out["astronaut_recompressed"]["dedup_status"] == "dropped"


def test_cli_writes_resolved_config_and_rejects_bad_values(score_dir, tmp_path, capsys):
    out = tmp_path / "dedup"
    preset = tmp_path / "preset.toml"
    preset.write_text("[download]\nthreads = 4\n\n[dedup]\nn_clusters = 3\nsweep = false\n")
    argv = ["--input", str(score_dir), "--out", str(out), "--config", str(preset),
            "--dedup.semantic_threshold=0.8", "--dedup.semantic_mode=sd3"]  # fmt: skip
    assert dedup_main(argv) == 0
    resolved = (out / "config.resolved.toml").read_text()
    assert 'semantic_mode = "sd3"' in resolved and "n_clusters = 3" in resolved
    assert "kept" in capsys.readouterr().out
    assert read_output(out)["rocket_cropped"]["dedup_status"] == "dropped"
    for key, value in (("semantic_mode", "x"), ("colour_min_similarity", "1.5")):
        bad = dedup_main(["--input", str(score_dir), "--out", str(out), f"--dedup.{key}={value}"])
        assert bad == 2
        assert key in capsys.readouterr().err


def write_run_dir(run_dir, rows) -> None:
    """A run as the earlier stages leave it, each shard under its manifest: score tables
    without images, download tables with sha256, the images in a WebDataset tar, and
    select's per-shard decisions."""
    write_score_tables(run_dir / "staging", rows, files=1)
    table = pq.read_table(run_dir / "staging" / "00000.parquet").drop_columns(["image"])
    publish(run_dir / "score", "00000", {"00000.parquet": table})
    digests = [sha256_hex(data) for _, data, _, _ in rows]
    manifest = ShardManifest(stage="download", shard="00000", config_hash="test")
    with shard_outputs(run_dir / "download", manifest, {}) as outputs:
        pq.write_table(pa.table({"uid": [r[0] for r in rows], "download_sha256": digests}),
                       outputs.path("00000.parquet"))  # fmt: skip
        with tarfile.open(outputs.path("00000.tar"), "w") as tar:
            for uid, data, _, _ in rows:
                for name, blob in ((f"{uid}.jpg", data), (f"{uid}.json", b"{}")):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    # select dropped camera_resized
    write_select_shard(run_dir, "00000", {r[0]: r[0] != "camera_resized" for r in rows})


def test_run_dir_step_reads_download_hashes_images_and_selection(tmp_path):
    rows = [r for r in photo_rows() if r[0].split("_")[0] in ("astronaut", "camera")]
    write_run_dir(tmp_path, rows)
    config = photo_config(semantic=False, sweep=False)  # exact + pHash from the run's files
    result = run_dedup_for_run(config, tmp_path)
    out = read_output(tmp_path / "dedup")
    assert out["astronaut_bytes"]["dedup_reason"] == "exact_duplicate"
    assert out["astronaut_colour_shifted"]["dedup_reason"] == "perceptual_duplicate"
    assert out["camera_recompressed"]["dedup_representative"] == "camera"
    assert out["camera_resized"]["dedup_status"] is None  # not selected: not considered
    assert result.manifest.rows_in == len(rows) - 1
    assert not run_dedup_for_run(config, tmp_path).ran
    # The up-to-date check compares the checksums the upstream manifests recorded.
    assert set(result.manifest.inputs) == {"score/00000.parquet", "download/00000.parquet",
                                           "download/00000.tar", "select/00000.parquet"}
    assert result.manifest.outputs["00000.parquet"]  # what caption/encode k record for dedup k
    write_select_shard(tmp_path, "00000", {r[0]: True for r in rows})
    assert run_dedup_for_run(config, tmp_path).ran  # a changed selection redoes dedup


def test_a_select_without_a_score_shards_table_is_an_error(tmp_path):
    rows = [r for r in photo_rows() if r[0].split("_")[0] == "camera"]
    write_run_dir(tmp_path, rows)
    for path in (tmp_path / "select").iterdir():  # select ran, but for another shard only
        path.unlink()
    write_select_shard(tmp_path, "00001", {"elsewhere": True})
    with pytest.raises(InputError, match=r"select has no table for 1 score shard\(s\) \(00000\)"):
        run_dedup_for_run(photo_config(semantic=False, sweep=False), tmp_path)


def dropped_uids(rows: dict[str, dict]) -> set[str]:
    return {uid for uid, row in rows.items() if row["dedup_status"] == "dropped"}


def test_colour_check_keeps_recoloured_shapes_apart_but_drops_their_copies(tmp_path):
    encoded, uids, _ = recoloured_scenes()
    rows = [(uid, data, descriptor(Image.open(io.BytesIO(data))), 5.0)
            for uid, data in zip(uids, encoded, strict=True)]  # fmt: skip
    write_score_tables(tmp_path / "score", rows, files=1)
    config = photo_config(semantic=False, sweep=False)
    run_dedup(config, tmp_path / "score", tmp_path / "checked")
    checked = read_output(tmp_path / "checked")
    copies = {uid for uid in uids if uid.endswith(COPIES)}
    assert dropped_uids(checked) == copies
    for uid in copies:
        row = checked[uid]
        assert row["dedup_reason"] == "perceptual_duplicate"
        assert row["dedup_representative"] == uid.rpartition("_")[0]
        bits = (1.0 - row["dedup_similarity"]) * 64  # still 1 - pHash distance / 64
        assert abs(bits - round(bits)) < 1e-4 and bits <= config.phash_max_distance
    # Without the check, or with pHashes from a column (no image decoded, no colour
    # descriptor), pHash alone decides and groups different colours.
    run_dedup(photo_config(semantic=False, sweep=False, colour_check=False),
              tmp_path / "score", tmp_path / "unchecked")  # fmt: skip
    table = pq.read_table(tmp_path / "score" / "00000.parquet")
    codes, _, _ = signatures(encoded)
    pq.write_table(table.append_column("score_phash", pa.array(codes, pa.int64())),
                   tmp_path / "score" / "00000.parquet")  # fmt: skip
    run_dedup(config, tmp_path / "score", tmp_path / "from_column")
    for name in ("unchecked", "from_column"):
        assert dropped_uids(read_output(tmp_path / name)) > copies, name


def test_undecodable_image_bytes_take_no_part_instead_of_crashing(tmp_path):
    rows = photo_rows()[:10]
    good = rows[1]  # an edited copy of the first photo
    broken = [
        ("truncated", good[1][: len(good[1]) // 3], good[2], 1.0),
        ("html_as_jpeg", b"<html><body>not found</body></html>", good[2], 1.0),
    ]
    write_score_tables(tmp_path / "score", rows + broken, files=1)
    config = photo_config(semantic=False)
    assert run_dedup(config, tmp_path / "score", tmp_path / "dedup").ran
    out = read_output(tmp_path / "dedup")
    assert out["truncated"]["dedup_reason"] != "perceptual_duplicate"
    assert out["html_as_jpeg"]["dedup_status"] == "kept"
    # The decodable copies are still found.
    assert out[rows[1][0]]["dedup_reason"] == "perceptual_duplicate"
