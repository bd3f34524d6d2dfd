"""RMSNorm, optionally fused with the residual add that precedes it.

Precision: the residual stream is float32 whatever the model's dtype (a bf16 stream rounds at
every one of its 2 * layers adds, the largest single source of a bf16 model's error; see
bench/precision_ablation.py). The sum, the statistics and the product with the weight are
float32, rounded once to the weight's dtype, the GEMM that follows reads that.
"""

from __future__ import annotations

import torch
from torch import nn

from deepflow.engine import kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # One rounding, at the end. (transformers rounds x * rstd to the model dtype before
        # the weight as well: bf16 results may differ from its by that rounding.)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(self.weight.dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x), or with `residual`: (norm(x + residual), x + residual in float32). The
        norm is in the weight's dtype."""
        if kernels.triton_active():
            from deepflow.engine.kernels.elementwise import rms_norm

            return rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        x = residual.float() + x.float()
        return self._norm(x), x
