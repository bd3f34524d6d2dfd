"""testmodel.py: reproducible random-weight folders that transformers loads as its own."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deepflow.engine.loader import checkpoint_files
from deepflow.engine.testmodel import SIZES, _shards, _tensor_plan, main, make_test_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(folder):
        out |= load_file(path)
    return out


def test_same_seed_same_files(tiny_llama: Path, tmp_path: Path) -> None:
    again = make_test_model(tmp_path / "again", "llama", "tiny", seed=0)
    for name in sorted(p.name for p in tiny_llama.iterdir()):
        assert (again / name).read_bytes() == (tiny_llama / name).read_bytes(), name
    other = weights(make_test_model(tmp_path / "other", "llama", "tiny", seed=1))
    base = weights(tiny_llama)
    assert other.keys() == base.keys()
    assert not torch.equal(
        other["model.layers.0.self_attn.q_proj.weight"],
        base["model.layers.0.self_attn.q_proj.weight"],
    )


@pytest.mark.parametrize(
    ("arch", "cls"), [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")]
)
def test_transformers_loads_it(
    tiny_model_dirs: dict[str, Path], hf_model, arch: str, cls: str
) -> None:
    folder = tiny_model_dirs[arch]
    model = hf_model(folder)
    assert type(model).__name__ == cls
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [cls] and config["model_type"] == arch
    # Every stored tensor reached the model (none reinitialised by transformers).
    state = model.state_dict()
    for name, tensor in weights(folder).items():
        assert torch.equal(state[name], tensor), name
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    }
    generation = transformers.GenerationConfig.from_pretrained(folder)
    assert generation.eos_token_id == config["eos_token_id"]


def test_small_is_a_few_million_parameters_in_one_file(tmp_path: Path) -> None:
    folder = make_test_model(tmp_path / "small", "qwen2", "small")
    assert checkpoint_files(folder) == [folder / "model.safetensors"]
    count = sum(t.numel() for t in weights(folder).values())
    assert 2_000_000 < count < 10_000_000
    assert json.loads((folder / "tokenizer.json").read_text())["model"]["type"] == "BPE"


def test_1b_plan_is_the_1_1b_llama_shape() -> None:
    size = SIZES["1b"]
    assert (size.hidden, size.layers, size.heads, size.kv_heads) == (2048, 16, 32, 8)
    assert (size.intermediate, size.vocab, size.dtype) == (8192, 32000, torch.bfloat16)
    plan = _tensor_plan("llama", size)
    count = sum(math.prod(shape) for _, shape in plan)
    assert 1.0e9 < count < 1.2e9
    shapes = dict(plan)
    assert shapes["model.layers.15.self_attn.k_proj.weight"] == (512, 2048)
    assert shapes["lm_head.weight"] == (32000, 2048)
    groups = _shards(plan, size.shards, size.layers)
    assert len(groups) == 4 and sum(len(g) for g in groups) == len(plan)
    biggest = max(sum(math.prod(s) for _, s in g) for g in groups)
    assert biggest * 2 < 0.7e9  # one bf16 shard at a time: well under a third of the model


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "m"), "--arch", "qwen2", "--size", "tiny", "--seed", "3"]) == 0
    assert "wrote qwen2 tiny test model" in capsys.readouterr().out
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "n"), "--arch", "gpt2"])
    with pytest.raises(ValueError, match="size must be one of"):
        make_test_model(tmp_path / "o", "llama", "huge")
