"""The pixel detector reads the shapes world's ground truth back, and scores what it should."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from demo.adherence import ATTRIBUTES, detect, evaluate_adherence, hue_degrees
from demo.shapes_world import BACKGROUNDS, PALETTE, WorldConfig, generate_world, read_scenes

pytestmark = pytest.mark.timeout(60)

CLEAN = WorldConfig(n_images=200, n_heldout=24, vague_caption_fraction=0, wrong_caption_fraction=0,
                    duplicate_fraction=0, broken_file_fraction=0, dead_url_fraction=0, seed=11)


@pytest.fixture(scope="module")
def ground_truth(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean_world")
    pairs = read_scenes(generate_world(CLEAN, out, "http://127.0.0.1:1"))
    return [Image.open(out / row["file"]).convert("RGB") for row, _ in pairs], [s for _, s in pairs]


def test_detector_reads_ground_truth_images(ground_truth):
    images, scenes = ground_truth
    accuracy = evaluate_adherence(images, scenes, CLEAN.colours)
    assert accuracy["n"] == len(scenes) == CLEAN.n_images + CLEAN.n_heldout + CLEAN.n_tuning
    for attribute in ATTRIBUTES:
        assert accuracy[attribute] >= 0.98, accuracy
    assert accuracy["all"] >= 0.95, accuracy


def test_detector_survives_blur_and_jpeg(ground_truth):
    """Generated images are soft; colour, count and position must still read through blur."""
    images, scenes = ground_truth

    def degrade(image):
        buffer = io.BytesIO()
        image.filter(ImageFilter.GaussianBlur(0.8)).save(buffer, "JPEG", quality=60)
        return Image.open(io.BytesIO(buffer.getvalue()))

    accuracy = evaluate_adherence([degrade(im) for im in images[:80]], scenes[:80], CLEAN.colours)
    for attribute in ("colour", "count", "position", "background"):
        assert accuracy[attribute] >= 0.95, accuracy


def test_wrong_prompts_score_low(ground_truth):
    images, scenes = ground_truth
    colours = list(CLEAN.colours)
    swapped = [dataclasses.replace(s, colour=colours[(colours.index(s.colour) + 1) % len(colours)],
                                   count=s.count % 3 + 1) for s in scenes[:60]]
    accuracy = evaluate_adherence(images[:60], swapped, CLEAN.colours)
    assert accuracy["colour"] == 0.0 and accuracy["count"] <= 0.02 and accuracy["all"] == 0.0
    assert accuracy["position"] >= 0.98  # untouched attributes still score


def test_truth_rows_and_partial_truths_are_accepted(ground_truth):
    images, scenes = ground_truth
    rows = [{f"true_{k}": v for k, v in dataclasses.asdict(s).items()} for s in scenes[:20]]
    assert evaluate_adherence(images[:20], rows)["colour"] >= 0.95
    only_colour = [{"colour": s.colour} for s in scenes[:20]]
    accuracy = evaluate_adherence(images[:20], only_colour, CLEAN.colours)
    assert set(accuracy) == {"colour", "all", "n"} and accuracy["colour"] >= 0.95


def test_empty_and_noise_images():
    blank = Image.new("RGB", (64, 64), BACKGROUNDS["grey"])
    found = detect(blank)
    assert found.count == 0 and found.colour is None and found.background == "grey"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert detect(noise).count >= 0  # reads something without failing
    for name, rgb in PALETTE.items():  # every palette colour is named by its own hue
        square = Image.new("RGB", (64, 64), BACKGROUNDS["black"])
        square.paste(rgb, (20, 20, 40, 40))
        found = detect(square)
        assert (found.colour, found.shape, found.count, found.position) == (name, "square", 1, "centre")
    assert hue_degrees(np.array([255.0, 0, 0])) == pytest.approx(0.0)
