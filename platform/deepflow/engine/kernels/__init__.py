"""Fused kernels for the accelerator fast path, and the switch that picks them.

The torch code in `layers/` is the reference: exact, on any device, the CPU/NPU path and the
oracle the kernels are tested against. `ModelRunner` runs the model inside
`use_backend(device.kernel_backend)`; under "triton" the layers call the Triton kernels of
this package instead (RMSNorm + residual, SwiGLU, RoPE in place, paged attention with the KV
write fused in). The choice is a context variable, not a global, so a reference model and a
fast one can run side by side in one process. Triton is imported only when a kernel runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

BACKENDS = ("torch", "triton")

_backend: ContextVar[str] = ContextVar("deepflow_kernel_backend", default="torch")


def active() -> str:
    """The backend the layers use in this context: "torch" unless a runner chose "triton"."""
    return _backend.get()


def triton_active() -> bool:
    return _backend.get() == "triton"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {BACKENDS}")
    token = _backend.set(name)
    try:
        yield
    finally:
        _backend.reset(token)
