"""open_clip models and the small heads that score its embeddings, loaded without pickle.

The CLIP model is loaded by open_clip's own factory (through model/loading.py), so a real id (`ViT-L-14` + `openai`)
and the offline tiny bundle (`local-dir:/path`) take the same code path. Heads are plain
state dicts (torch `weights_only=True` or safetensors) of a stack of Linear layers:
- the improved-aesthetic-predictor format (`layers.0`, `layers.2`, `layers.4`, `layers.6`,
  `layers.7`: Linear layers with Dropout between them and no activation; input is the
  L2-normalised CLIP ViT-L/14 image embedding, output a 1-10 style score);
- a single linear head (`weight`, `bias`), the format of LAION's linear aesthetic heads.
The NSFW head uses the same formats; its output is a logit, turned into a probability.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

_LAYER_KEY = re.compile(r"^(?:layers\.)?(\d+)\.(weight|bias)$")


@dataclass
class LoadedClip:
    model: nn.Module
    preprocess: object  # torchvision transform: PIL image -> (3, S, S) tensor
    tokenizer: object  # list[str] -> (B, context_length) token ids
    image_size: int
    embed_dim: int


def load_scoring_clip(model_id: str, pretrained: str | None, device: str = "cpu") -> LoadedClip:
    """Load through model/loading.py (local folders and "local-dir:" ids ignore `pretrained`)."""
    from model.loading import load_open_clip, open_clip_name

    if is_local_clip(model_id):
        pretrained = None
    loaded = load_open_clip(open_clip_name(model_id), pretrained, device=device)
    model = loaded.model
    size = model.visual.image_size
    image_size = size[0] if isinstance(size, tuple | list) else int(size)
    embed_dim = getattr(model.visual, "output_dim", None)
    if embed_dim is None:  # towers without the attribute (timm, custom): ask the model itself
        with torch.inference_mode():
            probe = torch.zeros(1, 3, image_size, image_size, device=device)
            embed_dim = model.encode_image(probe).shape[-1]
    return LoadedClip(model, loaded.preprocess, loaded.tokenizer, image_size, int(embed_dim))


def is_local_clip(model_id: str) -> bool:
    from model.loading import open_clip_name

    return open_clip_name(model_id).startswith("local-dir:")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A tensor state dict from safetensors or a torch file, never unpickling objects."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


class EmbeddingHead(nn.Module):
    """Linear layers applied in sequence (no activations, as in the aesthetic predictor)."""

    def __init__(self, layers: list[nn.Linear]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    @property
    def in_features(self) -> int:
        return self.layers[0].in_features

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B,)
        x = embedding
        for layer in self.layers:
            x = layer(x)
        return x[:, 0]


def head_from_state_dict(state: dict[str, torch.Tensor]) -> EmbeddingHead:
    """Build a head from a single-linear or `layers.N.*` state dict."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if set(state) == {"weight", "bias"}:
        state = {"0.weight": state["weight"], "0.bias": state["bias"]}
    by_index: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _LAYER_KEY.match(key)
        if match is None:
            raise ValueError(f"unexpected key {key!r} in head weights (want layers.N.weight/bias)")
        by_index.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
    layers = []
    for index in sorted(by_index):
        weight = by_index[index]["weight"]
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in by_index[index])
        layer.load_state_dict(by_index[index])
        layers.append(layer)
    if not layers or layers[-1].out_features != 1:
        raise ValueError("head weights must end in a layer with one output")
    return EmbeddingHead(layers).eval()


def load_head(path: str | Path, embed_dim: int) -> EmbeddingHead:
    head = head_from_state_dict(read_state_dict(path))
    if head.in_features != embed_dim:
        raise ValueError(
            f"head {path} expects {head.in_features}-d embeddings but the CLIP model gives "
            f"{embed_dim}-d (the improved aesthetic predictor needs ViT-L-14, 768-d)"
        )
    return head


def file_id(path: str | Path | None) -> str | None:
    """`path@sha256[:12]` for the manifest, so a changed weights file changes the record."""
    if path is None:
        return None
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    return f"{path}@{digest}"
