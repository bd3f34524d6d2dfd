"""Greedy sampling in one pass over the logits: each row's argmax and its log-probability.

The torch path (deepflow.engine.sampler) writes a log_softmax of the whole [rows, vocab] block,
copies it, reduces it for the argmax and gathers the chosen entries: four launches, two of them
single-block reductions at batch 1. Here one program per row keeps a running maximum, its
first index (ties go to the lower index, as torch.argmax) and the running sum of exp(x - max),
so the chosen token's log-probability is -log(sum): the same formula as log_softmax's, in
float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _greedy_kernel(
    logits_ptr, tokens_ptr, logprobs_ptr, stride_row, vocab, BLOCK: tl.constexpr
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK)
    best = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.full((), 0, tl.int32)
    total = tl.full((), 0.0, tl.float32)
    for start in range(0, vocab, BLOCK):
        idx = start + cols
        x = tl.load(base + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
        block_max = tl.max(x, axis=0)
        block_idx = tl.argmax(x, axis=0, tie_break_left=True)
        new_max = tl.maximum(best, block_max)
        # exp(-inf - -inf) would be NaN on the first block: rescale only finite maxima
        scale = tl.where(best == new_max, 1.0, tl.exp(best - new_max))
        total = total * scale + tl.sum(tl.exp(x - new_max), axis=0)
        take = block_max > best
        best_idx = tl.where(take, start + block_idx, best_idx)
        best = new_max
    tl.store(tokens_ptr + row, best_idx.to(tl.int64))
    tl.store(logprobs_ptr + row, -tl.log(total))


def greedy(
    logits: torch.Tensor,
    block: int | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax [rows] int64, its log-probability [rows] float32) of float32 logits [rows, V].
    `block`: columns per iteration (default: the whole row up to 32768, all loads in flight at
    once, which matters at batch 1 where one program reads the row). `out`: contiguous
    (tokens, logprobs) to write instead of new tensors (the decode graphs' fixed buffers)."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1
    if out is None:
        tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
        logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    else:
        tokens, logprobs = out
        assert tokens.is_contiguous() and logprobs.is_contiguous()
    block = block or min(triton.next_power_of_2(vocab), 32768)
    if rows:
        _greedy_kernel[(rows,)](
            logits, tokens, logprobs, logits.stride(0), vocab, BLOCK=block,
            num_warps=16 if block >= 16384 else 8,
        )  # fmt: skip
    return tokens, logprobs
