"""The demo's HTML report: a pure renderer from a `ReportData` to out_dir/report.html + assets/.

It knows no file formats of the run: whoever gathers the data (demo/run.py) fills the
dataclass, so the page can be tested with synthetic data and changes to stage outputs never
reach it. The page is static and self-contained: inline CSS, no scripts, no web fonts, and a
Content-Security-Policy that lets it load nothing but its own images, so it opens from
file:// offline and can never call out to the network.
"""

from __future__ import annotations

import html
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy.stats import rankdata

from demo.report_assets import AssetWriter, histogram_figure, loss_figure


class FunnelStage(NamedTuple):
    stage: str
    rows_in: int
    rows_out: int
    reasons: dict[str, int]  # drop reason -> rows dropped for it


class DuplicateMember(NamedTuple):
    uid: str
    image: bytes  # encoded PNG/JPEG (undecodable bytes show as a placeholder)
    label: str  # e.g. "kept", "near_duplicate 0.97"


class CaptionExample(NamedTuple):
    uid: str
    image: bytes
    original: str  # the alt-text the web gave
    synthetic: str  # the captioner's


class Sample(NamedTuple):
    prompt: str
    image: bytes
    note: str = ""  # e.g. what the adherence detector read


class CheckpointRow(NamedTuple):
    step: int
    val_loss: float
    accuracy: dict[str, float]  # attribute -> prompt-adherence accuracy in [0, 1]


@dataclass
class ReportData:
    """Everything the page shows. List fields take the records above or plain tuples in the
    same field order; every field but the first three may stay empty (the section says so)."""

    title: str
    created: str  # a timestamp, shown as given
    run_dir: str
    funnel: list[FunnelStage] = field(default_factory=list)
    histograms: dict[str, list[float]] = field(default_factory=dict)  # name -> values
    duplicate_groups: list[list[DuplicateMember]] = field(default_factory=list)
    caption_examples: list[CaptionExample] = field(default_factory=list)
    loss_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, train loss)
    val_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, val loss)
    sample_grid: list[Sample] = field(default_factory=list)
    baseline_samples: list[Sample] = field(default_factory=list)  # untrained model, same seeds
    adherence: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> attr -> acc
    adherence_chance: dict[str, float] = field(default_factory=dict)  # attr -> chance accuracy
    adherence_note: str = ""  # which prompts each row was sampled on (test vs tuning)
    checkpoints: list[CheckpointRow] = field(default_factory=list)
    facts: list[tuple[str, str]] = field(default_factory=list)  # headline numbers, e.g. PSNR
    notes: list[str] = field(default_factory=list)  # honest caveats


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def known(value: float | None) -> bool:
    return value is not None and bool(np.isfinite(value))


def percent(value: float | None) -> str:
    return f"{100 * value:.1f}%" if known(value) else "n/a"


def decimal(value: float | None) -> str:
    return f"{value:.4f}" if known(value) else "n/a"


def table(headers: list[str], rows: list[list[str]], css: str = "") -> str:
    """An HTML table; headers are escaped here, cells arrive as ready (escaped) HTML."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def nothing(what: str) -> str:
    return f'<p class="empty">No {esc(what)} recorded for this run.</p>'


def figure_html(image_tag: str, caption: str) -> str:
    return f"<figure>{image_tag}<figcaption>{caption}</figcaption></figure>"


# --- sections: each takes the data and the asset writer and returns the section's body ----


def summary_section(data: ReportData, _assets: AssetWriter) -> str:
    facts = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in data.facts)
    facts = f'<table class="facts"><tbody>{facts}</tbody></table>' if facts else ""
    notes = "".join(f"<li>{esc(note)}</li>" for note in data.notes)
    notes = f'<h3>Caveats</h3><ul class="notes">{notes}</ul>' if notes else ""
    return (facts + notes) or nothing("summary")


def funnel_section(data: ReportData, _assets: AssetWriter) -> str:
    if not data.funnel:
        return nothing("funnel")
    first = max(1, data.funnel[0].rows_in)
    rows = []
    for stage in data.funnel:
        kept = stage.rows_out / first
        bar = f'<span class="bar" style="width:{100 * min(kept, 1.0):.1f}%"></span>'
        reasons = sorted(stage.reasons.items(), key=lambda kv: (-kv[1], kv[0]))
        listed = ", ".join(f"<code>{esc(r)}</code>&nbsp;{n}" for r, n in reasons) or "&ndash;"
        rows.append([esc(stage.stage), str(stage.rows_in), str(stage.rows_out),
                     str(stage.rows_in - stage.rows_out),
                     f'<div class="meter">{bar}</div>{percent(kept)}', listed])
    last = data.funnel[-1].rows_out
    lead = (f"<p>{last} of {data.funnel[0].rows_in} input rows ({percent(last / first)}) "
            "came through every stage. Nothing is deleted: every dropped row keeps a reason.</p>")
    headers = ["Stage", "Rows in", "Rows out", "Dropped", "Left of input", "Drop reasons"]
    return lead + table(headers, rows, "funnel")


def scores_section(data: ReportData, assets: AssetWriter) -> str:
    figures = []
    for i, (name, values) in enumerate(data.histograms.items()):
        figure = histogram_figure(name, values)
        if figure is None:
            figures.append(f"<figure>{nothing(name + ' values')}</figure>")
            continue
        tag = assets.chart(f"histogram_{i:02d}", figure, f"histogram of {name}")
        finite = int(np.isfinite(np.asarray(values, dtype=np.float64)).sum())
        missing = f", {len(values) - finite} missing" if finite < len(values) else ""
        figures.append(figure_html(tag, f"<code>{esc(name)}</code>: {finite} values{missing}"))
    return f'<div class="grid charts">{"".join(figures)}</div>' if figures else nothing("scores")


def duplicates_section(data: ReportData, assets: AssetWriter) -> str:
    groups = []
    for g, group in enumerate(data.duplicate_groups):
        figures = "".join(
            figure_html(assets.thumbnail(f"dup_{g:03d}_{m:02d}", member.image, member.uid, 96),
                        f"<code>{esc(member.uid)}</code><br>{esc(member.label)}")
            for m, member in enumerate(group))
        groups.append(f'<div class="group"><h3>Group {g + 1} ({len(group)} images)</h3>'
                      f'<div class="grid">{figures}</div></div>')
    return "".join(groups) or nothing("duplicate groups")


def captions_section(data: ReportData, assets: AssetWriter) -> str:
    rows = [[figure_html(assets.thumbnail(f"caption_{i:03d}", ex.image, ex.uid, 96),
                         f"<code>{esc(ex.uid)}</code>"),
             esc(ex.original), esc(ex.synthetic)]
            for i, ex in enumerate(data.caption_examples)]
    if not rows:
        return nothing("caption examples")
    return table(["Image", "Original alt-text", "Synthetic caption"], rows, "captions")


def loss_section(data: ReportData, assets: AssetWriter) -> str:
    if not data.loss_curve and not data.val_curve:
        return nothing("losses")
    tag = assets.chart("loss_curve", loss_figure(data.loss_curve, data.val_curve), "loss curve")
    curves = (("train", data.loss_curve), ("validation", data.val_curve))
    finals = [f"final {name} loss {decimal(curve[-1][1])} at step {curve[-1][0]}"
              for name, curve in curves if curve]
    return figure_html(tag, esc("; ".join(finals)))


def sample_grid(samples: list[Sample], prefix: str, assets: AssetWriter) -> str:
    figures = []
    for i, sample in enumerate(samples):
        note = f'<br><span class="note">{esc(sample.note)}</span>' if sample.note else ""
        tag = assets.thumbnail(f"{prefix}_{i:03d}", sample.image, sample.prompt, 128)
        figures.append(figure_html(tag, f"{esc(sample.prompt)}{note}"))
    return f'<div class="grid">{"".join(figures)}</div>'


def samples_section(data: ReportData, assets: AssetWriter) -> str:
    if not data.sample_grid:
        return nothing("samples")
    trained = sample_grid(data.sample_grid, "sample", assets)
    if not data.baseline_samples:
        return trained
    baseline = sample_grid(data.baseline_samples, "baseline", assets)
    return (f"<h3>Trained model</h3>{trained}"
            f"<h3>Untrained model, same prompts and seeds</h3>{baseline}")


def attribute_columns(rows: list[dict[str, float]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def adherence_section(data: ReportData, _assets: AssetWriter) -> str:
    if not data.adherence:
        return nothing("adherence results")
    columns = attribute_columns([*data.adherence.values(), data.adherence_chance])
    best = {c: max(acc.get(c, -1.0) for acc in data.adherence.values()) for c in columns}
    rows = []
    for model, accuracy in data.adherence.items():
        compared = len(data.adherence) > 1  # bold marks the better model, if there are two
        cells = [f"<strong>{percent(accuracy[c])}</strong>"
                 if compared and c in accuracy and accuracy[c] == best[c]
                 else percent(accuracy.get(c)) for c in columns]
        rows.append([esc(model), *cells])
    if data.adherence_chance:
        rows.append(['<span class="note">chance</span>',
                     *(f'<span class="note">{percent(data.adherence_chance.get(c))}</span>'
                       for c in columns)])
    lead = f"<p>{esc(data.adherence_note)}</p>" if data.adherence_note else ""
    return lead + table(["Model", *columns], rows, "numbers")


def spearman(x: list[float], y: list[float]) -> float | None:
    """Rank correlation, None when it is undefined (fewer than 3 points or a constant column)."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(rankdata(x), rankdata(y))[0, 1])


def checkpoints_section(data: ReportData, _assets: AssetWriter) -> str:
    if not data.checkpoints:
        return nothing("checkpoint evaluations")
    columns = attribute_columns([row.accuracy for row in data.checkpoints])
    rows = [[str(row.step), decimal(row.val_loss), *(percent(row.accuracy.get(c)) for c in columns)]
            for row in data.checkpoints]
    losses = [row.val_loss for row in data.checkpoints]
    correlations = []
    for c in columns:
        pairs = [(row.val_loss, row.accuracy.get(c)) for row in data.checkpoints
                 if known(row.val_loss) and known(row.accuracy.get(c))]
        rho = spearman([loss for loss, _ in pairs], [acc for _, acc in pairs])
        correlations.append("n/a" if rho is None else f"{rho:+.2f}")
    rows.append(['<span class="note">Spearman &rho; with val loss</span>', "", *correlations])
    lead = ("<p>SD3 reports that validation loss tracks prompt adherence; a negative &rho; "
            f"means lower loss went with higher accuracy here ({len(losses)} checkpoints).</p>")
    return lead + table(["Step", "Val loss", *columns], rows, "numbers")


Section = Callable[[ReportData, AssetWriter], str]
SECTIONS: tuple[tuple[str, str, Section], ...] = (
    ("summary", "Summary", summary_section),
    ("funnel", "Curation funnel", funnel_section),
    ("scores", "Score histograms", scores_section),
    ("duplicates", "Duplicate groups", duplicates_section),
    ("captions", "Captions: original and synthetic", captions_section),
    ("loss", "Training loss", loss_section),
    ("samples", "Samples for held-out prompts", samples_section),
    ("adherence", "Prompt adherence", adherence_section),
    ("checkpoints", "Validation loss against adherence", checkpoints_section),
)

STYLE = """
body { font-family: system-ui, "DejaVu Sans", sans-serif; margin: 0 auto; max-width: 1100px;
       padding: 0 24px 48px; color: #1d2430; background: #fff; line-height: 1.45; }
header { border-bottom: 2px solid #3b6ea8; margin-bottom: 8px; }
h1 { margin: 24px 0 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #d5dbe3; }
h3 { margin: 16px 0 6px; font-size: 1rem; }
.meta, .note, .empty { color: #5b6675; } .meta { margin: 0 0 12px; font-size: 0.9rem; }
nav a { margin-right: 14px; font-size: 0.9rem; color: #3b6ea8; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.92rem; }
th, td { border: 1px solid #d5dbe3; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #eef2f7; }
table.numbers td, table.funnel td { font-variant-numeric: tabular-nums; }
table.captions td { max-width: 420px; }
.meter { display: inline-block; width: 120px; height: 10px; background: #eef2f7;
         margin-right: 6px; vertical-align: middle; }
.bar { display: block; height: 100%; background: #3b6ea8; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
figure { margin: 0; max-width: 500px; }
.grid figure { max-width: 180px; }
.grid.charts figure { max-width: none; }
table.facts th { background: none; font-weight: normal; color: #5b6675; }
figcaption { font-size: 0.82rem; margin-top: 2px; word-wrap: break-word; }
img { display: block; border: 1px solid #d5dbe3; }
img.px { image-rendering: pixelated; }
.broken { display: flex; align-items: center; justify-content: center; text-align: center;
          background: #f6e3e1; color: #8a2d22; font-size: 0.8rem; border: 1px dashed #c0392b; }
.group { border-left: 3px solid #d5dbe3; padding-left: 10px; margin-bottom: 12px; }
code { font-size: 0.85em; }
"""

# Only the page's own images (relative files) may load: no scripts, fonts or remote fetches.
CSP = "default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'"


def render_page(data: ReportData, assets: AssetWriter) -> str:
    nav = "".join(f'<a href="#{sid}">{esc(heading)}</a>' for sid, heading, _ in SECTIONS)
    body = "".join(f'<section id="{sid}"><h2>{esc(heading)}</h2>{render(data, assets)}</section>'
                   for sid, heading, render in SECTIONS)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(data.title)}</title><style>{STYLE}</style></head><body>"
        f"<header><h1>{esc(data.title)}</h1><p class=\"meta\">created {esc(data.created)} "
        f"&middot; run <code>{esc(data.run_dir)}</code></p><nav>{nav}</nav></header>"
        f"<main>{body}</main></body></html>\n")


def as_record(kind: type, item):
    """Plain tuples become the named record; records and look-alikes (pipeline.inspect.funnel's
    StageCount has the same attributes as FunnelStage) pass through."""
    return kind(*item) if isinstance(item, (tuple, list)) and not isinstance(item, kind) else item


def with_records(data: ReportData) -> ReportData:
    return replace(
        data,
        funnel=[as_record(FunnelStage, row) for row in data.funnel],
        duplicate_groups=[[as_record(DuplicateMember, m) for m in group]
                          for group in data.duplicate_groups],
        caption_examples=[as_record(CaptionExample, ex) for ex in data.caption_examples],
        sample_grid=[as_record(Sample, sample) for sample in data.sample_grid],
        baseline_samples=[as_record(Sample, sample) for sample in data.baseline_samples],
        checkpoints=[as_record(CheckpointRow, row) for row in data.checkpoints],
    )


def render_report(data: ReportData, out_dir: str | Path) -> Path:
    """Write out_dir/report.html and its PNGs under out_dir/assets; return the HTML's path."""
    out_dir = Path(out_dir)
    page = render_page(with_records(data), AssetWriter(out_dir))
    path = out_dir / "report.html"
    partial = out_dir / ".report.html.partial"  # a reader never sees half a page
    partial.write_text(page, encoding="utf-8")
    os.replace(partial, path)
    return path
