"""Write the offline tiny-model bundle: random-weight models in the real on-disk formats.

    OUT_DIR/sd3/        diffusers StableDiffusion3Pipeline folder (VAE, CLIP-L, CLIP-G, T5, MMDiT)
    OUT_DIR/open_clip/  open_clip model: open_clip_config.json + open_clip_model.safetensors
    OUT_DIR/captioner/  transformers LLaVA model + processor with a chat template

Tests and the demo load these through exactly the loaders real checkpoints use
(`StableDiffusion3Pipeline.from_pretrained`, `open_clip.create_model_and_transforms("local-dir:...")`,
`AutoModelForImageTextToText` / `AutoProcessor`), so only the sizes differ from production.
Everything is seeded: the same seed writes byte-identical weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    T5Config,
    T5EncoderModel,
)

from model.tiny_tokenizers import (
    CLIP_MAX_LENGTH,
    IMAGE_TOKEN,
    LLAVA_CHAT_TEMPLATE,
    build_clip_tokenizer,
    build_llama_tokenizer,
    build_t5_tokenizer,
    english_corpus,
)

# Widths chosen so the SD3 contracts hold: CLIP-L + CLIP-G hidden (32 + 32) <= T5 d_model (64)
# = joint_attention_dim, and CLIP-L + CLIP-G pooled (32 + 32) = pooled_projection_dim (64).
CLIP_L_WIDTH = 32
CLIP_G_WIDTH = 32
T5_WIDTH = 64
MMDIT_HEADS, MMDIT_HEAD_DIM = 2, 16
# SD3's released VAE statistics; random weights make them meaningless but keep the code path.
VAE_SCALING_FACTOR = 1.5305
VAE_SHIFT_FACTOR = 0.0609
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

README = """# rectiflow tiny-model bundle

Random weights, generated offline by `rectiflow models make-tiny` (seed {seed}).
NOT for quality: these models exist so tests and demos run the real loading and inference code
paths (diffusers, open_clip, transformers) without network access.

- sd3/: diffusers StableDiffusion3Pipeline (VAE 16 latent channels, downsample 8; CLIP-L/G-like
  text encoders with the real CLIP BPE vocabulary; T5 encoder with a sentencepiece tokenizer
  trained on a generated corpus; SD3Transformer2DModel with QK RMSNorm; flow-matching scheduler
  with shift 3.0).
- open_clip/: load with open_clip.create_model_and_transforms("local-dir:<this>/open_clip").
- captioner/: LLaVA (CLIP vision tower + Llama text model); load with
  AutoModelForImageTextToText and AutoProcessor.
"""


def _seeded(seed: int, offset: int) -> None:
    # One fixed offset per model, so adding a model never shifts another model's weights.
    torch.manual_seed(seed * 1000 + offset)


def _clip_text_encoder(seed: int, offset: int, width: int, act: str) -> CLIPTextModelWithProjection:
    _seeded(seed, offset)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=4 * width,
        projection_dim=width,
        num_hidden_layers=3,  # >= 2 so the penultimate hidden state SD3 uses is a real layer
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act=act,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )
    return CLIPTextModelWithProjection(config).eval()


def _t5_encoder(seed: int, vocab_size: int) -> T5EncoderModel:
    _seeded(seed, 3)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=T5_WIDTH,
        d_kv=32,
        d_ff=128,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as in SD3's T5-XXL
        is_encoder_decoder=False,
        use_cache=False,
    )
    return T5EncoderModel(config).eval()


def _vae(seed: int) -> AutoencoderKL:
    _seeded(seed, 4)
    # Four blocks give SD3's downsampling factor of 8; no (post-)quant convs, as in SD3's VAE.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=VAE_SCALING_FACTOR,
        shift_factor=VAE_SHIFT_FACTOR,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def _mmdit(seed: int) -> SD3Transformer2DModel:
    _seeded(seed, 5)
    return SD3Transformer2DModel(
        sample_size=32,  # latent side; 256 px images by default
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=MMDIT_HEAD_DIM,
        num_attention_heads=MMDIT_HEADS,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=MMDIT_HEADS * MMDIT_HEAD_DIM,
        pooled_projection_dim=CLIP_L_WIDTH + CLIP_G_WIDTH,
        out_channels=16,
        pos_embed_max_size=32,  # latent grids up to 64 x 64 (512 px)
        qk_norm="rms_norm",
    ).eval()


def write_tiny_sd3(out_dir: Path, seed: int) -> Path:
    """A diffusers SD3 folder that StableDiffusion3Pipeline.from_pretrained loads."""
    # A word-level T5 vocabulary, like the real one (32k pieces): a caption becomes ~15 pieces,
    # not 40+ characters, so the T5 context can be as short as with real models.
    t5_corpus = english_corpus(seed, num_lines=6000, num_words=8000)
    tokenizer_3 = build_t5_tokenizer(t5_corpus, out_dir / "tokenizer_3", vocab_size=8000)
    pipeline = StableDiffusion3Pipeline(
        transformer=_mmdit(seed),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae(seed),
        text_encoder=_clip_text_encoder(seed, 1, CLIP_L_WIDTH, "quick_gelu"),
        tokenizer=build_clip_tokenizer(pad_token="<|endoftext|>"),
        text_encoder_2=_clip_text_encoder(seed, 2, CLIP_G_WIDTH, "gelu"),
        tokenizer_2=build_clip_tokenizer(pad_token="!"),
        text_encoder_3=_t5_encoder(seed, vocab_size=len(tokenizer_3)),
        tokenizer_3=tokenizer_3,
    )
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def write_tiny_open_clip(out_dir: Path, seed: int) -> Path:
    """An open_clip ViT in the hf-hub folder layout that the "local-dir:" schema reads."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model_cfg = {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 32,
            "layers": 2,
            "width": 32,
            "head_width": 16,
            "patch_size": 8,
        },
        # Real CLIP vocabulary size, so open_clip's default SimpleTokenizer ids are all valid.
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 2,
        },
    }
    preprocess_cfg = {
        "image_size": 32,
        "mean": list(OPENAI_MEAN),
        "std": list(OPENAI_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    _seeded(seed, 6)
    model = open_clip.CLIP(**model_cfg).eval()
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, out_dir / "open_clip_model.safetensors", metadata={"format": "pt"})
    return out_dir


def write_tiny_captioner(out_dir: Path, seed: int, corpus: list[str]) -> Path:
    """A LLaVA-style captioner: CLIP vision tower -> MLP projector -> tiny Llama."""
    tokenizer = build_llama_tokenizer(corpus, out_dir)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    _seeded(seed, 7)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=list(OPENAI_MEAN),
        image_std=list(OPENAI_STD),
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir


def _drop_load_time_keys(out_dir: Path) -> None:
    # transformers records how the tokenizer was loaded while building it ("local_files_only");
    # such keys describe this process, not the tokenizer, and would leak into later loads.
    for path in sorted(out_dir.rglob("tokenizer_config.json")):
        config = json.loads(path.read_text())
        for key in ("is_local", "local_files_only"):
            config.pop(key, None)
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def make_tiny_bundle(out_dir: str | Path, seed: int = 0) -> Path:
    """Write sd3/, open_clip/ and captioner/ under out_dir; returns out_dir as a Path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = english_corpus(seed)
    writers = [
        ("sd3", lambda: write_tiny_sd3(out_dir / "sd3", seed)),
        ("open_clip", lambda: write_tiny_open_clip(out_dir / "open_clip", seed)),
        ("captioner", lambda: write_tiny_captioner(out_dir / "captioner", seed, corpus)),
    ]
    for _name, write in tqdm(writers, desc="tiny models", unit="model"):
        write()
    _drop_load_time_keys(out_dir)
    (out_dir / "README.md").write_text(README.format(seed=seed))
    manifest = {
        "kind": "rectiflow-tiny-models",
        "seed": seed,
        "random_weights": True,
        "components": [name for name, _ in writers],
    }
    (out_dir / "tiny_models.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir
