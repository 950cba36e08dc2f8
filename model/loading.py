"""Load external models by hub id or local path, through each ecosystem's own loaders.

- SD3 parts (VAE, text encoders, MMDiT, scheduler): diffusers / transformers `from_pretrained`
  on a diffusers SD3 folder or repository (e.g. stabilityai/stable-diffusion-3.5-medium).
- Scoring CLIP: open_clip's factory (built-in name + pretrained tag or file, "hf-hub:" ids, or
  a local folder with open_clip_config.json).
- Captioner: AutoModelForImageTextToText + AutoProcessor (LLaVA, Qwen2.5-VL, ...).

Every failure is raised as ModelLoadError, which names the model and, for hub ids, says how to
point at a local copy instead (these machines are often offline).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from model.text_encoding import TextEncoders


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names it and says how to fix that."""


def _is_local(id_or_path: str | Path) -> bool:
    return Path(id_or_path).expanduser().exists()


def _how_to_fix(model_id: str) -> str:
    return (
        "If this machine cannot download it: pass a local directory path instead of the id "
        f"(e.g. one made by `huggingface-cli download {model_id} --local-dir DIR`), or pre-download it "
        f"into the Hugging Face cache (`huggingface-cli download {model_id}`, honouring HF_HOME) and "
        "run with HF_HUB_OFFLINE=1. For tests and demos, `rectiflow models make-tiny DIR` writes "
        "offline tiny models in the same formats."
    )


@contextmanager
def _loading(what: str, id_or_path: str | Path, hint: str | None = None) -> Iterator[None]:
    """Turn any loader failure into one ModelLoadError that names the model."""
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as error:  # the loaders raise OSError, ValueError, RuntimeError, HTTP errors
        if _is_local(id_or_path):
            message = f"Could not load {what} from local path {str(id_or_path)!r}: {error}"
        else:
            message = (
                f"Could not load {what} {str(id_or_path)!r} (not a local path, and loading it "
                f"from the hub failed: {type(error).__name__}: {error}). "
                + (hint or _how_to_fix(str(id_or_path)))
            )
        raise ModelLoadError(message) from error


def _subfolder(id_or_path: str | Path, name: str | None) -> str | None:
    # A local folder may be the component itself (config.json at top) rather than a pipeline root.
    path = Path(id_or_path).expanduser()
    if name and _is_local(path) and not (path / name).is_dir() and (path / "config.json").is_file():
        return None
    return name


# ---------------------------------------------------------------- SD3 (diffusers layout)


def load_vae(
    id_or_path: str | Path,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    subfolder: str | None = "vae",
):
    """The AutoencoderKL of an SD3 folder/repository, or of a bare VAE folder or repository.

    A local folder with config.json at its top is read as a bare VAE; for a bare VAE on the
    hub, pass subfolder=None.
    """
    from diffusers import AutoencoderKL

    with _loading("VAE", id_or_path):
        subfolder = _subfolder(id_or_path, subfolder)
        vae = AutoencoderKL.from_pretrained(
            id_or_path, subfolder=subfolder, revision=revision, torch_dtype=dtype
        )
    return vae.eval()


def load_text_encoders(
    id_or_path: str | Path,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    load_t5: bool = True,
) -> TextEncoders:
    """CLIP-L (text_encoder), CLIP-G (text_encoder_2) and optionally T5 (text_encoder_3)."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    def part(model_class, subfolder: str):
        with _loading(f"{subfolder} of SD3 model", id_or_path):
            return model_class.from_pretrained(
                id_or_path, subfolder=subfolder, revision=revision, dtype=dtype
            ).eval()

    def tokenizer(subfolder: str):
        with _loading(f"{subfolder} of SD3 model", id_or_path):
            return AutoTokenizer.from_pretrained(id_or_path, subfolder=subfolder, revision=revision)

    encoders = TextEncoders(
        tokenizer_l=tokenizer("tokenizer"),
        encoder_l=part(CLIPTextModelWithProjection, "text_encoder"),
        tokenizer_g=tokenizer("tokenizer_2"),
        encoder_g=part(CLIPTextModelWithProjection, "text_encoder_2"),
    )
    if load_t5:
        encoders.tokenizer_t5 = tokenizer("tokenizer_3")
        encoders.encoder_t5 = part(T5EncoderModel, "text_encoder_3")
    return encoders


def load_transformer(
    id_or_path: str | Path,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    subfolder: str | None = "transformer",
):
    """The SD3Transformer2DModel (MMDiT) of an SD3 folder/repository (or a bare one, as load_vae)."""
    from diffusers import SD3Transformer2DModel

    with _loading("SD3 transformer", id_or_path):
        subfolder = _subfolder(id_or_path, subfolder)
        return SD3Transformer2DModel.from_pretrained(
            id_or_path, subfolder=subfolder, revision=revision, torch_dtype=dtype
        )


def load_scheduler(id_or_path: str | Path, revision: str | None = None):
    """The FlowMatchEulerDiscreteScheduler (with its shift) of an SD3 folder/repository."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    with _loading("SD3 scheduler", id_or_path):
        return FlowMatchEulerDiscreteScheduler.from_pretrained(
            id_or_path, subfolder="scheduler", revision=revision
        )


@dataclass
class SD3Components:
    vae: object
    text_encoders: TextEncoders
    transformer: object | None
    scheduler: object

    def pipeline(self):
        """A diffusers StableDiffusion3Pipeline over these (shared, not copied) modules."""
        from diffusers import StableDiffusion3Pipeline

        encoders = self.text_encoders
        return StableDiffusion3Pipeline(
            transformer=self.transformer,
            scheduler=self.scheduler,
            vae=self.vae,
            text_encoder=encoders.encoder_l,
            tokenizer=encoders.tokenizer_l,
            text_encoder_2=encoders.encoder_g,
            tokenizer_2=encoders.tokenizer_g,
            text_encoder_3=encoders.encoder_t5,
            tokenizer_3=encoders.tokenizer_t5,
        )


def load_sd3_components(
    id_or_path: str | Path,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    load_t5: bool = True,
    load_transformer_weights: bool = True,
) -> SD3Components:
    """Everything in an SD3 diffusers folder/repository; skip T5 or the MMDiT when not needed."""
    transformer = (
        load_transformer(id_or_path, revision, dtype) if load_transformer_weights else None
    )
    return SD3Components(
        vae=load_vae(id_or_path, revision, dtype),
        text_encoders=load_text_encoders(id_or_path, revision, dtype, load_t5),
        transformer=transformer,
        scheduler=load_scheduler(id_or_path, revision),
    )


# ---------------------------------------------------------------- open_clip (scoring)


@dataclass
class OpenClipModel:
    model: torch.nn.Module
    preprocess: object  # PIL image -> (3, H, W) tensor, the eval transform
    tokenizer: object  # list[str] -> (B, context_length) token ids


def open_clip_name(model_name: str | Path) -> str:
    """open_clip's own spelling: a local folder becomes "local-dir:PATH"; names pass through."""
    text = str(model_name)
    if not text.startswith(("local-dir:", "hf-hub:")) and Path(text).expanduser().is_dir():
        return f"local-dir:{Path(text).expanduser()}"
    return text


def _open_clip_hint(name: str, pretrained: str | None) -> str:
    import open_clip

    repo = name.removeprefix("hf-hub:")
    if pretrained and not name.startswith("hf-hub:"):
        repo = open_clip.get_pretrained_cfg(name, pretrained).get("hf_hub", "").rstrip("/")
    download = f"`huggingface-cli download {repo}` or " if repo else ""
    return (
        f"If this machine cannot download it: {download}place the checkpoint on disk and pass "
        "pretrained=/path/to/open_clip_pytorch_model.bin (or .safetensors) with the same model "
        "name, or pass a local folder holding open_clip_config.json and the weights as the model "
        "name. `rectiflow models make-tiny DIR` writes such a folder (DIR/open_clip) for tests."
    )


def load_open_clip(
    model_name: str | Path,
    pretrained: str | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> OpenClipModel:
    """An open_clip model, e.g. ("ViT-L-14", "openai"), ("hf-hub:org/repo", None) or (DIR, None)."""
    import open_clip

    name = open_clip_name(model_name)
    label = f"open_clip model {name}" + (f" with pretrained={pretrained!r}" if pretrained else "")
    source = model_name if name.startswith("local-dir:") else name
    with _loading(label, source, _open_clip_hint(name, pretrained)):
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, precision=precision
        )
        tokenizer = open_clip.get_tokenizer(name)
    return OpenClipModel(model.eval(), preprocess, tokenizer)


# ---------------------------------------------------------------- captioner (VLM)


def load_captioner(
    id_or_path: str | Path, revision: str | None = None, dtype: torch.dtype = torch.float32
):
    """(model, processor) of a vision-language model, processor padding on the left.

    Left padding keeps each prompt's end next to the tokens `generate` appends in a batch.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    with _loading("captioner", id_or_path):
        model = AutoModelForImageTextToText.from_pretrained(
            id_or_path, revision=revision, dtype=dtype
        )
        processor = AutoProcessor.from_pretrained(id_or_path, revision=revision)
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    return model.eval(), processor
