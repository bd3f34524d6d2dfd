"""Token embedding and the LM head, which may share the embedding's weight (tied).

Both are vocab-parallel: each rank holds ceil(vocab / ranks) rows (the last rank's tail is
zero padding). An embedding lookup zeroes the ids other ranks own and sums over ranks; the head
gathers every rank's logits and drops the padding columns. With one rank both are plain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
        logits = linear(hidden, self.weight)  # the Triton GEMV for a few rows
        if self.tp.size == 1:
            return logits
        return self.tp.all_gather(logits)[..., : self.vocab.total]

    def checkpoint_targets(self, prefix: str) -> dict[str, Target]:
        return {} if self.tied else _vocab_target(self.weight, self.vocab, f"{prefix}weight")
