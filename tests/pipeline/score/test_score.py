"""The score stage on real photos and a real (tiny) open_clip model."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from download_factory import (
    FactoryRow,
    encode,
    exif_rotated_jpeg,
    photo,
    png_header,
    success_row,
    tiny_clip_dir,
    write_download_run,
    write_download_shard,
)
from PIL import Image
from safetensors.torch import save_file

from pipeline.core.decode import decode_for_model
from pipeline.core.manifest import ShardManifest, manifest_path
from pipeline.core.runners import RunnerConfig, run_stage
from pipeline.core.stage import run_shard
from pipeline.score.stage import ClipScorer, ScoreConfig, score_shards

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def clip_dir(request, tmp_path_factory) -> Path:
    return tiny_clip_dir(request, tmp_path_factory)


def score_run(run_dir: Path, config: ScoreConfig) -> list[ShardManifest]:
    shards = score_shards(run_dir / "download")
    return run_stage(lambda: ClipScorer(config), shards, run_dir / "score", RunnerConfig())


def test_scores_every_successful_download(tmp_path, clip_dir):
    write_download_run(tmp_path, shards=2, rows=8, failures_every=4)
    manifests = score_run(tmp_path, ScoreConfig(model=f"local-dir:{clip_dir}", batch_size=3))

    assert [m.shard for m in manifests] == ["00000", "00001"]
    assert [(m.rows_in, m.rows_out) for m in manifests] == [(6, 6), (6, 6)]
    download = pq.read_table(tmp_path / "download" / "00000.parquet").to_pylist()
    scores = pq.read_table(tmp_path / "score" / "00000.parquet")
    ok = [r for r in download if r["download_status"] == "success"]
    # Failed downloads are absent; the rest keep the download's order.
    assert scores["uid"].to_pylist() == [r["uid"] for r in ok]
    assert scores["score_width"].to_pylist() == [r["download_width"] for r in ok]
    assert scores["score_height"].to_pylist() == [r["download_height"] for r in ok]
    assert scores["score_caption_length"].to_pylist() == [len(r["caption"]) for r in ok]

    image = np.array(scores["score_image_embedding"].to_pylist(), dtype=np.float32)
    text = np.array(scores["score_text_embedding"].to_pylist(), dtype=np.float32)
    assert image.shape == (6, 32)
    assert np.allclose(np.linalg.norm(image, axis=1), 1.0, atol=2e-3)
    # The CLIP score is the cosine of the two embeddings (up to their float16 rounding).
    assert np.allclose((image * text).sum(1), scores["score_clip"].to_numpy(), atol=5e-3)
    # Different photos give different embeddings.
    assert len({tuple(np.round(row, 3)) for row in image}) > 1
    assert scores["score_aesthetic"].null_count == 6 and scores["score_nsfw"].null_count == 6
    assert "none" in manifests[0].models["aesthetic"]


def test_bad_images_get_a_reason_and_good_ones_of_every_mode_are_scored(tmp_path, clip_dir):
    cat = photo("chelsea", (120, 80))
    rgba = cat.convert("RGBA")
    rgba.putalpha(128)
    sixteen = Image.fromarray(np.asarray(cat.convert("L"), np.uint16) * 257)
    rows = [
        FactoryRow("truncated", "a cat", "success", None, encode(cat)[:300], "jpg"),
        FactoryRow("bomb", "a cat", "success", None, png_header(60000, 60000), "png"),
        FactoryRow("empty", "a cat", "success", None, b"", "jpg"),
        FactoryRow("html", "a cat", "success", None, b"<html>not an image</html>", "jpg"),
        FactoryRow("rotated", "a cat", "success", None, exif_rotated_jpeg(cat), "jpg"),
        success_row("cmyk", "a cat", cat.convert("CMYK")),
        success_row("rgba", "a cat", rgba, "PNG"),
        success_row("palette", "a cat", cat.convert("P"), "PNG"),
        FactoryRow("sixteen", "a cat", "success", None, encode(sixteen, "PNG"), "png"),
    ]
    write_download_shard(tmp_path / "download", "00000", rows)
    (manifest,) = score_run(tmp_path, ScoreConfig(model=f"local-dir:{clip_dir}", batch_size=4))

    scores = {r["uid"]: r for r in pq.read_table(tmp_path / "score" / "00000.parquet").to_pylist()}
    assert {u: scores[u]["score_reason"] for u in ("truncated", "bomb", "empty", "html")} == {
        "truncated": "decode_error",
        "bomb": "too_many_pixels",
        "empty": "empty_body",
        "html": "not_an_image",
    }
    assert manifest.reasons == {"decode_error": 1, "too_many_pixels": 1, "empty_body": 1,
                                "not_an_image": 1}
    assert manifest.rows_out == len(rows) - 4
    assert scores["bomb"]["score_clip"] is None and scores["bomb"]["score_image_embedding"] is None
    for uid in ("rotated", "cmyk", "rgba", "palette", "sixteen"):
        assert scores[uid]["score_reason"] is None, uid
        assert -1.0 <= scores[uid]["score_clip"] <= 1.0
    # EXIF orientation 6 turns the 120 x 80 photo upright as 80 x 120.
    assert (scores["rotated"]["score_width"], scores["rotated"]["score_height"]) == (80, 120)


def test_missing_tar_entry_is_counted_not_lost(tmp_path, clip_dir):
    rows = [success_row("here", "a cat", photo("chelsea", (64, 64)))]
    write_download_shard(tmp_path / "download", "00000", rows)
    table = pq.read_table(tmp_path / "download" / "00000.parquet")
    extra = table.slice(0, 1).set_column(0, "uid", [["gone"]])
    pq.write_table(pa.concat_tables([table, extra]), tmp_path / "download" / "00000.parquet")
    (manifest,) = score_run(tmp_path, ScoreConfig(model=f"local-dir:{clip_dir}"))
    assert manifest.rows_in == 2 and manifest.reasons == {"missing_image": 1}


def test_draft_mode_decodes_large_jpegs_small_but_reports_full_size():
    big = photo("astronaut", (2048, 1536))
    decoded = decode_for_model(encode(big), target=224, max_pixels=10**8)
    assert (decoded.width, decoded.height) == (2048, 1536)
    # 1/4 scale: the smallest JPEG DCT scale whose both sides still cover 224.
    assert decoded.image.size == (512, 384)
    assert min(decode_for_model(encode(big), 64, 10**8).image.size) >= 64
    # Animated GIF: the first frame is used.
    frames = [Image.new("RGB", (40, 40), c) for c in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    first = decode_for_model(buffer.getvalue(), 32, 10**8).image
    assert first.getpixel((5, 5))[0] > 200 and first.getpixel((5, 5))[2] < 50


def _aesthetic_state(dim: int, seed: int) -> dict[str, torch.Tensor]:
    """Random weights in the improved-aesthetic-predictor layout (Linear, Dropout, ...)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [(dim, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    state = {}
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), sizes, strict=True):
        state[f"layers.{index}.weight"] = torch.randn(fan_out, fan_in, generator=gen) * 0.05
        state[f"layers.{index}.bias"] = torch.randn(fan_out, generator=gen) * 0.05
    return state


def test_heads_load_from_weights_and_score_the_normalised_embedding(tmp_path, clip_dir):
    write_download_run(tmp_path, shards=1, rows=4, failures_every=0)
    aesthetic = _aesthetic_state(32, seed=1)
    torch.save(aesthetic, tmp_path / "aesthetic.pth")
    nsfw = {"weight": torch.randn(1, 32), "bias": torch.tensor([0.5])}
    save_file(nsfw, tmp_path / "nsfw.safetensors")
    config = ScoreConfig(
        model=f"local-dir:{clip_dir}",
        aesthetic_weights=str(tmp_path / "aesthetic.pth"),
        nsfw_weights=str(tmp_path / "nsfw.safetensors"),
    )
    (manifest,) = score_run(tmp_path, config)
    scores = pq.read_table(tmp_path / "score" / "00000.parquet")
    embedding = torch.tensor(np.array(scores["score_image_embedding"].to_pylist(), np.float32))

    x = embedding
    for index in (0, 2, 4, 6, 7):
        x = x @ aesthetic[f"layers.{index}.weight"].T + aesthetic[f"layers.{index}.bias"]
    expected_nsfw = torch.sigmoid(embedding @ nsfw["weight"].T + nsfw["bias"])[:, 0]
    assert np.allclose(scores["score_aesthetic"].to_numpy(), x[:, 0].numpy(), atol=2e-3)
    assert np.allclose(scores["score_nsfw"].to_numpy(), expected_nsfw.numpy(), atol=2e-3)
    assert manifest.models["aesthetic"].startswith(str(tmp_path / "aesthetic.pth") + "@")


def test_head_for_another_embedding_size_is_refused(tmp_path, clip_dir):
    torch.save(_aesthetic_state(768, seed=0), tmp_path / "vit_l.pth")
    config = ScoreConfig(model=f"local-dir:{clip_dir}", aesthetic_weights=str(tmp_path / "vit_l.pth"))
    with pytest.raises(ValueError, match="768"):
        ClipScorer(config).setup()


def test_rerun_skips_done_shards_and_new_weights_redo_them(tmp_path, clip_dir):
    write_download_run(tmp_path, shards=1, rows=4, failures_every=0)
    config = ScoreConfig(model=f"local-dir:{clip_dir}")
    score_run(tmp_path, config)
    stage = ClipScorer(config)
    stage.setup()
    (shard,) = score_shards(tmp_path / "download")
    _, ran = run_shard(stage, shard, tmp_path / "score")
    assert not ran
    torch.save({"weight": torch.randn(1, 32), "bias": torch.zeros(1)}, tmp_path / "a.pth")
    stage = ClipScorer(ScoreConfig(model=config.model, aesthetic_weights=str(tmp_path / "a.pth")))
    stage.setup()
    _, ran = run_shard(stage, shard, tmp_path / "score")
    assert ran
    assert ShardManifest.read(manifest_path(tmp_path / "score", "00000")).models["aesthetic"] != (
        "none (score_aesthetic is null)"
    )
