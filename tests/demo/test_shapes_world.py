"""The shapes world: exact captions, planted noise recorded truthfully, determinism, held-out split."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from demo.shapes_world import (
    WorldConfig,
    generate_world,
    heldout_combos,
    main,
    read_scenes,
    seeded_test_combos,
    tuning_combos,
)
from pipeline.core.config import RESOLVED_CONFIG_NAME

pytestmark = pytest.mark.timeout(60)

BASE_URL = "http://127.0.0.1:8765"
# Noise fractions raised so that a small world still holds every kind of noise.
NOISY = WorldConfig(n_images=80, n_heldout=12, vague_caption_fraction=0.2,
                    wrong_caption_fraction=0.2, duplicate_fraction=0.1,
                    broken_file_fraction=0.1, dead_url_fraction=0.1, seed=7)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    return out, pq.read_table(generate_world(NOISY, out, BASE_URL)).to_pylist()


def _decodes(path) -> bool:
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except OSError:
        return False


def test_rows_urls_and_exact_captions(world):
    out, rows = world
    duplicates = [r for r in rows if r["duplicate_of"]]
    assert len(rows) == NOISY.n_images + NOISY.n_heldout + NOISY.n_tuning + len(duplicates)
    assert len(duplicates) == round(NOISY.duplicate_fraction * NOISY.n_images)
    assert len({r["id"] for r in rows}) == len(rows)
    for row, scene in read_scenes(out / "urls.parquet"):
        assert row["url"] == f"{BASE_URL}/{row['file']}"
        assert row["true_caption"] == scene.caption
        if row["caption_quality"] == "exact":
            assert row["caption"] == scene.caption
        else:
            assert row["caption"] != scene.caption
    some = next(s for _, s in read_scenes(out / "urls.parquet") if s.count == 2)
    assert some.caption.startswith(f"two {some.size} {some.colour} {some.shape}s ")
    assert some.caption.endswith(f", on a {some.background} background")


def test_every_kind_of_noise_is_planted_and_recorded(world):
    out, rows = world
    by_defect = {d: [r for r in rows if r["planted_defect"] == d]
                 for d in ("none", "dead_url", "truncated", "html_as_image")}
    assert all(by_defect.values()), {k: len(v) for k, v in by_defect.items()}
    assert {r["caption_quality"] for r in rows} == {"exact", "vague", "wrong"}
    for row in by_defect["dead_url"]:
        assert not (out / row["file"]).exists()  # the server will answer 404
    for row in by_defect["truncated"] + by_defect["html_as_image"]:
        assert (out / row["file"]).exists() and not _decodes(out / row["file"])
    assert all(r["file"].endswith(".jpg") for r in by_defect["html_as_image"])
    for row in by_defect["none"]:
        assert _decodes(out / row["file"]), row["id"]
    for row in rows:  # the clean held-out prompts carry no noise
        if row["is_heldout"]:
            assert row["caption_quality"] == "exact" and row["planted_defect"] == "none"


def test_near_duplicates_look_like_their_source(world):
    out, rows = world
    by_id = {r["id"]: r for r in rows}

    def pixels(row):
        return np.asarray(Image.open(out / row["file"]).convert("RGB").resize((64, 64)), np.float32)

    duplicates = [r for r in rows if r["duplicate_of"]]
    assert {r["duplicate_kind"] for r in duplicates} == {"resized", "recompressed", "shifted"}
    for dup in duplicates:
        source = by_id[dup["duplicate_of"]]
        assert source["planted_defect"] == "none" and not source["is_heldout"]
        assert dup["true_caption"] == source["true_caption"]
        assert np.abs(pixels(dup) - pixels(source)).mean() < 12  # same scene, other bytes
        assert (out / dup["file"]).read_bytes() != (out / source["file"]).read_bytes()
    unrelated = [r for r in rows if r["planted_defect"] == "none"][:2]
    assert np.abs(pixels(unrelated[0]) - pixels(unrelated[1])).mean() > 12


def test_heldout_combos_never_reach_training(world):
    out, rows = world
    held = heldout_combos(NOISY)
    per_colour = NOISY.heldout_combos_per_colour + NOISY.tuning_combos_per_colour
    assert len(held) == len(NOISY.colours) * per_colour
    for _, scene in read_scenes(out / "urls.parquet"):
        key = (scene.colour, scene.shape, scene.count, scene.position)
        assert (key in held) == any(r["is_heldout"] for r in rows if r["true_caption"] == scene.caption)
    train = pq.read_table(out / "train_urls.parquet").to_pylist()
    assert train and not any(r["is_heldout"] for r in train)
    assert len(train) == len(rows) - NOISY.n_heldout - NOISY.n_tuning


def test_tuning_and_test_prompts_are_disjoint_and_only_the_test_set_follows_the_seed(world):
    out, _ = world
    tuning, test = tuning_combos(NOISY), seeded_test_combos(NOISY)
    assert tuning and test and not tuning & test
    other = WorldConfig(**{**NOISY.__dict__, "seed": 8})
    assert tuning_combos(other) == tuning  # settings chosen on it hold for every seed
    assert seeded_test_combos(other) != test and not tuning_combos(other) & seeded_test_combos(other)
    for name, combos, count in (("tuning", tuning, NOISY.n_tuning), ("test", test, NOISY.n_heldout)):
        scenes = read_scenes(out / "urls.parquet", heldout=True, heldout_set=name)
        assert len(scenes) == count
        assert {(s.colour, s.shape, s.count, s.position) for _, s in scenes} <= combos
    card = json.loads((out / "world.json").read_text())
    assert sorted(map(list, test)) == card["test_combos"] and card["config"]["seed"] == NOISY.seed
    with pytest.raises(ValueError, match="heldout_set"):
        read_scenes(out / "urls.parquet", heldout_set="validation")


def test_generation_is_deterministic(world, tmp_path):
    out, rows = world
    again = pq.read_table(generate_world(NOISY, tmp_path, BASE_URL)).to_pylist()
    assert again == rows

    def digest(root):
        files = sorted(p for p in (root / "images").iterdir())
        return [(p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in files]

    assert digest(tmp_path) == digest(out)
    other = WorldConfig(**{**NOISY.__dict__, "seed": 8})
    assert pq.read_table(generate_world(other, tmp_path / "other", BASE_URL)).to_pylist() != rows


def test_cli_writes_world_and_resolved_config(tmp_path):
    code = main(["--out", str(tmp_path), "--base-url", BASE_URL,
                 "--world.n_images=12", "--world.n_heldout=4", "--world.n_tuning=2",
                 "--world.image_size=48"])
    assert code == 0
    rows = pq.read_table(tmp_path / "urls.parquet").to_pylist()
    assert sum(r["is_heldout"] for r in rows) == 6
    png = next(r for r in rows if r["planted_defect"] == "none")
    assert Image.open(io.BytesIO((tmp_path / png["file"]).read_bytes())).size[0] in (48, 72)
    assert "n_images = 12" in (tmp_path / RESOLVED_CONFIG_NAME).read_text()
    assert (tmp_path / "world.json").exists()


def test_config_rejects_unknown_colour():
    with pytest.raises(ValueError, match="mauve"):
        WorldConfig(colours=("red", "mauve"))
