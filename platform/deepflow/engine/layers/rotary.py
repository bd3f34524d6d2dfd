"""Rotary position embedding with the scaling variants found in Llama, Mistral and Qwen2 configs.

Each variant only changes the inverse frequencies (and, for YaRN, a scale on cos/sin); the
rotation itself is the "rotate half" form those checkpoints were trained with.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from deepflow.engine import kernels


def _default(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))


def _dynamic_ntk(
    theta: float, dim: int, s: dict[str, Any], max_pos: int, seq_len: int
) -> torch.Tensor:
    # Enlarge the base so the lowest frequency still fits seq_len; identity up to max_pos.
    seq_len = max(seq_len, max_pos)
    factor = s["factor"]
    base = theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return _default(base, dim)


def _llama3(theta: float, dim: int, s: dict[str, Any]) -> torch.Tensor:
    inv_freq = _default(theta, dim)
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(in_band, blended, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(theta: float, dim: int, s: dict[str, Any], max_pos: int) -> tuple[torch.Tensor, float]:
    original = s["original_max_position_embeddings"]
    factor = s.get("factor") or max_pos / original
    attention = s.get("attention_factor")
    if attention is None:
        mscale, mscale_all = s.get("mscale"), s.get("mscale_all_dim")
        if mscale and mscale_all:
            attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
        else:
            attention = _yarn_mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def dim_for(rotations: float) -> float:
        # The rotary dimension that turns `rotations` times over the original context.
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_for(beta_fast), dim_for(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(
        0, 1
    )
    keep = 1 - ramp  # 1 where the original frequency is kept (extrapolated), 0 where interpolated
    pos_freqs = theta ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv_freq, float(attention)


def rope_inv_freq(
    head_dim: int,
    theta: float,
    scaling: dict[str, Any] | None,
    max_position_embeddings: int,
    max_model_len: int,
) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim / 2] in float32, scale applied to cos and sin)."""
    kind = "default" if scaling is None else scaling["rope_type"]
    if scaling is None or kind == "default":
        return _default(theta, head_dim), 1.0
    if kind == "linear":
        return _default(theta, head_dim) / scaling["factor"], 1.0
    if kind == "dynamic":
        # Fixed at the engine's longest sequence: the cache must not hold keys rotated
        # with different bases, so the base cannot grow per step as an uncached model's can.
        return _dynamic_ntk(theta, head_dim, scaling, max_position_embeddings, max_model_len), 1.0
    if kind == "llama3":
        return _llama3(theta, head_dim, scaling), 1.0
    if kind == "yarn":
        return _yarn(theta, head_dim, scaling, max_position_embeddings)
    raise ValueError(f"unsupported RoPE type {kind!r}")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; cos, sin: [tokens, head_dim]. Computed in float32 (the
    model passes float32 tables), rounded once to x's dtype. The fast path rotates x in place
    (x is a fresh projection's view) and returns it."""
    if kernels.triton_active():
        from deepflow.engine.kernels.elementwise import rotary_

        return rotary_(x, cos, sin)
    x32 = x.float()
    return (x32 * cos[:, None, :] + rotate_half(x32) * sin[:, None, :]).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for a step's positions once; every layer then applies them."""

    inv_freq: torch.Tensor

    def __init__(
        self,
        head_dim: int,
        theta: float,
        scaling: dict[str, Any] | None,
        max_position_embeddings: int,
        max_model_len: int,
    ) -> None:
        super().__init__()
        inv_freq, self.scale = rope_inv_freq(
            head_dim, theta, scaling, max_position_embeddings, max_model_len
        )
        # Computed on the CPU, as the checkpoints' reference does, then moved where the model lives.
        self.register_buffer("inv_freq", inv_freq.to(torch.get_default_device()), persistent=False)

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)
