"""Row-wise Triton kernels: RMSNorm fused with the residual add, SwiGLU, RoPE in place.

Each replaces two to five torch launches (and their intermediate tensors) with one pass over
the data, and rounds where the torch reference rounds: everything in float32, one rounding to
the model's dtype at the end (the residual stream stays float32), so the two paths differ by
the order of a float32 sum at most, not by a formula.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_r, stride_o, stride_ro, n_cols, eps,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x32 = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        # The residual stream is float32 (res_out is a float32 buffer): the sum is not rounded.
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x32 = r.to(tl.float32) + x32
        tl.store(res_out_ptr + row * stride_ro + cols, x32, mask=mask)
    rstd = tl.rsqrt(tl.sum(x32 * x32, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = x32 * rstd * w
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """norm(x) in the weight's dtype, or (that of x + residual, x + residual in float32), for
    x [rows, hidden]."""
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty(x2.shape, dtype=weight.dtype, device=x2.device)
    res_out = out if residual is None else torch.empty_like(x2, dtype=torch.float32)
    res = x2 if residual is None else residual.reshape(-1, x.shape[-1])
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, res, weight, out, res_out,
            x2.stride(0), res.stride(0), out.stride(0), res_out.stride(0), x2.shape[1], eps,
            HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(x2.shape[1]),
            num_warps=8 if x2.shape[1] >= 4096 else 4,
        )  # fmt: skip
    if residual is None:
        return out.view_as(x)
    return out.view_as(x), res_out.view_as(x)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    g32 = gate.to(tl.float32)
    act = g32 / (1.0 + tl.exp(-g32))  # float32 up to the product, rounded once
    tl.store(out_ptr + row * stride_o + cols, (act * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dimension."""
    x = gate_up.reshape(-1, gate_up.shape[-1])
    n = x.shape[1] // 2
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(n))
    if x.shape[0]:
        _silu_and_mul_kernel[(x.shape[0], triton.cdiv(n, block))](
            x, out, x.stride(0), out.stride(0), n, BLOCK=block
        )
    return out.view(*gate_up.shape[:-1], n)


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, stride_t, stride_h, stride_c, n_heads, half,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    dmask = d < half
    mask = (heads < n_heads)[:, None] & dmask[None, :]
    # cos/sin repeat their first half in the second (cat(freqs, freqs)): read the first half.
    c = tl.load(cos_ptr + t * stride_c + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + t * stride_c + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    ptr = x_ptr + t * stride_t + heads[:, None] * stride_h + d[None, :]
    x1 = tl.load(ptr, mask=mask, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = tl.load(ptr + half, mask=mask, other=0.0).to(tl.float32)
    # float32 throughout (cos/sin tables are float32), one rounding to x's dtype at the store.
    out1 = x1 * c - x2 * s
    out2 = x2 * c + x1 * s
    tl.store(ptr, out1.to(dtype), mask=mask)
    tl.store(ptr + half, out2.to(dtype), mask=mask)


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [tokens, heads, head_dim] (a strided view is fine) in place; returns x."""
    tokens, heads, dim = x.shape
    if x.stride(2) != 1 or cos.stride(1) != 1 or sin.stride() != cos.stride():
        raise ValueError("rotary_ needs unit stride along head_dim and matching cos/sin")
    half = dim // 2
    block_h = min(16, triton.next_power_of_2(heads))
    if tokens:
        _rotary_kernel[(tokens, triton.cdiv(heads, block_h))](
            x, cos, sin, x.stride(0), x.stride(1), cos.stride(0), heads, half,
            BLOCK_H=block_h, BLOCK_D=triton.next_power_of_2(half),
        )  # fmt: skip
    return x
