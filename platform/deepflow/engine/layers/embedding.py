"""Token embedding and the LM head, which may share the embedding's weight (tied).

Both are vocab-parallel: each rank holds ceil(vocab / ranks) rows (the last rank's tail is
zero padding). An embedding lookup zeroes the ids other ranks own and sums over ranks; the head
gathers every rank's logits and drops the padding columns. With one rank both are plain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepflow.engine import kernels
from deepflow.engine.layers import linear as linear_layer
from deepflow.engine.layers.linear import linear
from deepflow.engine.loader import Target
from deepflow.engine.parallel.group import Split, TPGroup


def _vocab_weight(split: Split, rows: int, hidden_size: int) -> nn.Parameter:
    weight = nn.Parameter(torch.empty(rows, hidden_size))
    if rows > split.size:
        weight.data[split.size :] = 0
    return weight


def _vocab_target(weight: torch.Tensor, split: Split, name: str) -> dict[str, Target]:
    shape = (split.total, weight.shape[1])
    shard = None if split.is_whole else split.slice
    return {name: Target(weight, shape, slice(0, split.size), 0, shard)}


_MM_OUT_DTYPE = True
"""Whether torch.mm takes out_dtype here (CUDA, torch >= 2.8); cleared on the first refusal."""


def float32_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T with float32 output: the inputs stay in their dtype (a bf16 GEMM that
    accumulates in float32, as any does) and only the output is not rounded back."""
    global _MM_OUT_DTYPE
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return linear(x, weight)
    if linear_layer.USE_GEMV and x.dim() == 2 and x.shape[0] <= 2 and kernels.triton_active():
        from deepflow.engine.kernels import gemv

        if gemv.supports(x, weight):  # the Triton GEMV for a few rows
            return gemv.gemv(x, weight, out_dtype=torch.float32)
    if x.device.type == "cuda" and x.dtype == weight.dtype and _MM_OUT_DTYPE:
        x2 = x.reshape(-1, x.shape[-1])
        try:
            out = torch.mm(x2, weight.t(), out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_OUT_DTYPE = False
        else:
            return out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x.float(), weight.float())


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.tp = tp or TPGroup()
        self.vocab, rows = self.tp.padded(vocab_size)
        self.weight = _vocab_weight(self.vocab, rows, hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab.start
        mine = (local >= 0) & (local < self.vocab.size)
        x = F.embedding(local.masked_fill(~mine, 0), self.weight)
        return self.tp.all_reduce(x.masked_fill_(~mine[:, None], 0))

    def checkpoint_targets(self, prefix: str) -> dict[str, Target]:
        return _vocab_target(self.weight, self.vocab, f"{prefix}weight")


class LMHead(nn.Module):
    """Logits for the hidden states given; the caller selects which rows need them."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        tied_to: VocabEmbedding | None,
        tp: TPGroup | None = None,
    ) -> None:
        super().__init__()
        self.tp = tp or TPGroup()
        self.tied = tied_to is not None
        self.vocab, rows = self.tp.padded(vocab_size)
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            self.weight = _vocab_weight(self.vocab, rows, hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits: rounding them to a bf16 model's dtype would cost ~3 significant
        digits (a relative error of ~2e-3) for nothing, the sampler reads float32."""
        logits = float32_linear(hidden, self.weight)
        if self.tp.size == 1:
            return logits
        return self.tp.all_gather(logits)[..., : self.vocab.total]

    def checkpoint_targets(self, prefix: str) -> dict[str, Target]:
        return {} if self.tied else _vocab_target(self.weight, self.vocab, f"{prefix}weight")
