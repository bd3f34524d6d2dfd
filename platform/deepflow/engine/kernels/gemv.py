"""A bf16/fp16 GEMV for skinny products, y = x W^T (+ b), x [M <= MAX_ROWS, K], W [N, K].

Decode steps of small batches are bound by reading the weights once; cuBLAS reaches ~2.3 TB/s
of an H100's ~3 TB/s on the decoder's shapes (split-K kernels, several launches for some). Here
each program streams BLOCK_N whole rows of W (16-byte loads along K, coalesced), multiplies them
by the few rows of x in float32 and writes its BLOCK_N outputs: one launch, no workspace, W read
exactly once. Rounding: float32 accumulation, one rounding to the output dtype (cuBLAS rounds
the same way; the order of the sum differs, so results differ by a rounding).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 2
"""Largest M this kernel takes; larger batches use the library GEMM (measured on the H100, at
M = 4 cuBLAS is faster on the MLP's shapes)."""


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_ym,
    M: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
    acc0 = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + cols
        if EVEN_K:
            w = tl.load(w_rows + k[None, :], mask=row_ok[:, None], other=0.0)
            x0 = tl.load(x_ptr + k)
        else:
            k_ok = k < K
            w = tl.load(w_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            x0 = tl.load(x_ptr + k, mask=k_ok, other=0.0)
        w = w.to(tl.float32)
        acc0 += w * x0.to(tl.float32)[None, :]
        if M > 1:
            if EVEN_K:
                x1 = tl.load(x_ptr + stride_xm + k)
            else:
                x1 = tl.load(x_ptr + stride_xm + k, mask=k_ok, other=0.0)
            acc1 += w * x1.to(tl.float32)[None, :]
        if M > 2:
            if EVEN_K:
                x2 = tl.load(x_ptr + 2 * stride_xm + k)
            else:
                x2 = tl.load(x_ptr + 2 * stride_xm + k, mask=k_ok, other=0.0)
            acc2 += w * x2.to(tl.float32)[None, :]
        if M > 3:
            if EVEN_K:
                x3 = tl.load(x_ptr + 3 * stride_xm + k)
            else:
                x3 = tl.load(x_ptr + 3 * stride_xm + k, mask=k_ok, other=0.0)
            acc3 += w * x3.to(tl.float32)[None, :]
    if HAS_BIAS:
        bias = tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_N,), tl.float32)
    out_ty = y_ptr.dtype.element_ty
    tl.store(y_ptr + rows, (tl.sum(acc0, axis=1) + bias).to(out_ty), mask=row_ok)
    if M > 1:
        tl.store(y_ptr + stride_ym + rows, (tl.sum(acc1, axis=1) + bias).to(out_ty), mask=row_ok)
    if M > 2:
        y2 = (tl.sum(acc2, axis=1) + bias).to(out_ty)
        tl.store(y_ptr + 2 * stride_ym + rows, y2, mask=row_ok)
    if M > 3:
        y3 = (tl.sum(acc3, axis=1) + bias).to(out_ty)
        tl.store(y_ptr + 3 * stride_ym + rows, y3, mask=row_ok)


@triton.jit
def _gemv_silu_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, INTER, K, stride_xm, stride_wn, stride_ym,
    M: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):  # fmt: skip
    """y[:, j] = silu(x W[j]^T) * (x W[INTER + j]^T): the gate/up GEMV and SwiGLU in one pass,
    rounding gate and up to the output dtype first, then silu(gate) * up once, as the
    two-kernel path (GEMV, then kernels.elementwise.silu_and_mul) does."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < INTER
    g_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
    u_rows = g_rows + INTER * stride_wn
    g0 = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    u0 = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    g1 = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    u1 = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + cols
        if EVEN_K:
            wg = tl.load(g_rows + k[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
            wu = tl.load(u_rows + k[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
            x0 = tl.load(x_ptr + k).to(tl.float32)
        else:
            ok = row_ok[:, None] & (k < K)[None, :]
            wg = tl.load(g_rows + k[None, :], mask=ok, other=0.0).to(tl.float32)
            wu = tl.load(u_rows + k[None, :], mask=ok, other=0.0).to(tl.float32)
            x0 = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
        g0 += wg * x0[None, :]
        u0 += wu * x0[None, :]
        if M > 1:
            if EVEN_K:
                x1 = tl.load(x_ptr + stride_xm + k).to(tl.float32)
            else:
                x1 = tl.load(x_ptr + stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
            g1 += wg * x1[None, :]
            u1 += wu * x1[None, :]
    out_ty = y_ptr.dtype.element_ty
    if HAS_BIAS:
        bg = tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        bu = tl.load(b_ptr + INTER + rows, mask=row_ok, other=0.0).to(tl.float32)
    else:
        bg = tl.zeros((BLOCK_N,), tl.float32)
        bu = tl.zeros((BLOCK_N,), tl.float32)
    gate = (tl.sum(g0, axis=1) + bg).to(out_ty).to(tl.float32)
    up = (tl.sum(u0, axis=1) + bu).to(out_ty).to(tl.float32)
    act = gate / (1.0 + tl.exp(-gate))
    tl.store(y_ptr + rows, (act * up).to(out_ty), mask=row_ok)
    if M > 1:
        gate = (tl.sum(g1, axis=1) + bg).to(out_ty).to(tl.float32)
        up = (tl.sum(u1, axis=1) + bu).to(out_ty).to(tl.float32)
        act = gate / (1.0 + tl.exp(-gate))
        tl.store(y_ptr + stride_ym + rows, (act * up).to(out_ty), mask=row_ok)


def pick_config(m: int, n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps), from timings on the H100 over the decoder's shapes
    (bench/engine_profile.py --what gemv; 1.7-2.9 TB/s against cuBLAS's 1.3-2.6): 8 rows per
    program, 8 warps, 1024 columns per iteration for one row of x and 512 for two (whose two
    accumulators would otherwise crowd the registers)."""
    return 8, min(triton.next_power_of_2(k), 1024 if m == 1 else 512), 8


def pick_silu_config(m: int, inter: int, k: int) -> tuple[int, int, int]:
    """The fused gate/up kernel holds two tiles (gate and up rows): 512 columns."""
    return 8, min(triton.next_power_of_2(k), 512), 8


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `gemv` takes this product (else the caller uses the library GEMM)."""
    return (
        x.dim() == 2
        and 0 < x.shape[0] <= MAX_ROWS
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and weight.dim() == 2
        and weight.stride(1) == 1
        and x.stride(1) == 1
        and x.device.type == "cuda"
    )


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: tuple[int, int, int] | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T (+ bias) for M <= MAX_ROWS, in out_dtype (default x's)."""
    m, k = x.shape
    n = weight.shape[0]
    assert m <= MAX_ROWS and weight.shape[1] == k
    y = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    block_n, block_k, warps = config or pick_config(m, n, k)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, weight if bias is None else bias, y, n, k,
        x.stride(0), weight.stride(0), y.stride(0),
        M=m, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_K=k % block_k == 0, num_warps=warps,
    )  # fmt: skip
    return y


def gemv_silu_and_mul(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """silu(gate) * up of [gate | up] = x @ weight^T (+ bias), weight [2 * inter, K], for
    M <= MAX_ROWS: the MLP's gate/up projection and SwiGLU in one launch."""
    m, k = x.shape
    inter = weight.shape[0] // 2
    assert m <= MAX_ROWS and weight.shape[1] == k and weight.shape[0] == 2 * inter
    y = torch.empty(m, inter, dtype=x.dtype, device=x.device)
    block_n, block_k, warps = config or pick_silu_config(m, inter, k)
    _gemv_silu_kernel[(triton.cdiv(inter, block_n),)](
        x, weight, weight if bias is None else bias, y, inter, k,
        x.stride(0), weight.stride(0), y.stride(0),
        M=m, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_K=k % block_k == 0, num_warps=warps,
    )  # fmt: skip
    return y
