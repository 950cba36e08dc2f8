"""Gather the demo's run directory into a `ReportData` and render the HTML report.

Reads only the documented outputs: stage Parquet files and manifests (docs/formats.md), the
download tars for thumbnails, the trainer's train_log.jsonl and validation.jsonl, and the
evaluation of `demo/evaluate.py`.
"""

from __future__ import annotations

import json
import tarfile
import time
import tomllib
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
from pipeline.core.decode import original_image_key
from pipeline.inspect.funnel import funnel

MAX_GROUPS = 12
MAX_CAPTIONS = 12


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
                key = original_image_key(member.name) if member.isfile() else None
                if key in uids and key not in found:
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


def precision_of_run(train_dir: Path) -> str:
    """The mixed precision the trainer ran with, as its resolved config records it ("bf16"
    or "no" once "auto" is resolved)."""
    path = train_dir / "config.resolved.toml"
    if not path.exists():
        return "unknown"
    return str(tomllib.loads(path.read_text()).get("optim", {}).get("mixed_precision", "unknown"))


def _adherence_rows(evaluation: DemoEvaluation) -> dict[str, dict[str, float]]:
    first, last = evaluation.models[0], evaluation.models[-1]
    rows = {f"{first.name}, test prompts": _rates(first.accuracy),
            f"{last.name}, test prompts": _rates(last.accuracy)}
    if evaluation.tuning is not None:
        rows[f"{last.name}, tuning prompts"] = _rates(evaluation.tuning.accuracy)
    for name, accuracy in evaluation.ceilings.items():
        rows[f"ceiling: detector on {name} (test prompts)"] = _rates(accuracy)
    return rows


def gather_report(out: Path, vae, evaluation: DemoEvaluation, timings: dict, quick: bool,
                  seed: int = 0) -> Path:
    run_dir, train_dir = out / "run", out / "train"
    groups = duplicate_groups(run_dir)
    captions = caption_pairs(run_dir)
    wanted = {uid for g in groups for uid, _ in g} | {uid for uid, _, _ in captions}
    images = images_by_uid(run_dir / "download", wanted)
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
        adherence=_adherence_rows(evaluation),
        adherence_chance=chance_levels(out / "world"),
        adherence_note=ADHERENCE_NOTE.format(seed=seed, test=len(evaluation.prompts),
                                             tuning=len(evaluation.tuning_prompts)),
        checkpoints=[CheckpointRow(m.step, evaluation.val_loss.get(m.step, float("nan")),
                                   _rates(m.accuracy))
                     for m in evaluation.models[1:]],
        facts=_facts(out, vae, timings, evaluation, seed, precision_of_run(train_dir)),
        notes=NOTES,
    )
    return render_report(data, out)


def _rates(accuracy: dict[str, float]) -> dict[str, float]:
    """Accuracies only: the count of images `n` goes into the facts, not the table."""
    return {k: v for k, v in accuracy.items() if k != "n"}


def dedup_facts(out: Path) -> list[tuple[str, str]]:
    """Dedup against the world's planted copies (demo/dedup_truth.py)."""
    from demo.dedup_truth import dedup_against_truth

    try:
        truth = dedup_against_truth(out / "run" / "dedup", out / "world" / "urls.parquet")
    except FileNotFoundError:
        return []
    return [("dedup vs planted copies", f"{truth.dropped} dropped, {truth.correct} of them "
             f"planted copies (precision {truth.precision:.0%}); {truth.correct} of "
             f"{truth.planted_pairs} planted pairs found (recall {truth.recall:.0%})")]


def _facts(out: Path, vae, timings: dict, evaluation: DemoEvaluation, seed: int,
           precision: str) -> list[tuple[str, str]]:
    facts = [("run seed", str(seed)),
             ("MMDiT mixed precision (resolved)", "fp32" if precision == "no" else precision),
             ("autoencoder PSNR (held-out)", f"{vae.psnr_before:.1f} dB -> {vae.psnr_after:.1f} dB"),
             ("latent shift / scale", f"{vae.shift_factor:.4f} / {vae.scaling_factor:.4f}"),
             ("test prompts (combos from the run seed)", str(len(evaluation.prompts))),
             ("tuning prompts (fixed combos)", str(len(evaluation.tuning_prompts)))]
    facts += dedup_facts(out)
    facts += [(f"time: {name}", f"{seconds:.0f} s") for name, seconds in timings.items()]
    return facts


ADHERENCE_NOTE = (
    "Test prompts: {test} held-out prompts whose attribute combinations the run seed {seed} "
    "drew and kept out of training; these are the demo's figures. Tuning prompts: {tuning} "
    "held-out prompts of combinations fixed for every seed, the only ones the demo's settings "
    "(steps, guidance, budgets) were chosen on; shown apart, not a result.")

NOTES = [
    "All models except the autoencoder and the MMDiT are tiny random-weight models generated "
    "offline (rectiflow models make-tiny): CLIP scores, aesthetic scores and the VLM's synthetic "
    "captions are therefore meaningless here, and the demo trains on original captions only.",
    "Text encoders are random too; they still map different prompts to different embeddings, "
    "which is all the MMDiT needs to learn the world's attributes.",
    "Dedup runs exact (sha256) only: random CLIP embeddings carry no semantics, and at 64 px "
    "pHash groups distinct same-colour scenes (checked against the world's planted copies: "
    "at 2 bits 86% of its drops were distinct images; docs/benchmarks.md), so the demo keeps "
    "the planted copies rather than lose distinct images. Semantic dedup is tested on real "
    "photos and benchmarked separately.",
    "Adherence is read from pixels by a deterministic detector validated on the world's "
    "ground-truth images (tests/demo/test_adherence.py).",
]
