"""The offline tiny-model bundle loads and runs through the real ecosystem loaders."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from model.cli import main as models_main
from model.loading import (
    ModelLoadError,
    load_captioner,
    load_open_clip,
    load_sd3_components,
    load_vae,
)

pytestmark = pytest.mark.timeout(120)


def _file_hashes(root: Path, pattern: str = "*") -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob(pattern))
        if path.is_file()
    }


def test_bundle_describes_itself_and_follows_sd3_conventions(tiny_models: Path):
    manifest = json.loads((tiny_models / "tiny_models.json").read_text())
    assert manifest["random_weights"] is True and manifest["seed"] == 0
    assert "not for quality" in (tiny_models / "README.md").read_text().lower()
    index = json.loads((tiny_models / "sd3" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    vae = json.loads((tiny_models / "sd3" / "vae" / "config.json").read_text())
    assert vae["latent_channels"] == 16 and len(vae["block_out_channels"]) == 4  # downsample 8
    assert (vae["scaling_factor"], vae["shift_factor"]) == (1.5305, 0.0609)
    scheduler = json.loads(
        (tiny_models / "sd3" / "scheduler" / "scheduler_config.json").read_text()
    )
    assert scheduler["shift"] == 3.0


def test_make_tiny_is_deterministic_per_seed(tiny_models: Path, tmp_path: Path):
    assert models_main(["make-tiny", str(tmp_path / "again"), "--seed", "0"]) == 0
    # Every file, weights and tokenizers alike, is byte-identical for the same seed.
    assert _file_hashes(tiny_models) == _file_hashes(tmp_path / "again")
    models_main(["make-tiny", str(tmp_path / "other"), "--seed", "1"])
    weights, other = (
        _file_hashes(tiny_models, "*.safetensors"),
        _file_hashes(tmp_path / "other", "*.safetensors"),
    )
    assert len(weights) == 7 and all(other[name] != digest for name, digest in weights.items())


def test_clip_tokenizers_use_the_real_clip_vocabulary(tiny_models: Path):
    import open_clip
    from transformers import AutoTokenizer

    text = "A photo of a Cat, sitting on 2 red chairs!"
    clip_l = AutoTokenizer.from_pretrained(tiny_models / "sd3" / "tokenizer")
    clip_g = AutoTokenizer.from_pretrained(tiny_models / "sd3" / "tokenizer_2")
    reference = open_clip.SimpleTokenizer().encode(text)
    assert clip_l(text).input_ids == [49406, *reference, 49407]
    assert clip_l.model_max_length == clip_g.model_max_length == 77
    # SD3 pads CLIP-L with <|endoftext|> and CLIP-G with "!" (id 0).
    assert clip_l("hi", padding="max_length").input_ids[-1] == 49407
    assert clip_g("hi", padding="max_length").input_ids[-1] == 0


def test_sd3_pipeline_generates_images_and_loaders_agree(tiny_models: Path):
    from diffusers import StableDiffusion3Pipeline

    def generate(pipeline) -> torch.Tensor:
        return pipeline(
            ["a red cat", "a blue boat"],
            height=64,
            width=64,
            num_inference_steps=2,
            guidance_scale=5.0,
            max_sequence_length=77,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        ).images

    images = generate(StableDiffusion3Pipeline.from_pretrained(tiny_models / "sd3"))
    assert images.shape == (2, 3, 64, 64)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert images.std() > 0
    components = load_sd3_components(tiny_models / "sd3")
    assert components.vae.config.latent_channels == 16
    bare_vae = load_vae(tiny_models / "sd3" / "vae")  # a VAE folder on its own loads too
    assert bare_vae.config.shift_factor == components.vae.config.shift_factor == 0.0609
    torch.testing.assert_close(generate(components.pipeline()), images)


def test_open_clip_scorer_loads_from_a_local_folder_and_runs(tiny_models: Path):
    scorer = load_open_clip(tiny_models / "open_clip")
    image = scorer.preprocess(Image.new("RGB", (50, 40), (200, 10, 10)))
    assert image.shape == (3, 32, 32)
    with torch.no_grad():
        image_features = scorer.model.encode_image(image[None], normalize=True)  # (1, 32)
        text_features = scorer.model.encode_text(
            scorer.tokenizer(["a red square", "a dog"]), normalize=True
        )
    assert image_features.shape == (1, 32) and text_features.shape == (2, 32)
    similarities = image_features @ text_features.T
    assert torch.isfinite(similarities).all() and not torch.allclose(
        similarities[0, 0], similarities[0, 1]
    )


def test_captioner_generates_batched_with_left_padding(tiny_models: Path):
    model, processor = load_captioner(tiny_models / "captioner")
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True,
        )
        for question in ("Describe.", "Describe this photo in one long detailed sentence.")
    ]
    assert prompts[0].endswith("ASSISTANT:") and "<image>" in prompts[0]
    images = [Image.new("RGB", (40, 30), (250, 0, 0)), Image.new("RGB", (30, 60), (0, 0, 250))]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    assert (
        inputs["input_ids"][0, 0] == processor.tokenizer.pad_token_id
    )  # shorter prompt padded left
    batched = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    single_inputs = processor(images=images[:1], text=prompts[:1], return_tensors="pt")
    single = model.generate(**single_inputs, max_new_tokens=4, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    assert batched.shape == (2, prompt_length + 4)
    assert (
        batched[0, prompt_length:].tolist()
        == single[0, single_inputs["input_ids"].shape[1] :].tolist()
    )
    assert all(isinstance(text, str) for text in processor.batch_decode(batched[:, prompt_length:]))


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_unreachable_models_raise_errors_that_say_how_to_use_a_local_copy(tmp_path: Path):
    with pytest.raises(ModelLoadError) as hub_error:
        load_vae("rectiflow-tests/no-such-model")
    assert "rectiflow-tests/no-such-model" in str(hub_error.value)
    assert "local directory" in str(hub_error.value) and "huggingface-cli download" in str(
        hub_error.value
    )
    with pytest.raises(ModelLoadError) as open_clip_error:
        load_open_clip("ViT-B-32", "openai")
    assert "ViT-B-32" in str(
        open_clip_error.value
    ) and "timm/vit_base_patch32_clip_224.openai" in str(open_clip_error.value)
    with pytest.raises(ModelLoadError, match="local path"):
        load_captioner(tmp_path)
