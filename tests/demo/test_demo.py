"""`rectiflow demo --quick`: the whole system end to end, offline, in a guarded subprocess.

The quick variant is a smoke test of the composition (it trains for seconds, so it checks
that every stage ran and reported, not that the model learned; the full demo measures that).
Every Python process it starts loads the network guard; only Ray's own start-up probes of
cloud-metadata hosts may appear in the guard's log, refused before anything is sent.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.timeout(900)

REPO = Path(__file__).resolve().parents[2]
NETGUARD = REPO / "tests" / "netguard"
RAY_STARTUP_PROBES = ("169.254.169.254", "metadata.google.internal", "usage-stats.ray.io")
STAGES = ("download", "score", "select", "dedup", "caption", "encode")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("demo")
    guard_log = out.parent / f"{out.name}-netguard.log"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", NETGUARD_LOG=str(guard_log),
               NO_ALBUMENTATIONS_UPDATE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(NETGUARD), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "demo", "--quick", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=840,
    )
    return out, result, guard_log


def test_demo_runs_and_prints_its_report(demo_run):
    out, result, _ = demo_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    match = re.search(r"report: (\S+report\.html)", result.stdout)
    assert match, result.stdout[-2000:]
    report = Path(match.group(1))
    assert report == out / "report.html" and report.exists()
    page = report.read_text()
    for section in ("funnel", "duplicates", "captions", "loss", "samples", "adherence",
                    "checkpoints"):
        assert f'id="{section}"' in page
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) >= 20 and all((out / src).is_file() for src in images)


def test_every_stage_ran_and_every_sample_is_accounted_for(demo_run):
    out, result, _ = demo_run
    assert result.returncode == 0
    run = out / "run"
    for stage in STAGES:
        assert list((run / stage).glob("*.manifest.json")), f"{stage} wrote no manifest"
    urls = pq.read_table(out / "world" / "train_urls.parquet")
    downloaded = pa.concat_tables([pq.read_table(p) for p in sorted((run / "download").glob("*.parquet"))],
                                  promote_options="permissive")
    assert downloaded.num_rows == urls.num_rows  # every input row has a download row
    reasons = set(downloaded["download_reason"].drop_null().to_pylist())
    assert {"http_404", "decode_error"} <= reasons  # the world's dead URLs and broken files
    dataset = json.loads((run / "encode" / "dataset.json").read_text())
    assert dataset["counts"]["samples"] > 0
    # The demo's own autoencoder replaced the random VAE: its fitted factors are in use.
    vae = json.loads((out / "models" / "sd3" / "vae" / "config.json").read_text())
    assert dataset["vae"]["scaling_factor"] == pytest.approx(vae["scaling_factor"])
    assert vae["scaling_factor"] != pytest.approx(1.5305)


def test_training_and_evaluation_outputs(demo_run):
    out, result, _ = demo_run
    assert result.returncode == 0
    log = [json.loads(line) for line in (out / "train" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) >= 20 and all(r["loss"] == r["loss"] for r in log)  # no NaN
    validation = (out / "train" / "validation.jsonl").read_text().splitlines()
    assert len(validation) >= 2
    assert "untrained" in (out / "report.html").read_text()


def test_nothing_left_the_machine(demo_run):
    _, result, guard_log = demo_run
    assert result.returncode == 0
    blocked = guard_log.read_text().splitlines() if guard_log.exists() else []
    assert [line for line in blocked if not any(p in line for p in RAY_STARTUP_PROBES)] == []
