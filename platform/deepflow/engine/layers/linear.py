"""Linear layers, plain and tensor-parallel. Projections the checkpoint stores apart (q/k/v,
gate/up) run as one matmul.

`MergedLinear` is column-parallel: each part keeps only this rank's output rows (its `Split`),
and `parts` says where each part sits in the fused weight, so the loader can stream every
checkpoint tensor's shard straight into its slice. `RowParallelLinear` keeps this rank's input
columns and sums the partial products over ranks. With one rank both are ordinary linears.

Under the Triton backend a product of a few rows (a small decode batch) runs the GEMV kernel of
deepflow.engine.kernels.gemv instead of the library GEMM: such steps only stream the weights,
and the kernel reads them closer to the memory's rate. F.linear stays the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepflow.engine import kernels
from deepflow.engine.loader import Target
from deepflow.engine.parallel.group import Split, TPGroup

USE_GEMV = True
"""Switch for the GEMV kernel (benchmarks compare it with the library GEMM)."""


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, or the Triton GEMV for a few rows under the Triton backend."""
    if USE_GEMV and x.dim() == 2 and x.shape[0] <= 2 and kernels.triton_active():
        from deepflow.engine.kernels import gemv

        if gemv.supports(x, weight):
            return gemv.gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def gate_up_silu_and_mul(x: torch.Tensor, gate_up: Linear) -> torch.Tensor | None:
    """silu(gate) * up from the merged [gate | up] projection in one GEMV launch, where the GEMV
    runs (few rows, Triton backend); None elsewhere: then the caller projects and activates."""
    if USE_GEMV and x.dim() == 2 and x.shape[0] <= 2 and kernels.triton_active():
        from deepflow.engine.kernels import gemv

        if gemv.supports(x, gate_up.weight):
            return gemv.gemv_silu_and_mul(x, gate_up.weight, gate_up.bias)
    return None


class Linear(nn.Module):
    """y = x W^T + b, parameters left uninitialised: the loader fills them. Replicated."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of the same input, concatenated along the output rows.

    A part given as an int is whole; as a `Split`, this rank holds only its share of the rows.
    """

    def __init__(self, in_features: int, parts: dict[str, int | Split], bias: bool = False) -> None:
        self.splits = {
            name: Split.whole(rows) if isinstance(rows, int) else rows
            for name, rows in parts.items()
        }
        super().__init__(in_features, sum(s.size for s in self.splits.values()), bias)
        self.parts: dict[str, slice] = {}
        start = 0
        for name, split in self.splits.items():
            self.parts[name] = slice(start, start + split.size)
            start += split.size

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        return list(y.split([s.stop - s.start for s in self.parts.values()], dim=-1))

    def checkpoint_targets(self, prefix: str) -> dict[str, Target]:
        """`prefix` is the parent module's: the parts are its children in the checkpoint."""
        targets = {}
        for name, split in self.splits.items():
            shard = None if split.is_whole else split.slice
            for kind, param in (("weight", self.weight), ("bias", self.bias)):
                if param is not None:
                    shape = (split.total, *param.shape[1:])
                    targets[f"{prefix}{name}.{kind}"] = Target(
                        param, shape, self.parts[name], 0, shard
                    )
        return targets


class RowParallelLinear(Linear):
    """y = sum over ranks of x_r W_r^T, then + b: each rank holds its `inputs` columns of W
    (matching the column-parallel layer before it) and the whole bias, added once."""

    def __init__(
        self, inputs: Split, out_features: int, bias: bool = False, tp: TPGroup | None = None
    ) -> None:
        super().__init__(inputs.size, out_features, bias)
        self.inputs = inputs
        self.tp = tp or TPGroup()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return linear(x, self.weight, self.bias)
        y = self.tp.all_reduce(linear(x, self.weight))
        return y if self.bias is None else y + self.bias

    def checkpoint_targets(self, prefix: str) -> dict[str, Target]:
        shard = None if self.inputs.is_whole else self.inputs.slice
        out = self.weight.shape[0]
        targets = {f"{prefix}weight": Target(self.weight, (out, self.inputs.total), None, 1, shard)}
        if self.bias is not None:
            targets[f"{prefix}bias"] = Target(self.bias, (out,))
        return targets
