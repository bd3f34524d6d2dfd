"""model_config.py: config.json in both transformers dialects, checked against transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deepflow.engine.model_config import ModelConfig

transformers = pytest.importorskip("transformers")


def write(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


BASE = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
}


def test_tiny_models(tiny_llama: Path, tiny_qwen2: Path) -> None:
    llama = ModelConfig.from_folder(tiny_llama)
    assert (llama.model_type, llama.hidden_size, llama.num_layers) == ("llama", 64, 2)
    assert (llama.num_heads, llama.num_kv_heads, llama.head_dim) == (4, 2, 16)
    assert not llama.qkv_bias and not llama.tie_word_embeddings
    assert llama.torch_dtype == torch.float32 and llama.rope_scaling is None
    assert llama.eos_token_ids == [1, 5]  # <|end_of_text|>, <|eot_id|>
    qwen = ModelConfig.from_folder(tiny_qwen2)
    assert qwen.qkv_bias and not qwen.o_bias and qwen.tie_word_embeddings
    assert qwen.sliding_window is None and qwen.rope_theta == 1e6
    assert qwen.hf_class == "Qwen2ForCausalLM"


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (
            "LlamaConfig",
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                },
                "rope_theta": 500000.0,
                "max_position_embeddings": 131072,
            },
        ),
        ("LlamaConfig", {"attention_bias": True, "mlp_bias": True, "head_dim": 32}),
        (
            "Qwen2Config",
            {
                "tie_word_embeddings": True,
                "rope_scaling": {
                    "type": "yarn",
                    "factor": 4.0,
                    "original_max_position_embeddings": 32768,
                },
            },
        ),
        ("MistralConfig", {"sliding_window": 4096, "max_position_embeddings": 32768}),
    ],
)
def test_matches_what_transformers_writes(tmp_path: Path, cls: str, kwargs: dict) -> None:
    shape = {k: v for k, v in BASE.items() if k != "model_type"}
    hf = getattr(transformers, cls)(**(shape | kwargs))
    hf.save_pretrained(tmp_path)
    cfg = ModelConfig.from_folder(tmp_path)
    assert cfg.model_type == hf.model_type
    assert cfg.head_dim == (
        getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    )
    assert cfg.num_kv_heads == hf.num_key_value_heads
    assert cfg.rope_theta == hf.rope_parameters["rope_theta"]
    rope_type = hf.rope_parameters["rope_type"]
    assert (cfg.rope_scaling or {"rope_type": "default"})["rope_type"] == rope_type
    if cfg.rope_scaling:
        assert cfg.rope_scaling["factor"] == hf.rope_parameters["factor"]
    assert cfg.tie_word_embeddings == hf.tie_word_embeddings
    assert cfg.qkv_bias == (cls == "Qwen2Config" or kwargs.get("attention_bias", False))
    assert cfg.mlp_bias == kwargs.get("mlp_bias", False)
    assert cfg.sliding_window == kwargs.get("sliding_window")


def test_transformers4_dialect(tmp_path: Path) -> None:
    raw = BASE | {
        "rope_theta": 250000.0,
        "rope_scaling": {"type": "linear", "factor": 2.0},
        "torch_dtype": "bfloat16",
        "eos_token_id": 7,
    }
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    cfg = ModelConfig.from_folder(write(tmp_path, raw))
    assert cfg.rope_theta == 250000.0
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert cfg.torch_dtype == torch.bfloat16
    assert cfg.eos_token_ids == [7, 9]
    assert cfg.num_kv_heads == 2 and cfg.head_dim == 16


def test_max_model_len(tmp_path: Path) -> None:
    cfg = ModelConfig.from_dict(BASE | {"max_position_embeddings": 256})
    assert cfg.max_model_len(None) == 256
    assert cfg.max_model_len(100) == 100
    with pytest.raises(ValueError, match="exceeds the model's limit of 256"):
        cfg.max_model_len(512)
    scaled = ModelConfig.from_dict(
        BASE | {"max_position_embeddings": 256, "rope_scaling": {"type": "dynamic", "factor": 2.0}}
    )
    assert scaled.max_model_len(512) == 512  # RoPE scaling is what longer contexts are for
    mistral = ModelConfig.from_dict(BASE | {"model_type": "mistral", "sliding_window": 128})
    assert mistral.max_model_len(None) == 128  # the paged cache has no window: stay inside it
    qwen = ModelConfig.from_dict(BASE | {"model_type": "qwen2", "sliding_window": 128})
    assert qwen.sliding_window is None  # written, but use_sliding_window is false


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'"),
        ({"hidden_act": "gelu"}, "unsupported hidden_act"),
        ({"rope_scaling": {"rope_type": "longrope"}}, "unsupported RoPE type 'longrope'"),
        ({"num_key_value_heads": 3}, "must be a multiple"),
        ({"torch_dtype": "int8"}, "unsupported dtype"),
    ],
)
def test_clear_errors(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(BASE | change)


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        ModelConfig.from_folder(tmp_path)
