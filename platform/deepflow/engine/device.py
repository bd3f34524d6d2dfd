"""The one place that names an accelerator vendor.

`Device.pick()` chooses npu (torch_npu imports and sees a device), then cuda, then cpu, and the
returned object owns streams, events, synchronisation, memory queries and graph capture, so the
rest of the engine stays vendor-neutral.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import time
from collections.abc import Iterator
from typing import Any

import torch

ACCELERATORS = ("npu", "cuda")


def _npu_available() -> bool:
    try:
        importlib.import_module("torch_npu")
    except ImportError:
        return False
    npu = getattr(torch, "npu", None)
    return bool(npu is not None and npu.is_available() and npu.device_count() > 0)


def detect_type() -> str:
    """The best device type visible on this machine."""
    if _npu_available():
        return "npu"
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return "cuda"
    return "cpu"


def _meminfo() -> tuple[int, int]:
    """(available, total) bytes of host memory, from /proc/meminfo or sysconf."""
    try:
        with open("/proc/meminfo") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return fields.get("MemAvailable", fields["MemFree"]), fields["MemTotal"]
    except (OSError, KeyError, ValueError, IndexError):
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page


class CpuEvent:
    """Stands in for a device event on the CPU, where work is already synchronous."""

    def __init__(self, enable_timing: bool = False) -> None:
        self.time: float | None = None

    def record(self, stream: Any = None) -> None:
        self.time = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def wait(self, stream: Any = None) -> None:
        pass

    def elapsed_time(self, end: CpuEvent) -> float:
        """Milliseconds from this event to `end`, like the accelerator events."""
        assert self.time is not None and end.time is not None, "record both events first"
        return (end.time - self.time) * 1000.0


class Device:
    """One torch device and the vendor module behind it."""

    def __init__(self, type: str, index: int | None = None) -> None:
        if type not in (*ACCELERATORS, "cpu"):
            raise ValueError(f"unknown device type {type!r}; expected npu, cuda or cpu")
        if type == "npu" and not _npu_available():
            raise RuntimeError("device 'npu' asked for, but torch_npu sees no NPU")
        if type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' asked for, but torch sees no CUDA device")
        self.type = type
        self.index = None if type == "cpu" else (index or 0)
        self.torch_device = (
            torch.device(type, self.index) if self.index is not None else torch.device(type)
        )
        self._mod: Any = getattr(torch, type) if type != "cpu" else None

    @classmethod
    def pick(cls, name: str | None = None) -> Device:
        """`name` like "cuda:1" or "cpu" forces a device; None takes the best one visible."""
        if name is None:
            return cls(detect_type())
        type, _, index = name.partition(":")
        return cls(type, int(index) if index else None)

    @property
    def is_accelerator(self) -> bool:
        return self._mod is not None

    @property
    def supports_graphs(self) -> bool:
        return self.is_accelerator

    @property
    def kernel_backend(self) -> str:
        """ "triton" where the fused Triton kernels run (CUDA with triton importable), else
        "torch" (the reference layers: the CPU, and the NPU until it has kernels of its own)."""
        if self.type != "cuda":
            return "torch"
        try:
            importlib.import_module("triton")
        except ImportError:
            return "torch"
        return "triton"

    @property
    def dist_backend(self) -> str:
        """The torch.distributed backend for collectives between devices of this type."""
        return {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}[self.type]

    def __repr__(self) -> str:
        return f"Device({self.torch_device})"

    def set_current(self) -> None:
        if self._mod is not None:
            self._mod.set_device(self.torch_device)

    def synchronize(self) -> None:
        if self._mod is not None:
            self._mod.synchronize(self.torch_device)

    def mem_get_info(self) -> tuple[int, int]:
        """(free, total) bytes: device memory on an accelerator, host memory on the CPU."""
        if self._mod is None:
            return _meminfo()
        free, total = self._mod.mem_get_info(self.torch_device)
        return int(free), int(total)

    def memory_allocated(self) -> int:
        return 0 if self._mod is None else int(self._mod.memory_allocated(self.torch_device))

    def max_memory_allocated(self) -> int:
        """Peak bytes held by tensors since the last reset_peak_memory_stats (0 on the CPU)."""
        return 0 if self._mod is None else int(self._mod.max_memory_allocated(self.torch_device))

    def reset_peak_memory_stats(self) -> None:
        if self._mod is not None:
            self._mod.reset_peak_memory_stats(self.torch_device)

    def empty_cache(self) -> None:
        if self._mod is not None:
            self._mod.empty_cache()

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        if self._mod is not None:
            self._mod.manual_seed_all(seed)

    def stream(self) -> Any:
        """A new side stream (None on the CPU; `use_stream(None)` is then a no-op)."""
        return None if self._mod is None else self._mod.Stream(self.torch_device)

    def current_stream(self) -> Any:
        return None if self._mod is None else self._mod.current_stream(self.torch_device)

    @contextlib.contextmanager
    def use_stream(self, stream: Any) -> Iterator[None]:
        if self._mod is None or stream is None:
            yield
            return
        with self._mod.stream(stream):
            yield

    def event(self, enable_timing: bool = False) -> Any:
        if self._mod is None:
            return CpuEvent(enable_timing)
        return self._mod.Event(enable_timing=enable_timing)

    def graph(self) -> Any:
        """An empty graph object to capture into (torch.cuda.CUDAGraph or its NPU twin)."""
        if self._mod is None:
            raise RuntimeError("graph capture needs an accelerator; the CPU runs eagerly")
        return self._mod.NPUGraph() if self.type == "npu" else self._mod.CUDAGraph()

    def capture(self, graph: Any, pool: Any = None, stream: Any = None) -> Any:
        """Context manager that records the enclosed work into `graph`."""
        if self._mod is None:
            raise RuntimeError("graph capture needs an accelerator; the CPU runs eagerly")
        return self._mod.graph(graph, pool=pool, stream=stream)

    def graph_pool_handle(self) -> Any:
        if self._mod is None:
            raise RuntimeError("graph capture needs an accelerator; the CPU runs eagerly")
        return self._mod.graph_pool_handle()
