"""Matmul FLOPs of one MMDiT sample (2 per multiply-add), for MFU.

Counted as torch.utils.flop_counter counts: linear layers, the patch convolution and the two
attention matmuls; elementwise work (norms, activations, softmax) is left out. Matches our
MMDiT exactly, including the last block's text stream that only supplies keys and values.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.mmdit import MMDiTConfig


@dataclass(frozen=True)
class FlopsBreakdown:
    image_stream: int  # patchify, per-token linears of the image stream, output projection
    text_stream: int  # context embedder and per-token linears of the text stream
    adaln: int  # per-sample conditioning: timestep and pooled MLPs, all modulation linears
    attention: int  # Q K^T and attention-weighted V over the joint sequence
    first_layer_inputs: int  # forward FLOPs of layers whose input needs no gradient

    @property
    def forward(self) -> int:
        return self.image_stream + self.text_stream + self.adaln + self.attention

    @property
    def training_step(self) -> int:
        """Forward + backward: backward is twice the forward, except input gradients of the
        layers fed by data (latents, text, timestep sinusoids, pooled), which are not needed."""
        return 3 * self.forward - self.first_layer_inputs


def mmdit_flops(cfg: MMDiTConfig, latent_height: int, latent_width: int, text_tokens: int) -> FlopsBreakdown:
    """FLOPs of one sample with a latent of latent_height x latent_width and `text_tokens`."""
    d, p, t = cfg.hidden_size, cfg.patch_size, text_tokens
    n = (latent_height // p) * (latent_width // p)
    length = n + t
    patch = 2 * n * cfg.in_channels * p * p * d
    context = 2 * t * cfg.joint_attention_dim * d
    image = patch + 2 * n * d * p * p * cfg.out_channels
    text = context
    adaln = 2 * (256 * d + d * d) + 2 * (cfg.pooled_projection_dim * d + d * d) + 2 * d * 2 * d
    attention = 0
    for index in range(cfg.num_layers):
        last, dual = index == cfg.num_layers - 1, index in cfg.dual_attention_layers
        image += 2 * n * (3 + 1 + 8) * d * d  # qkv, output projection, MLP 4D
        adaln += 2 * d * (9 if dual else 6) * d + 2 * d * (2 if last else 6) * d
        if last:  # text supplies keys and values only
            text += 2 * t * 2 * d * d
            attention += 4 * n * length * d
        else:
            text += 2 * t * 12 * d * d
            attention += 4 * length * length * d
        if dual:
            image += 2 * n * 4 * d * d
            attention += 4 * n * n * d
    first_inputs = patch + context + 2 * 256 * d + 2 * cfg.pooled_projection_dim * d
    return FlopsBreakdown(image, text, adaln, attention, first_inputs)
