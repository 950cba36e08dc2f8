"""Gather the demo's run directory into a `ReportData` and render the HTML report.

Reads only the documented outputs: stage Parquet files and manifests (docs/formats.md), the
download tars for thumbnails, the trainer's train_log.jsonl and validation.jsonl, and the
evaluation of `demo/evaluate.py`.
"""

from __future__ import annotations

import json
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from demo.evaluate import DemoEvaluation
from demo.report import (
    CaptionExample,
    CheckpointRow,
    DuplicateMember,
    ReportData,
    Sample,
    render_report,
)
from pipeline.inspect.funnel import funnel

MAX_GROUPS = 12
MAX_CAPTIONS = 12
IMAGE_EXTENSIONS = {"jpg", "png", "webp", "gif", "bmp", "tif"}


def _table(stage_dir: Path) -> pa.Table | None:
    files = sorted(stage_dir.glob("*.parquet")) if stage_dir.is_dir() else []
    files = [f for f in files if not f.name.startswith(".")]
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default") if files else None


def images_by_uid(download_dir: Path, uids: set[str]) -> dict[str, bytes]:
    """Original image bytes of `uids` from the download tars (no decoding)."""
    found: dict[str, bytes] = {}
    for shard in sorted(download_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if key in uids and ext in IMAGE_EXTENSIONS and key not in found:
                    found[key] = tar.extractfile(member).read()
    return found


def duplicate_groups(run_dir: Path) -> list[list[tuple[str, str]]]:
    """[(uid, label)] per duplicate group with a drop, representative first."""
    table = _table(run_dir / "dedup")
    if table is None or "dedup_group" not in table.column_names:
        return []
    groups: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        if row.get("dedup_group"):
            groups.setdefault(row["dedup_group"], []).append(row)
    out = []
    for rows in groups.values():
        if len(rows) < 2 or not any(r.get("dedup_reason") for r in rows):
            continue
        rows.sort(key=lambda r: r.get("dedup_reason") is not None)
        out.append([(r["uid"], "kept" if not r.get("dedup_reason") else
                     f"{r['dedup_reason']} {r.get('dedup_similarity') or 0:.2f}") for r in rows])
    return out[:MAX_GROUPS]


def caption_pairs(run_dir: Path) -> list[tuple[str, str, str]]:
    table = _table(run_dir / "caption")
    if table is None:
        return []
    rows = [r for r in table.to_pylist() if r.get("caption_synthetic")]
    return [(r["uid"], r["caption_original"] or "", r["caption_synthetic"]) for r in rows][:MAX_CAPTIONS]


def histograms(run_dir: Path) -> dict[str, list[float]]:
    table = _table(run_dir / "score")
    if table is None:
        return {}
    wanted = ("score_clip", "score_aesthetic", "score_caption_length", "score_aspect")
    out = {}
    for name in wanted:
        if name in table.column_names:
            values = [v for v in table[name].to_pylist() if v is not None]
            if values:
                out[name] = [float(v) for v in values]
    return out


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_curve(train_dir: Path) -> list[tuple[int, float]]:
    rows = _jsonl(train_dir / "train_log.jsonl")
    return [(int(r["step"]), float(r["loss"])) for r in rows if not r.get("skipped")]


def chance_levels(world_dir: Path) -> dict[str, float]:
    card = json.loads((world_dir / "world.json").read_text())
    options = {
        "colour": len(card["config"]["colours"]), "shape": len(card["shapes"]),
        "count": len(card["counts_per_image"]), "position": len(card["positions"]),
        "size": len(card["sizes"]), "background": len(card["config"]["backgrounds"]),
    }
    return {name: 1.0 / n for name, n in options.items() if n}


def _samples(evaluation: DemoEvaluation, index: int) -> list[Sample]:
    model = evaluation.models[index]
    return [Sample(p, img, note) for p, img, note in
            zip(evaluation.prompts, model.images, model.detections, strict=True)]


def gather_report(out: Path, vae, evaluation: DemoEvaluation, timings: dict, quick: bool) -> Path:
    run_dir, train_dir = out / "run", out / "train"
    groups = duplicate_groups(run_dir)
    captions = caption_pairs(run_dir)
    wanted = {uid for g in groups for uid, _ in g} | {uid for uid, _, _ in captions}
    images = images_by_uid(run_dir / "download", wanted)
    first, last = evaluation.models[0], evaluation.models[-1]
    data = ReportData(
        title="rectiflow demo" + (" (quick)" if quick else ""),
        created=time.strftime("%Y-%m-%d %H:%M:%S"),
        run_dir=str(out),
        funnel=funnel(run_dir),
        histograms=histograms(run_dir),
        duplicate_groups=[[DuplicateMember(u, images.get(u, b""), label) for u, label in g]
                          for g in groups],
        caption_examples=[CaptionExample(u, images.get(u, b""), o, s) for u, o, s in captions],
        loss_curve=loss_curve(train_dir),
        val_curve=sorted(evaluation.val_loss.items()),
        sample_grid=_samples(evaluation, len(evaluation.models) - 1),
        baseline_samples=_samples(evaluation, 0),
        adherence={first.name: _rates(first.accuracy), last.name: _rates(last.accuracy)},
        adherence_chance=chance_levels(out / "world"),
        checkpoints=[CheckpointRow(m.step, evaluation.val_loss.get(m.step, float("nan")),
                                   _rates(m.accuracy))
                     for m in evaluation.models[1:]],
        facts=_facts(vae, timings, evaluation),
        notes=NOTES,
    )
    return render_report(data, out)


def _rates(accuracy: dict[str, float]) -> dict[str, float]:
    """Accuracies only: the count of images `n` goes into the facts, not the table."""
    return {k: v for k, v in accuracy.items() if k != "n"}


def _facts(vae, timings: dict, evaluation: DemoEvaluation) -> list[tuple[str, str]]:
    facts = [("autoencoder PSNR (held-out)", f"{vae.psnr_before:.1f} dB -> {vae.psnr_after:.1f} dB"),
             ("latent shift / scale", f"{vae.shift_factor:.4f} / {vae.scaling_factor:.4f}"),
             ("held-out prompts", str(len(evaluation.prompts)))]
    facts += [(f"time: {name}", f"{seconds:.0f} s") for name, seconds in timings.items()]
    return facts


NOTES = [
    "All models except the autoencoder and the MMDiT are tiny random-weight models generated "
    "offline (rectiflow models make-tiny): CLIP scores, aesthetic scores and the VLM's synthetic "
    "captions are therefore meaningless here, and the demo trains on original captions only.",
    "Text encoders are random too; they still map different prompts to different embeddings, "
    "which is all the MMDiT needs to learn the world's attributes.",
    "Dedup runs exact and perceptual (pHash, 2 bits) only: random CLIP embeddings carry no "
    "semantics. The world's scenes are simple, so distinct images with the same attributes "
    "often share a pHash and are grouped as duplicates; semantic dedup is tested on real "
    "photos and benchmarked separately (docs/benchmarks.md).",
    "Adherence is read from pixels by a deterministic detector validated on the world's "
    "ground-truth images (tests/test_adherence.py).",
]
