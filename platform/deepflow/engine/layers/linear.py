"""Linear layers. Projections the checkpoint stores apart (q/k/v, gate/up) run as one matmul.

`MergedLinear.parts` says which output rows each checkpoint tensor fills, so the loader can
stream those tensors straight into their slice of the fused weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x W^T + b, parameters left uninitialised: the loader fills them."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of the same input, concatenated along the output rows."""

    def __init__(self, in_features: int, parts: dict[str, int], bias: bool = False) -> None:
        super().__init__(in_features, sum(parts.values()), bias)
        self.parts: dict[str, slice] = {}
        start = 0
        for name, rows in parts.items():
            self.parts[name] = slice(start, start + rows)
            start += rows

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        return list(y.split([s.stop - s.start for s in self.parts.values()], dim=-1))
