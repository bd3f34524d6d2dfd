"""SwiGLU: the gate and up projections arrive concatenated, one matmul instead of two."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepflow.engine import kernels


class SiluAndMul(nn.Module):
    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if kernels.triton_active():
            from deepflow.engine.kernels.elementwise import silu_and_mul

            return silu_and_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        # float32 up to the product, one rounding (not silu rounded, then the product).
        return (F.silu(gate.float()) * up.float()).to(gate_up.dtype)
