"""FlowServe, DeepFlow's LLM engine: paged KV cache, continuous batching, sampling.

A library that knows nothing of the platform. Importing the package costs nothing: each name
below loads its module (and torch) on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deepflow.engine.async_engine import AsyncLLMEngine
    from deepflow.engine.config import EngineConfig
    from deepflow.engine.llm import LLM
    from deepflow.engine.llm_engine import CompletionOutput, LLMEngine, RequestOutput
    from deepflow.engine.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "AsyncLLMEngine",
    "CompletionOutput",
    "EngineConfig",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
]

_MODULES = {
    "LLM": "llm",
    "AsyncLLMEngine": "async_engine",
    "CompletionOutput": "llm_engine",
    "EngineConfig": "config",
    "LLMEngine": "llm_engine",
    "RequestOutput": "llm_engine",
    "SamplingParams": "sampling_params",
}


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
