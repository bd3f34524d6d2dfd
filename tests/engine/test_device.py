"""device.py: the vendor-neutral device interface, on the CPU this suite runs on."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepflow.engine import device as device_mod
from deepflow.engine.device import CpuEvent, Device, detect_type

ENGINE = Path(device_mod.__file__).parent


def test_picks_cpu_without_accelerator() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    dev = Device.pick()
    assert dev.type == "cpu"
    assert dev.torch_device == torch.device("cpu")
    assert not dev.is_accelerator and not dev.supports_graphs


def test_detection_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_mod, "_npu_available", lambda: True)
    assert detect_type() == "npu"
    monkeypatch.setattr(device_mod, "_npu_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert detect_type() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert detect_type() == "cpu"


def test_named_devices() -> None:
    assert Device.pick("cpu").torch_device == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device type"):
        Device.pick("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="sees no CUDA"):
            Device.pick("cuda:0")


def test_cpu_memory_and_sync() -> None:
    dev = Device.pick("cpu")
    free, total = dev.mem_get_info()
    assert 0 < free <= total
    assert dev.memory_allocated() == 0
    dev.synchronize()
    dev.empty_cache()
    dev.set_current()
    dev.manual_seed(3)
    assert torch.initial_seed() == 3


def test_cpu_streams_and_events() -> None:
    dev = Device.pick("cpu")
    stream = dev.stream()
    with dev.use_stream(stream):
        x = torch.ones(4) * 2
    assert x.sum() == 8
    start, end = dev.event(enable_timing=True), dev.event(enable_timing=True)
    assert isinstance(start, CpuEvent)
    start.record()
    end.record(dev.current_stream())
    end.synchronize()
    assert end.query()
    assert start.elapsed_time(end) >= 0.0


def test_graphs_need_an_accelerator() -> None:
    dev = Device.pick("cpu")
    for call in (dev.graph, dev.graph_pool_handle, lambda: dev.capture(None)):
        with pytest.raises(RuntimeError, match="graph capture needs an accelerator"):
            call()


def test_only_device_py_names_a_vendor() -> None:
    """The contract: torch.cuda / torch_npu appear in device.py and nowhere else in the engine."""
    vendor = re.compile(r"torch\.cuda|torch_npu|torch\.npu")
    offenders = [
        str(path.relative_to(ENGINE))
        for path in ENGINE.rglob("*.py")
        if path.name != "device.py" and vendor.search(path.read_text())
    ]
    assert offenders == []


def test_engine_imports_without_transformers() -> None:
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None\n"  # any import of it now fails
        "import deepflow.engine.model_runner, deepflow.engine.testmodel\n"
        "import deepflow.engine.tokenizer, deepflow.engine.llm_engine\n"
        "web = ('fastapi', 'pydantic', 'sqlalchemy')\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in web]\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ENGINE.parents[1])}  # the contract's PYTHONPATH=platform
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ENGINE.parents[2], env=env)
