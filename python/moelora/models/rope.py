"""Rotary position embeddings: default, llama3 and YaRN frequency schedules (HF numerics).

Frequencies are computed in float32 on the CPU exactly as transformers' modeling_rope_utils
does. The rotation itself is one native op (moelora.ops.layer: rope_qk, or rope_kv_write fused
with the paged KV-cache write) that takes these frequencies and each token's position, so no
cos/sin tables are built per step or kept per position.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from moelora.models.config import ModelConfig
from moelora.ops import layer as layer_ops


def _default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inv_freq(theta: float, dim: int, p: dict) -> torch.Tensor:
    inv_freq = _default_inv_freq(theta, dim)
    factor = p["factor"]
    low_freq_factor, high_freq_factor = p["low_freq_factor"], p["high_freq_factor"]
    old_context_len = p["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by factor, short ones kept, the band between interpolated.
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def _yarn_inv_freq(theta: float, dim: int, p: dict, max_pos: int) -> tuple[torch.Tensor, float]:
    original_max = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_pos / original_max

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as HF: avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, float(attention_factor)


@dataclass(frozen=True)
class RopeInputs:
    """What rotating one step's q and k takes: positions, frequencies, and (Qwen3) the layer's
    per-head q/k RMSNorm applied just before the rotation. Contexts call `rotate` or
    `rotate_and_write`; both work in place on q and k."""

    positions: torch.Tensor  # int64 [T]
    inv_freq: torch.Tensor  # float32 [head_dim / 2], on the positions' device
    attention_scaling: float = 1.0  # YaRN: multiplies cos and sin
    q_norm: torch.Tensor | None = None  # [head_dim] in the activation dtype
    k_norm: torch.Tensor | None = None
    norm_eps: float = 0.0

    def with_qk_norm(self, q_norm: torch.Tensor, k_norm: torch.Tensor, eps: float) -> RopeInputs:
        return dataclasses.replace(self, q_norm=q_norm, k_norm=k_norm, norm_eps=eps)

    def rotate(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """q [T, Hq, D], k [T, Hkv, D] normed (if set) and rotated in place."""
        layer_ops.rope_qk(q, k, self.positions, self.inv_freq, self.attention_scaling,
                          self.q_norm, self.k_norm, self.norm_eps)

    def rotate_and_write(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         slot_mapping: torch.Tensor, cache) -> None:
        """`rotate`, and the rotated k and v written into the paged cache in the same kernel."""
        layer_ops.rope_kv_write(q, k, v, self.positions, self.inv_freq, slot_mapping, cache,
                                self.attention_scaling, self.q_norm, self.k_norm, self.norm_eps)


class RotaryEmbedding(nn.Module):
    """The model's frequency schedule; `forward(positions)` gives the step's RopeInputs."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim, theta, p = config.head_dim, config.rope_theta, config.rope_params
        self.attention_scaling = 1.0
        with torch.device("cpu"):  # HF computes the schedule on the CPU
            if config.rope_type == "default":
                inv_freq = _default_inv_freq(theta, dim)
            elif config.rope_type == "llama3":
                inv_freq = _llama3_inv_freq(theta, dim, p)
            else:
                inv_freq, self.attention_scaling = _yarn_inv_freq(
                    theta, dim, p, config.max_position_embeddings)
        device = torch.get_default_device()  # the device the model is being built on
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    def forward(self, positions: torch.Tensor) -> RopeInputs:
        """positions int64 [T] -> the step's RopeInputs."""
        return RopeInputs(positions, self.inv_freq.to(positions.device), self.attention_scaling)
