"""The SD3 MMDiT: a two-stream transformer with one joint attention over [image, text].

Reads top to bottom: config and presets, embeddings, the block, the network. Parameter names
follow diffusers' `SD3Transformer2DModel` checkpoints, so `model/convert.py` is a plain key
rename. The network maps (z_t, t, context, pooled) to a velocity and knows nothing of flows.

Shapes: B batch, C latent channels, N image tokens, T text tokens, D hidden size,
Hh heads, Dh head dim, L = N + T.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class MMDiTConfig:
    """Field names and meaning mirror diffusers' SD3Transformer2DModel config."""

    sample_size: int = 128  # latent side the position table was trained for (base size)
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 24  # depth d
    attention_head_dim: int = 64
    num_attention_heads: int = 24  # d heads: hidden size 64 d
    joint_attention_dim: int = 4096  # width of the text context sequence
    caption_projection_dim: int = 1536  # must equal the hidden size
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 192
    qk_norm: str | None = None  # None or "rms_norm"
    dual_attention_layers: tuple[int, ...] = field(default_factory=tuple)  # SD3.5 MMDiT-X

    def __post_init__(self) -> None:
        object.__setattr__(self, "dual_attention_layers", tuple(self.dual_attention_layers))
        if self.caption_projection_dim != self.hidden_size:
            raise ValueError(
                f"caption_projection_dim={self.caption_projection_dim} must equal the hidden size "
                f"{self.hidden_size}: both streams meet in one attention"
            )
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"qk_norm={self.qk_norm!r}: allowed None or 'rms_norm'")

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_preset(cls, name: str, **overrides) -> MMDiTConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown MMDiT preset {name!r}; allowed: {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return {**asdict(self), "dual_attention_layers": list(self.dual_attention_layers)}


def _by_depth(depth: int, **kwargs) -> MMDiTConfig:
    # The paper's scaling rule: hidden size 64 d, d heads of dim 64, d blocks.
    return MMDiTConfig(
        num_layers=depth, num_attention_heads=depth, caption_projection_dim=64 * depth, **kwargs
    )


PRESETS: dict[str, MMDiTConfig] = {
    # tiny: for tests, small enough for CPU but every feature switchable by overrides
    "tiny": MMDiTConfig(
        sample_size=8, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=32,
        pos_embed_max_size=16,
    ),
    "d2": _by_depth(2, sample_size=32, pos_embed_max_size=96),
    "d4": _by_depth(4, sample_size=32, pos_embed_max_size=96),
    "d24": _by_depth(24),  # SD3-Medium, about 2.0B
    "d38": _by_depth(38, qk_norm="rms_norm"),  # SD3.5-Large layout, about 8.1B
    "sd35-medium": _by_depth(
        24, qk_norm="rms_norm", pos_embed_max_size=384, dual_attention_layers=tuple(range(13))
    ),
}

# ----------------------------------------------------------------------------- embeddings


def timestep_sinusoids(timesteps: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """(B,) -> (B, dim): [cos, sin] at geometric frequencies, as SD3 (flip_sin_to_cos)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=timesteps.device) / half)
    angles = timesteps[:, None].float() * freqs[None, :]  # (B, dim/2)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def sincos_position_table(dim: int, grid: int, base_size: int) -> torch.Tensor:
    """(grid*grid, dim) fixed 2D table; positions scaled so that `base_size` spans the grid."""
    coords = torch.arange(grid, dtype=torch.float32) / (grid / base_size)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (grid, grid) each

    def sincos_1d(pos: torch.Tensor) -> torch.Tensor:  # (M,) -> (M, dim/2), in float64
        omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
        angles = pos.reshape(-1).double()[:, None] * omega[None, :]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    # First half of the channels encodes the column (x), second half the row (y), as SD3.
    return torch.cat([sincos_1d(cols), sincos_1d(rows)], dim=1).float()


class PatchEmbed(nn.Module):
    """Latents (B, C, H, W) -> tokens (B, N, D) plus a centre crop of the position table."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.patch_size, self.max_size = cfg.patch_size, cfg.pos_embed_max_size
        p, dim = cfg.patch_size, cfg.hidden_size
        self.proj = nn.Conv2d(cfg.in_channels, dim, kernel_size=p, stride=p)
        table = sincos_position_table(dim, cfg.pos_embed_max_size, cfg.sample_size // p)
        # Persistent: released checkpoints carry the table, and it is loaded from them.
        self.register_buffer("pos_embed", table[None], persistent=True)  # (1, M*M, D)

    def cropped_positions(self, h: int, w: int) -> torch.Tensor:
        if h > self.max_size or w > self.max_size:
            raise ValueError(f"latent grid {h}x{w} exceeds pos_embed_max_size={self.max_size}")
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        table = self.pos_embed.view(self.max_size, self.max_size, -1)
        return table[top : top + h, left : left + w].reshape(1, h * w, -1)  # (1, N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(x)  # (B, D, H/p, W/p)
        h, w = tokens.shape[-2:]
        tokens = tokens.flatten(2).transpose(1, 2)  # (B, N, D)
        return tokens + self.cropped_positions(h, w).to(tokens.dtype)


class TwoLayerMlp(nn.Module):
    """Linear-SiLU-Linear; names as diffusers' TimestepEmbedding and text projection."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """Conditioning vector c (B, D) = MLP(sinusoids(1000 t)) + MLP(pooled text)."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.timestep_embedder = TwoLayerMlp(256, cfg.hidden_size)
        self.text_embedder = TwoLayerMlp(cfg.pooled_projection_dim, cfg.hidden_size)

    def forward(self, timesteps: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        time = self.timestep_embedder(timestep_sinusoids(timesteps).to(pooled.dtype))
        return time + self.text_embedder(pooled)  # (B, D)


# ----------------------------------------------------------------------------- block parts


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)  # no affine: adaLN provides it


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])  # x (1 + scale) + shift


def gated_add(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(x, gate[:, None], y)  # x + gate y, one kernel


class AdaLNModulation(nn.Module):
    """c (B, D) -> `count` modulation vectors (B, D) each, from SiLU-Linear."""

    def __init__(self, dim: int, count: int):
        super().__init__()
        self.count = count
        self.linear = nn.Linear(dim, count * dim)

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(c)).chunk(self.count, dim=1)


class FeedForward(nn.Module):
    """MLP 4D with tanh-GELU. diffusers names these net.0.proj / net.2 (see convert.py)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class QKRMSNorm(nn.Module):
    """RMSNorm over the head dim with a learned scale (the SD3.5 QK norm)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, x.shape[-1:], self.weight, eps=1e-6)


def project_heads(x, weights, biases, heads: int, norms=()) -> list[torch.Tensor]:
    """One fused GEMM for several projections of x (B, S, D); each -> (B, S, Hh, Dh).

    Concatenating the weights costs one small copy per step and replaces 2-3 GEMMs by one,
    while the parameters keep the checkpoint's separate names.
    """
    fused = F.linear(x, torch.cat(weights), torch.cat(biases))  # (B, S, k D)
    outs = fused.unflatten(-1, (len(weights), heads, -1)).unbind(dim=2)
    norms = (*norms, *[None] * (len(outs) - len(norms)))  # the value projection is not normed
    return [o if norm is None else norm(o) for o, norm in zip(outs, norms, strict=True)]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, S, Hh, Dh) each -> (B, Sq, Hh * Dh); no mask over the joint sequence."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, Hh, S, Dh)
    if q.device.type == "cpu" and (q.dtype != torch.float32 or torch.is_autocast_enabled("cpu")):
        # PyTorch's CPU flash-attention kernel is slow in bf16: forward + backward took 3-4x
        # the fp32 time here (e.g. 18 vs 5 ms for 16 x 4 heads x 112 tokens, AVX512-BF16
        # without AMX), and CPU autocast would cast fp32 inputs back down, so attention runs
        # in fp32 with autocast off: faster, and exact.
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(v.dtype)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    """Image-only attention of SD3.5 dual-attention (MMDiT-X) layers."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        dim, self.heads = cfg.hidden_size, cfg.num_attention_heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.to_out = nn.Linear(dim, dim)
        use_norm = cfg.qk_norm is not None
        self.norm_q = QKRMSNorm(cfg.attention_head_dim) if use_norm else None
        self.norm_k = QKRMSNorm(cfg.attention_head_dim) if use_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lin = (self.to_q, self.to_k, self.to_v)
        q, k, v = project_heads(
            x, [m.weight for m in lin], [m.bias for m in lin], self.heads, (self.norm_q, self.norm_k)
        )
        return self.to_out(attention(q, k, v))  # (B, N, D)


class JointAttention(nn.Module):
    """One attention over the concatenated [image, text] sequence, separate weights per stream.

    In the last block the text output is discarded, so that block's attention has no text
    queries and no text output projection (diffusers computes and drops them).
    """

    def __init__(self, cfg: MMDiTConfig, text_pre_only: bool):
        super().__init__()
        dim, self.heads, self.text_pre_only = cfg.hidden_size, cfg.num_attention_heads, text_pre_only
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.add_k_proj, self.add_v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.add_q_proj = None if text_pre_only else nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.to_add_out = None if text_pre_only else nn.Linear(dim, dim)
        use_norm, hd = cfg.qk_norm is not None, cfg.attention_head_dim
        self.norm_q, self.norm_k = (QKRMSNorm(hd) if use_norm else None for _ in range(2))
        self.norm_added_k = QKRMSNorm(hd) if use_norm else None
        self.norm_added_q = QKRMSNorm(hd) if use_norm and not text_pre_only else None

    def forward(self, img: torch.Tensor, txt: torch.Tensor):
        n = img.shape[1]
        lin = (self.to_q, self.to_k, self.to_v)
        q, k, v = project_heads(
            img, [m.weight for m in lin], [m.bias for m in lin], self.heads, (self.norm_q, self.norm_k)
        )  # (B, N, Hh, Dh) each
        lin = (self.add_k_proj, self.add_v_proj) if self.text_pre_only else (
            self.add_q_proj, self.add_k_proj, self.add_v_proj)
        norms = (self.norm_added_k,) if self.text_pre_only else (self.norm_added_q, self.norm_added_k)
        text = project_heads(txt, [m.weight for m in lin], [m.bias for m in lin], self.heads, norms)
        if self.text_pre_only:  # image queries only
            tk, tv = text
            out = attention(q, torch.cat([k, tk], dim=1), torch.cat([v, tv], dim=1))  # (B, N, D)
            return self.to_out(out), None
        tq, tk, tv = text
        q, k, v = (torch.cat(pair, dim=1) for pair in ((q, tq), (k, tk), (v, tv)))  # (B, L, ..)
        out = attention(q, k, v)  # (B, L, D)
        return self.to_out(out[:, :n]), self.to_add_out(out[:, n:])


class MMDiTBlock(nn.Module):
    """adaLN-Zero block with an image and a text stream meeting in one joint attention."""

    def __init__(self, cfg: MMDiTConfig, index: int):
        super().__init__()
        dim = cfg.hidden_size
        self.text_pre_only = index == cfg.num_layers - 1  # its text output is never used
        self.dual_attention = index in cfg.dual_attention_layers
        self.norm1 = AdaLNModulation(dim, 9 if self.dual_attention else 6)
        self.norm1_context = AdaLNModulation(dim, 2 if self.text_pre_only else 6)
        self.attn = JointAttention(cfg, self.text_pre_only)
        self.attn2 = SelfAttention(cfg) if self.dual_attention else None
        self.ff = FeedForward(dim)
        self.ff_context = None if self.text_pre_only else FeedForward(dim)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, c: torch.Tensor):
        mods = self.norm1(c)  # 6 or 9 x (B, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        img_normed = layer_norm(img)  # (B, N, D)
        img_in = modulate(img_normed, shift_msa, scale_msa)
        if self.text_pre_only:
            scale_c, shift_c = self.norm1_context(c)  # this layer orders scale before shift
            txt_in = modulate(layer_norm(txt), shift_c, scale_c)
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = (
                self.norm1_context(c))
            txt_in = modulate(layer_norm(txt), c_shift_msa, c_scale_msa)  # (B, T, D)

        img_attn, txt_attn = self.attn(img_in, txt_in)
        img = gated_add(img, gate_msa, img_attn)
        if self.attn2 is not None:
            shift_msa2, scale_msa2, gate_msa2 = mods[6:]
            img_attn2 = self.attn2(modulate(img_normed, shift_msa2, scale_msa2))
            img = gated_add(img, gate_msa2, img_attn2)
        img = gated_add(img, gate_mlp, self.ff(modulate(layer_norm(img), shift_mlp, scale_mlp)))
        if self.text_pre_only:
            return img, None
        txt = gated_add(txt, c_gate_msa, txt_attn)
        txt_mlp = self.ff_context(modulate(layer_norm(txt), c_shift_mlp, c_scale_mlp))
        return img, gated_add(txt, c_gate_mlp, txt_mlp)


# ----------------------------------------------------------------------------- network


class MMDiT(nn.Module):
    """forward(x (B,C,H,W), t (B,) in [0,1], context (B,T,4096), pooled (B,2048)) -> (B,C,H,W)."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = cfg = config
        dim = cfg.hidden_size
        self.pos_embed = PatchEmbed(cfg)
        self.time_text_embed = TimeTextEmbed(cfg)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(MMDiTBlock(cfg, i) for i in range(cfg.num_layers))
        self.norm_out = AdaLNModulation(dim, 2)  # (scale, shift) of the final LayerNorm
        self.proj_out = nn.Linear(dim, cfg.patch_size**2 * cfg.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's scheme: xavier linears, adaLN-Zero (modulations and output start at zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        proj = self.pos_embed.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        for mlp in (self.time_text_embed.timestep_embedder, self.time_text_embed.text_embedder):
            nn.init.normal_(mlp.linear_1.weight, std=0.02)
            nn.init.normal_(mlp.linear_2.weight, std=0.02)
        zero_init = [self.norm_out.linear, self.proj_out]
        for block in self.transformer_blocks:
            zero_init += [block.norm1.linear, block.norm1_context.linear]
        for linear in zero_init:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x, t, context, pooled) -> torch.Tensor:
        batch, _, height, width = x.shape
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(batch)
        img = self.pos_embed(x)  # (B, N, D)
        c = self.time_text_embed(t * 1000, pooled)  # (B, D): SD3 embeds 1000 t
        txt = self.context_embedder(context)  # (B, T, D)
        for block in self.transformer_blocks:
            img, txt = block(img, txt, c)
        scale, shift = self.norm_out(c)
        img = self.proj_out(modulate(layer_norm(img), shift, scale))  # (B, N, p*p*C)
        return self.unpatchify(img, height, width)

    def unpatchify(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        p, channels = self.config.patch_size, self.config.out_channels
        h, w = height // p, width // p
        x = tokens.reshape(tokens.shape[0], h, w, p, p, channels)  # (B, h, w, p, p, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(tokens.shape[0], channels, h * p, w * p)
