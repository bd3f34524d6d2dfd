"""Paged attention: the torch reference path.

The KV cache of one layer is two tensors [num_blocks, block_size, kv_heads, head_dim]. Position
p of a sequence lives in block `block_table[p // block_size]`, slot `p % block_size`; a step's
new keys and values are written to their flat slots first, then every chunk reads its whole
context back through its block table. A chunk that starts at position s attends, for its i-th
token, to positions <= s + i, so prefill chunks, chunked prefill and decodes (chunks of one
token) are the same computation and may share a batch.

This path is exact, runs on any torch device, and is the oracle faster kernels are tested
against; clarity beats speed here. When the runner fills `AttentionMetadata.fast` (the kernels'
own view of the step, kernels/metadata.py), the same layer runs the Triton kernels of
deepflow.engine.kernels.attention instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deepflow.engine.kernels.metadata import FastMetadata


@dataclass(slots=True)
class AttentionMetadata:
    """Where a step's tokens go in the cache and what each chunk attends to."""

    slot_mapping: torch.Tensor  # [tokens] flat slot (block * block_size + offset) per new token
    block_tables: torch.Tensor  # [chunks, max_blocks] int64, padded with block 0
    chunk_starts: list[int]  # positions already cached before each chunk
    chunk_lens: list[int]  # new tokens in each chunk; their rows are consecutive in the batch
    fast: FastMetadata | None = None  # set by the runner when it runs the Triton kernels

    @property
    def token_offsets(self) -> list[int]:
        offsets, total = [], 0
        for n in self.chunk_lens:
            offsets.append(total)
            total += n
        return offsets


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write new keys/values [tokens, kv_heads, head_dim] into their slots."""
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` positions of one sequence: [length, kv_heads, head_dim]."""
    block_size = cache.shape[1]
    blocks = block_table[: (length + block_size - 1) // block_size]
    return cache.index_select(0, blocks).flatten(0, 1)[:length]


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Masked grouped-query attention.

    q: [batch, queries, heads, dim]; k, v: [batch, keys, kv_heads, dim];
    mask: [batch, queries, keys], True where a query may look. Returns q's shape.
    """
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask.unsqueeze(1),
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def _decode_batch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Single-token chunks as one padded batch: q [chunks, heads, dim], lens [chunks]."""
    block_size = k_cache.shape[1]
    longest = int(lens.max())
    tables = block_tables[:, : (longest + block_size - 1) // block_size]
    # Padding slots hold stale but finite values (the cache starts zeroed); the mask hides them.
    k = k_cache.index_select(0, tables.flatten()).view(len(tables), -1, *k_cache.shape[2:])
    v = v_cache.index_select(0, tables.flatten()).view(len(tables), -1, *v_cache.shape[2:])
    mask = torch.arange(k.shape[1], device=q.device)[None, :] < lens[:, None]
    return attend(q.unsqueeze(1), k, v, mask.unsqueeze(1), scale).squeeze(1)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of q [tokens, heads, dim] over the cached context of each token's chunk."""
    out = torch.empty_like(q)
    offsets = meta.token_offsets
    decodes = [i for i, n in enumerate(meta.chunk_lens) if n == 1]
    if len(decodes) < 2:
        decodes = []
    else:
        rows = torch.tensor([offsets[i] for i in decodes], device=q.device)
        lens = torch.tensor([meta.chunk_starts[i] + 1 for i in decodes], device=q.device)
        tables = meta.block_tables[decodes]
        out[rows] = _decode_batch(q[rows], k_cache, v_cache, tables, lens, scale)
    batched = set(decodes)
    for i, (start, n) in enumerate(zip(meta.chunk_starts, meta.chunk_lens, strict=True)):
        if i in batched:
            continue
        length = start + n
        k = gather_kv(k_cache, meta.block_tables[i], length)
        v = gather_kv(v_cache, meta.block_tables[i], length)
        positions = torch.arange(start, length, device=q.device)
        mask = torch.arange(length, device=q.device)[None, :] <= positions[:, None]
        span = slice(offsets[i], offsets[i] + n)
        out[span] = attend(q[span][None], k[None], v[None], mask[None], scale)[0]
    return out


class Attention(nn.Module):
    """Stores this step's K/V in the layer's cache, then attends over each chunk's context."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        # Views into the runner's cache, attached after the model is built.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        if meta.fast is not None:
            return self._forward_fast(q, k, v, meta, meta.fast)
        store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return paged_attention(q, self.k_cache, self.v_cache, meta, self.scale)

    def _forward_fast(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        fast: FastMetadata,
    ) -> torch.Tensor:
        from deepflow.engine.kernels import attention as kernels

        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if not fast.decode_writes:
            kernels.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        if fast.prefill is not None:
            kernels.prefill_attention(q, self.k_cache, self.v_cache, out, fast.prefill, self.scale)
        if fast.decode is not None:
            kernels.decode_attention(
                q, k, v, self.k_cache, self.v_cache, out, fast.decode, self.scale,
                write=fast.decode_writes,
            )  # fmt: skip
        return out
