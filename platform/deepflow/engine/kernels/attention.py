"""Paged attention as Triton kernels: the KV write, decode, and prefill over cached prefixes.

Same cache layout and semantics as layers/attention.py (the reference): a layer's cache is
[num_blocks, block_size, kv_heads, head_dim]; position p of a chunk's sequence lives in block
`table[p // block_size]`, slot `p % block_size`; a chunk's i-th token attends to every position
<= start + i. Blocks are gathered row by row inside the kernels, so nothing is copied out of
the cache first.

- decode: one program per (sequence, KV head) serves all query heads of that KV head's group
  at once (GQA: the cache is read once per group, not once per head). It attends over the
  cached positions, takes the new token's K/V straight from the projection, and (in a pure
  decode step) writes them into their slot in the same pass.
  A small batch (fewer programs than SPLIT_BELOW_PROGRAMS) would leave most of the device
  idle, so each (sequence, KV head) is split over DECODE_SPLITS programs that take a slice of
  the cached positions each (flash-decoding); a second kernel merges their partial softmaxes.
- prefill: one program per (tile of a chunk's queries, head), flash-style online softmax over
  the cached prefix and the chunk itself, which `store_kv` has written first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepflow.engine.kernels.metadata import PREFILL_TILE, DecodeBatch, PrefillBatch

LOG2E = 1.4426950408889634
SPLIT_BELOW_PROGRAMS = 128
"""Decode batches with fewer (sequence, KV head) programs than this split each over the cache."""
DECODE_SPLITS = 16


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, n_kv_heads, head_dim,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        mask = (h < n_kv_heads)[:, None] & (d < head_dim)[None, :]
        k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
        v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
        dst = slot * n_kv_heads * head_dim + h[:, None] * head_dim + d[None, :]
        tl.store(kc_ptr + dst, k, mask=mask)
        tl.store(vc_ptr + dst, v, mask=mask)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write k, v [tokens, kv_heads, head_dim] into their flat slots; slot -1 is skipped."""
    tokens, kv_heads, dim = k.shape
    if tokens:
        _store_kv_kernel[(tokens,)](
            k, v, k_cache, v_cache, slot_mapping,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), kv_heads, dim,
            BLOCK_H=triton.next_power_of_2(kv_heads), BLOCK_D=triton.next_power_of_2(dim),
        )  # fmt: skip


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # float32 models ask for full precision (Triton would otherwise round operands to tf32).
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, out_ptr,
    rows_ptr, ctx_ptr, tables_ptr, slots_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_tb, qk_scale, n_kv_heads, head_dim,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WRITE: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    row = tl.load(rows_ptr + b).to(tl.int64)
    cached = tl.load(ctx_ptr + b)  # positions before the new token, all in the cache
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, BLOCK_D)
    dmask = d < head_dim
    heads = kvh * GROUP + g
    qmask = (g < GROUP)[:, None] & dmask[None, :]
    q = tl.load(
        q_ptr + row * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=qmask, other=0.0
    )
    k_new = tl.load(k_ptr + row * stride_kt + kvh * stride_kh + d, mask=dmask, other=0.0)
    v_new = tl.load(v_ptr + row * stride_vt + kvh * stride_vh + d, mask=dmask, other=0.0)
    # The new token first: it seeds the running max, sum and accumulator (exp2 domain).
    m = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * qk_scale
    l_sum = tl.full([GROUP_PAD], 1.0, tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32) + v_new.to(tl.float32)[None, :]
    table = tables_ptr + b.to(tl.int64) * stride_tb
    row_stride = n_kv_heads * head_dim
    for start in range(0, cached, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        nmask = n < cached
        block = tl.load(table + n // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
        off = (block * BLOCK_SIZE + n % BLOCK_SIZE) * row_stride + kvh * head_dim
        kvmask = nmask[:, None] & dmask[None, :]
        k = tl.load(kc_ptr + off[:, None] + d[None, :], mask=kvmask, other=0.0)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        v = tl.load(vc_ptr + off[:, None] + d[None, :], mask=kvmask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m = m_new
    out = acc / l_sum[:, None]
    tl.store(
        out_ptr + row * stride_ot + heads[:, None] * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=qmask,
    )
    if WRITE:
        slot = tl.load(slots_ptr + b).to(tl.int64)
        if slot >= 0:
            dst = slot * row_stride + kvh * head_dim + d
            tl.store(kc_ptr + dst, k_new, mask=dmask)
            tl.store(vc_ptr + dst, v_new, mask=dmask)


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, part_ptr, stats_ptr,
    rows_ptr, ctx_ptr, tables_ptr, slots_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_tb, qk_scale, n_kv_heads, head_dim,
    BLOCK_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr, WRITE: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    row = tl.load(rows_ptr + b).to(tl.int64)
    cached = tl.load(ctx_ptr + b)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, BLOCK_D)
    dmask = d < head_dim
    heads = kvh * GROUP + g
    qmask = (g < GROUP)[:, None] & dmask[None, :]
    q = tl.load(
        q_ptr + row * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=qmask, other=0.0
    )
    k_new = tl.load(k_ptr + row * stride_kt + kvh * stride_kh + d, mask=dmask, other=0.0)
    v_new = tl.load(v_ptr + row * stride_vt + kvh * stride_vh + d, mask=dmask, other=0.0)
    # Split 0 is seeded with the new token; the others start empty (max -inf, sum 0).
    first = (split == 0).to(tl.float32)
    m_tok = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * qk_scale
    m = tl.where(split == 0, m_tok, float("-inf"))
    l_sum = tl.full([GROUP_PAD], 1.0, tl.float32) * first
    acc = (tl.zeros([GROUP_PAD, BLOCK_D], tl.float32) + v_new.to(tl.float32)[None, :]) * first
    per_split = tl.cdiv(tl.cdiv(cached, SPLITS), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, cached)
    table = tables_ptr + b.to(tl.int64) * stride_tb
    row_stride = n_kv_heads * head_dim
    for start in range(lo, hi, BLOCK_N):  # every block holds at least one position < hi
        n = start + tl.arange(0, BLOCK_N)
        nmask = n < hi
        block = tl.load(table + n // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
        off = (block * BLOCK_SIZE + n % BLOCK_SIZE) * row_stride + kvh * head_dim
        kvmask = nmask[:, None] & dmask[None, :]
        k = tl.load(kc_ptr + off[:, None] + d[None, :], mask=kvmask, other=0.0)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        v = tl.load(vc_ptr + off[:, None] + d[None, :], mask=kvmask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m = m_new
    part = ((b * n_kv_heads + kvh) * SPLITS + split).to(tl.int64)
    tl.store(part_ptr + part * GROUP_PAD * BLOCK_D + g[:, None] * BLOCK_D + d[None, :], acc)
    tl.store(stats_ptr + part * 2 * GROUP_PAD + g, m)
    tl.store(stats_ptr + part * 2 * GROUP_PAD + GROUP_PAD + g, l_sum)
    if WRITE:
        slot = tl.load(slots_ptr + b).to(tl.int64)
        if (split == 0) & (slot >= 0):
            dst = slot * row_stride + kvh * head_dim + d
            tl.store(kc_ptr + dst, k_new, mask=dmask)
            tl.store(vc_ptr + dst, v_new, mask=dmask)


@triton.jit
def _decode_merge_kernel(
    part_ptr, stats_ptr, out_ptr, rows_ptr, stride_ot, stride_oh, n_kv_heads, head_dim,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    row = tl.load(rows_ptr + b).to(tl.int64)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, BLOCK_D)
    base = ((b * n_kv_heads + kvh) * SPLITS).to(tl.int64)
    m_all = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    for s in tl.static_range(SPLITS):
        m_all = tl.maximum(m_all, tl.load(stats_ptr + (base + s) * 2 * GROUP_PAD + g))
    l_all = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    for s in tl.static_range(SPLITS):
        stats = stats_ptr + (base + s) * 2 * GROUP_PAD
        w = tl.exp2(tl.load(stats + g) - m_all)  # an empty split: exp2(-inf) = 0
        l_all += w * tl.load(stats + GROUP_PAD + g)
        part = part_ptr + (base + s) * GROUP_PAD * BLOCK_D
        acc += w[:, None] * tl.load(part + g[:, None] * BLOCK_D + d[None, :])
    out = acc / l_all[:, None]
    heads = kvh * GROUP + g
    mask = (g < GROUP)[:, None] & (d < head_dim)[None, :]
    tl.store(
        out_ptr + row * stride_ot + heads[:, None] * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _prefill_kernel(
    q_ptr, kc_ptr, vc_ptr, out_ptr,
    tile_chunk_ptr, tile_q_ptr, row0_ptr, start_ptr, len_ptr, tables_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_tb, qk_scale, n_kv_heads, head_dim,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    c = tl.load(tile_chunk_ptr + tile)
    q0 = tl.load(tile_q_ptr + tile)
    row0 = tl.load(row0_ptr + c).to(tl.int64)
    start = tl.load(start_ptr + c)
    length = tl.load(len_ptr + c)
    i = q0 + tl.arange(0, BLOCK_M)
    imask = i < length
    pos = start + i
    d = tl.arange(0, BLOCK_D)
    dmask = d < head_dim
    qmask = imask[:, None] & dmask[None, :]
    q = tl.load(
        q_ptr + (row0 + i)[:, None] * stride_qt + h * stride_qh + d[None, :], mask=qmask, other=0.0
    )
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = tables_ptr + c.to(tl.int64) * stride_tb
    row_stride = n_kv_heads * head_dim
    end = start + tl.minimum(q0 + BLOCK_M, length)  # keys this tile's last query sees
    for kstart in range(0, end, BLOCK_N):
        n = kstart + tl.arange(0, BLOCK_N)
        nmask = n < end
        block = tl.load(table + n // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
        off = (block * BLOCK_SIZE + n % BLOCK_SIZE) * row_stride + kvh * head_dim
        kvmask = nmask[:, None] & dmask[None, :]
        k = tl.load(kc_ptr + off[:, None] + d[None, :], mask=kvmask, other=0.0)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale
        # Position 0 is visible to every query, so no row is ever wholly masked.
        s = tl.where((n[None, :] <= pos[:, None]) & nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        v = tl.load(vc_ptr + off[:, None] + d[None, :], mask=kvmask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m = m_new
    out = acc / l_sum[:, None]
    tl.store(
        out_ptr + (row0 + i)[:, None] * stride_ot + h * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=qmask,
    )


def _common(q: torch.Tensor, k_cache: torch.Tensor, scale: float) -> dict:
    heads, dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[2]
    return dict(
        qk_scale=scale * LOG2E,
        n_kv_heads=kv_heads,
        head_dim=dim,
        BLOCK_SIZE=k_cache.shape[1],
        GROUP=heads // kv_heads,
        BLOCK_D=max(16, triton.next_power_of_2(dim)),
        IEEE=q.dtype == torch.float32,
    )


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    batch: DecodeBatch,
    scale: float,
    write: bool,
) -> None:
    """out[rows] = attention of q[rows] over the cache and the new k/v[rows]; with `write`,
    the new k/v also land in their slots."""
    count = batch.rows.shape[0]
    if count == 0:
        return
    args = _common(q, k_cache, scale)
    group_pad = max(16, triton.next_power_of_2(args["GROUP"]))
    kv_heads = args["n_kv_heads"]
    if count * kv_heads < SPLIT_BELOW_PROGRAMS:
        _decode_split(q, k, v, k_cache, v_cache, out, batch, write, group_pad, args)
        return
    _decode_kernel[(count, kv_heads)](
        q, k, v, k_cache, v_cache, out, batch.rows, batch.cached, batch.tables, batch.slots,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), batch.tables.stride(0),
        GROUP_PAD=group_pad, BLOCK_N=64, WRITE=write, num_warps=4, **args,
    )  # fmt: skip


def _decode_split(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    batch: DecodeBatch,
    write: bool,
    group_pad: int,
    args: dict,
) -> None:
    """Partial softmaxes over DECODE_SPLITS slices of the cache, then their merge into out."""
    count, kv_heads, block_d = batch.rows.shape[0], args["n_kv_heads"], args["BLOCK_D"]
    parts = count * kv_heads * DECODE_SPLITS
    part = torch.empty(parts * group_pad * block_d, dtype=torch.float32, device=q.device)
    stats = torch.empty(parts * 2 * group_pad, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(count, kv_heads, DECODE_SPLITS)](
        q, k, v, k_cache, v_cache, part, stats, batch.rows, batch.cached, batch.tables,
        batch.slots, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), batch.tables.stride(0), GROUP_PAD=group_pad, BLOCK_N=32,
        SPLITS=DECODE_SPLITS, WRITE=write, num_warps=4, **args,
    )  # fmt: skip
    _decode_merge_kernel[(count, kv_heads)](
        part, stats, out, batch.rows, out.stride(0), out.stride(1), kv_heads, args["head_dim"],
        GROUP=args["GROUP"], GROUP_PAD=group_pad, BLOCK_D=block_d, SPLITS=DECODE_SPLITS,
        num_warps=4,
    )  # fmt: skip


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    batch: PrefillBatch,
    scale: float,
) -> None:
    """Causal attention of each chunk's queries over its cached prefix and itself (stored)."""
    if batch.num_tiles == 0:
        return
    args = _common(q, k_cache, scale)
    _prefill_kernel[(batch.num_tiles, q.shape[1])](
        q, k_cache, v_cache, out, batch.tile_chunk, batch.tile_q, batch.row0, batch.start,
        batch.length, batch.tables, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        batch.tables.stride(0), BLOCK_M=PREFILL_TILE, BLOCK_N=64, num_warps=4, **args,
    )  # fmt: skip
