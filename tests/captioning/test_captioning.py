"""Captioning: prompts, cleaning, the transformers backend and the caption stage (local + Ray)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from decision_factory import scored_uids, write_dedup, write_select_shard
from download_factory import photo, write_download_run

from captioning.backends import TransformersCaptioner
from captioning.cleaning import CleaningConfig, clean_caption, fit_budget, strip_boilerplate
from captioning.config import CaptionConfig, GenerationParams
from captioning.stage import CAPTION_READS, CaptionStage, run_caption
from captioning.templates import PROMPTS, resolve_prompt
from pipeline.core.lineage import NotReady, download_shards, plan_lineage
from pipeline.core.manifest import read_manifests
from pipeline.core.runners import RunnerConfig
from pipeline.core.stage import run_shard

pytestmark = pytest.mark.timeout(180)


def test_registered_prompts_never_change():
    # Changing a registered text silently would mix captions of two prompts under one id.
    assert {p.id: p.hash for p in PROMPTS.values()} == {
        "detailed_v1": "a14949a84aae72eb", "short_v1": "43f058533e8b3200"}
    for word in ("colours", "relative", "text"):
        assert word in PROMPTS["detailed_v1"].text


def test_custom_prompts_need_a_new_id():
    assert resolve_prompt("mine_v1", "Say what you see.").hash != PROMPTS["short_v1"].hash
    with pytest.raises(ValueError, match="registered prompt with other text"):
        resolve_prompt("detailed_v1", "Something else.")
    with pytest.raises(ValueError, match="unknown prompt_id"):
        resolve_prompt("nope")


@pytest.mark.parametrize("raw,expected", [
    ("The image shows a red car parked on the left.", "A red car parked on the left."),
    ("In this image, we can see two dogs on a beach.", "Two dogs on a beach."),
    ("This is a photograph of an old man.", "An old man."),
    ("Sure! Here is a description: A blue sky.", "A blue sky."),
    ("The picture depicts: a cat.", "A cat."),
    ("The scene is bright and sunny.", "The scene is bright and sunny."),  # content, not filler
])
def test_boilerplate_openings_are_removed(raw, expected):
    assert strip_boilerplate(raw) == expected


@pytest.mark.parametrize("raw,reason", [
    ("", "empty_caption"), ("   \n ", "empty_caption"), ("The image shows", "empty_caption"),
    (None, "empty_caption"), ("I'm sorry, but I can't describe this image.", "refusal"),
    ("I cannot help with that request.", "refusal"), ("As an AI, I do not ...", "refusal"),
    ("a cat a cat a cat a cat a cat a cat a cat a cat", "repetitive_caption"),
])
def test_empty_refused_and_looping_captions_are_rejected_with_a_reason(raw, reason):
    cleaned = clean_caption(raw, CleaningConfig())
    assert cleaned.text is None and cleaned.reason == reason


def test_long_captions_are_cut_at_a_sentence_within_the_clip_budget(tiny_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models / "sd3" / "tokenizer")
    count = lambda text: len(tokenizer(text).input_ids)  # noqa: E731
    sentence = "A small red boat floats on a calm blue lake under a cloudy grey sky."
    raw = "The image shows " + " ".join([sentence] * 10)
    cleaned = clean_caption(raw, CleaningConfig(max_tokens=77, reject_repetitive=False), count)
    assert cleaned.reason is None and cleaned.text.endswith(".")
    assert count(cleaned.text) <= 77 < count(cleaned.text + " " + sentence)
    unlimited = clean_caption(raw, CleaningConfig(max_tokens=None, reject_repetitive=False), count)
    assert unlimited.text.count(sentence) == 10
    words = fit_budget("one two three four five six", 5, lambda t: len(t.split()) + 2)
    assert words == "one two three"  # a single long sentence is cut between words


def test_generation_params_record_only_what_is_in_effect():
    greedy = json.loads(GenerationParams(max_new_tokens=40).to_json())
    assert greedy["do_sample"] is False and "temperature" not in greedy
    sampled = json.loads(GenerationParams(do_sample=True, temperature=0.5, seed=3).to_json())
    assert (sampled["temperature"], sampled["seed"]) == (0.5, 3)
    with pytest.raises(ValueError):
        GenerationParams(top_p=0.0)


@pytest.fixture(scope="module")
def captioner_config(tiny_models) -> CaptionConfig:
    config = CaptionConfig(model=str(tiny_models / "captioner"), batch_size=4, image_size=64)
    config.generation.max_new_tokens = 8
    config.cleaning.reject_repetitive = False  # random tiny weights loop; real VLMs rarely do
    return config


def test_batched_generation_equals_one_by_one(captioner_config):
    captioner = TransformersCaptioner(captioner_config)
    images = [photo("astronaut", (64, 48)), photo("coffee", (40, 40)), photo("chelsea", (80, 50))]
    batched = captioner.caption(images)
    assert batched == [captioner.caption([im])[0] for im in images]
    assert len(batched) == 3 and all(isinstance(t, str) and t for t in batched)


class _ScriptedCaptioner:
    """Stands in for the VLM's text only, to drive every rejection path through the stage."""

    model_id, model_revision = "scripted", "r1"

    def __init__(self, texts: list[str]):
        self.texts = list(texts)

    def caption(self, images):
        return [self.texts.pop(0) for _ in images]


def test_stage_records_rejections_with_provenance(captioner_config, tmp_path):
    write_download_run(tmp_path, shards=1, rows=4, failures_every=0)
    stage = CaptionStage(captioner_config)
    stage.captioner = _ScriptedCaptioner(["The image shows a ginger cat.", "", "I'm sorry, I can't.",
                                          "This is a photo of a rocket."])
    manifest, ran = run_shard(stage, download_shards(tmp_path)[0], tmp_path / "caption")
    rows = pq.read_table(tmp_path / "caption" / "00000.parquet").to_pylist()
    assert ran and [r["caption_reason"] for r in rows] == [None, "empty_caption", "refusal", None]
    assert [r["caption_synthetic"] for r in rows] == ["A ginger cat.", None, None, "A rocket."]
    assert rows[2]["caption_raw"] == "I'm sorry, I can't."
    assert rows[0]["caption_original"] == "an astronaut in a white suit in front of a flag"
    assert rows[0]["caption_prompt_id"] == "detailed_v1" and rows[0]["caption_model_revision"] == "r1"
    assert rows[0]["caption_prompt_hash"] == PROMPTS["detailed_v1"].hash
    assert json.loads(rows[0]["caption_generation"])["max_new_tokens"] == 8
    assert manifest.reasons == {"empty_caption": 1, "refusal": 1} and manifest.rows_out == 2


def test_run_caption_covers_kept_samples_and_resumes(captioner_config, tmp_path):
    write_download_run(tmp_path, shards=1, rows=5)  # row 3 failed to download
    uids = scored_uids(tmp_path, "00000")
    assert uids == ["s000r0000", "s000r0001", "s000r0002", "s000r0004"]
    write_select_shard(tmp_path, "00000", {u: u != "s000r0001" for u in uids})
    write_dedup(tmp_path, {"00000": {"s000r0000": "kept", "s000r0001": None,
                                     "s000r0002": "kept", "s000r0004": "kept"}})
    manifests = run_caption(captioner_config, tmp_path)
    rows = pq.read_table(tmp_path / "caption" / "00000.parquet").to_pylist()
    assert [r["uid"] for r in rows] == ["s000r0000", "s000r0002", "s000r0004"]
    assert all(r["caption_synthetic"] and r["caption_original"] for r in rows)
    assert manifests[0].models["prompt"] == f"detailed_v1@{PROMPTS['detailed_v1'].hash}"
    # The manifest records the checksums its upstream manifests hold, not a run-wide digest.
    (spec,) = plan_lineage(tmp_path, CAPTION_READS).shards
    assert manifests[0].inputs == spec.checksums and "dedup/00000.parquet" in spec.checksums
    again = run_caption(captioner_config, tmp_path)
    assert again == manifests  # same manifest: the shard was skipped, not redone


def test_shards_whose_decisions_are_missing_are_reported_not_captioned(captioner_config, tmp_path):
    write_download_run(tmp_path, shards=3, rows=1, failures_every=0)
    write_select_shard(tmp_path, "00000", {u: True for u in scored_uids(tmp_path, "00000")})
    with pytest.raises(NotReady, match=r"2 shard\(s\) not ready.*select.*00001, 00002"):
        run_caption(captioner_config, tmp_path)
    assert [m.shard for m in read_manifests(tmp_path / "caption")] == ["00000"]  # the ready one


@pytest.mark.ray
def test_caption_runs_as_a_ray_actor_pool(captioner_config, tmp_path):
    import ray

    write_download_run(tmp_path, shards=2, rows=2, failures_every=0)
    runner = RunnerConfig(backend="ray", concurrency=1, num_cpus=1, num_gpus=0)
    try:
        manifests = run_caption(captioner_config, tmp_path, runner)
    finally:
        ray.shutdown()
    assert [m.shard for m in manifests] == ["00000", "00001"]
    assert [m.rows_in for m in read_manifests(tmp_path / "caption")] == [2, 2]
    rows = pq.read_table(tmp_path / "caption" / "00001.parquet").to_pylist()
    assert [r["uid"] for r in rows] == ["s001r0000", "s001r0001"]
