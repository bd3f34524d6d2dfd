"""`ModelConfig`: the parts of a Hugging Face config.json the decoder needs, checked once.

Reads both config.json dialects: transformers 4 (`rope_theta`, `rope_scaling`, `torch_dtype`)
and transformers 5 (`rope_parameters`, `dtype`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FAMILIES = {
    # model_type -> (q/k/v bias default, what transformers calls the class)
    "llama": (False, "LlamaForCausalLM"),
    "mistral": (False, "MistralForCausalLM"),
    "qwen2": (True, "Qwen2ForCausalLM"),
}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) with scaling None for plain RoPE; accepts `type` as an old alias."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported RoPE type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial rotary embeddings are not supported")
    params.pop("partial_rotary_factor", None)
    if rope_type == "default":
        return theta, None
    if rope_type in ("llama3", "yarn"):
        params.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings"))
    return theta, {"rope_type": rope_type, **params}


@dataclass(slots=True, frozen=True)
class ModelConfig:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_window: int | None
    torch_dtype: torch.dtype
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @property
    def hf_class(self) -> str:
        return FAMILIES[self.model_type][1]

    @classmethod
    def from_folder(cls, path: str | Path) -> ModelConfig:
        folder = Path(path)
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"{folder} has no config.json; is it a Hugging Face model folder?"
            )
        raw = json.loads(config_file.read_text())
        eos = _ids(raw.get("eos_token_id"))
        generation = folder / "generation_config.json"
        if generation.is_file():
            eos += _ids(json.loads(generation.read_text()).get("eos_token_id"))
        return cls.from_dict(raw, eos_token_ids=list(dict.fromkeys(eos)))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], eos_token_ids: list[int] | None = None) -> ModelConfig:
        model_type = raw.get("model_type")
        if model_type not in FAMILIES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; FlowServe runs {', '.join(FAMILIES)}"
            )
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {raw['hidden_act']!r}; only silu (SwiGLU)")
        theta, scaling = _rope(raw)
        heads = int(raw["num_attention_heads"])
        dtype_name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        if dtype_name not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype_name!r} in config.json")
        # Qwen2 writes sliding_window even when use_sliding_window is false; only then is it live.
        window = raw.get("sliding_window")
        if model_type == "qwen2" and not raw.get("use_sliding_window", False):
            window = None
        attention_bias = raw.get("attention_bias", False)
        return cls(
            model_type=model_type,
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or raw["hidden_size"] // heads),
            vocab_size=int(raw["vocab_size"]),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=FAMILIES[model_type][0] or bool(attention_bias),
            o_bias=bool(attention_bias),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            sliding_window=int(window) if window else None,
            torch_dtype=DTYPES[dtype_name],
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_ids(raw.get("eos_token_id")) if eos_token_ids is None else eos_token_ids,
        )

    def max_model_len(self, requested: int | None) -> int:
        """The longest sequence the engine may run: the model's limit unless asked otherwise.

        A live sliding window caps it, because the paged cache attends to every past position.
        """
        limit = self.max_position_embeddings
        if self.sliding_window is not None:
            limit = min(limit, self.sliding_window)
        if requested is None:
            return limit
        if requested > limit and (self.rope_scaling is None or self.sliding_window is not None):
            raise ValueError(
                f"max_model_len {requested} exceeds the model's limit of {limit} positions"
            )
        return requested
