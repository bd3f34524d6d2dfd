"""loader.py: sharded and single-file checkpoints stream into the model; bad ones fail clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from deepflow.engine import loader
from deepflow.engine.loader import CheckpointError, checkpoint_files, load_weights
from deepflow.engine.model_config import ModelConfig
from deepflow.engine.models.decoder import DecoderForCausalLM

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def build(folder: Path) -> DecoderForCausalLM:
    return DecoderForCausalLM(ModelConfig.from_folder(folder), 256)


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(folder):
        tensors |= load_file(path)
    return tensors


def as_single_file(src: Path, dst: Path, edit=None) -> Path:
    """A copy of `src` with its weights in one model.safetensors, after `edit(tensors)`."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tensors = all_tensors(src)
    if edit is not None:
        edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sharded_load_fills_every_parameter(tiny_model_dirs: dict[str, Path], arch: str) -> None:
    folder = tiny_model_dirs[arch]
    assert len(checkpoint_files(folder)) == 2  # the tiny models are sharded on purpose
    model = build(folder)
    for p in model.parameters():
        p.data.fill_(float("nan"))
    load_weights(model, folder)
    assert not any(p.isnan().any() for p in model.parameters())
    stored = all_tensors(folder)
    layers: list[Any] = list(model.model.layers)
    attn = layers[1].self_attn.qkv_proj
    assert torch.equal(
        attn.weight[attn.parts["k_proj"]], stored["model.layers.1.self_attn.k_proj.weight"]
    )
    if arch == "qwen2":
        assert torch.equal(
            attn.bias[attn.parts["v_proj"]], stored["model.layers.1.self_attn.v_proj.bias"]
        )
        assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    else:
        assert torch.equal(model.lm_head.weight, stored["lm_head.weight"])
    mlp = layers[0].mlp.gate_up_proj
    assert torch.equal(
        mlp.weight[mlp.parts["up_proj"]], stored["model.layers.0.mlp.up_proj.weight"]
    )


def test_single_file_loads_the_same(tiny_llama: Path, tmp_path: Path) -> None:
    single = as_single_file(tiny_llama, tmp_path / "single")
    assert checkpoint_files(single) == [single / "model.safetensors"]
    a, b = build(tiny_llama), build(single)
    load_weights(a, tiny_llama)
    load_weights(b, single)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_loads_into_another_dtype(tiny_llama: Path) -> None:
    model = build(tiny_llama).to(torch.bfloat16)
    load_weights(model, tiny_llama)
    stored = all_tensors(tiny_llama)["model.norm.weight"]
    assert torch.equal(model.model.norm.weight, stored.to(torch.bfloat16))


def test_streams_one_tensor_at_a_time(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tensor is read once, straight from its shard: no whole-checkpoint dict in memory."""
    reads: list[str] = []
    real = safe_open

    class Counting:
        def __init__(self, *args, **kwargs) -> None:
            self.inner = real(*args, **kwargs)

        def __enter__(self):
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc) -> None:
            self.inner.__exit__(*exc)

        def keys(self):
            return self.handle.keys()

        def get_slice(self, name):
            return self.handle.get_slice(name)

        def get_tensor(self, name):
            reads.append(name)
            return self.handle.get_tensor(name)

    monkeypatch.setattr(loader, "safe_open", Counting)
    load_weights(build(tiny_llama), tiny_llama)
    assert sorted(reads) == sorted(all_tensors(tiny_llama))


def test_missing_tensor(tiny_llama: Path, tmp_path: Path) -> None:
    bad = as_single_file(
        tiny_llama, tmp_path / "m", lambda t: t.pop("model.layers.1.self_attn.k_proj.weight")
    )
    with pytest.raises(CheckpointError) as err:
        load_weights(build(bad), bad)
    message = str(err.value)
    assert (
        "missing tensor model.layers.1.self_attn.k_proj.weight (expected shape [32, 64])" in message
    )
    assert str(bad) in message


def test_wrong_shape(tiny_llama: Path, tmp_path: Path) -> None:
    def shrink(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 100)

    bad = as_single_file(tiny_llama, tmp_path / "s", shrink)
    with pytest.raises(
        CheckpointError,
        match=r"tensor model\.layers\.0\.mlp\.down_proj\.weight "
        r"in model\.safetensors has shape \[64, 100\], expected \[64, 176\]",
    ):
        load_weights(build(bad), bad)


def test_unknown_extra_tensor(tiny_llama: Path, tmp_path: Path) -> None:
    def extra(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)

    bad = as_single_file(tiny_llama, tmp_path / "x", extra)
    with pytest.raises(
        CheckpointError,
        match=r"unexpected tensor model\.layers\.0\.self_attn"
        r"\.q_norm\.weight in model\.safetensors",
    ):
        load_weights(build(bad), bad)


def test_known_harmless_extras_are_ignored(tiny_qwen2: Path, tmp_path: Path) -> None:
    def extras(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()  # tied model

    folder = as_single_file(tiny_qwen2, tmp_path / "h", extras)
    model = build(folder)
    load_weights(model, folder)
    assert torch.equal(model.lm_head.weight, all_tensors(tiny_qwen2)["model.embed_tokens.weight"])


def test_index_problems(tiny_llama: Path, tmp_path: Path) -> None:
    folder = tmp_path / "i"
    shutil.copytree(tiny_llama, folder)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError,
        match=r"index puts model\.norm\.weight in "
        r"model-00001-of-00002\.safetensors, but it is in model-00002",
    ):
        load_weights(build(folder), folder)
    index["weight_map"]["model.norm.weight"] = "model-00003-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lists shard files that do not exist"):
        load_weights(build(folder), folder)


def test_duplicate_tensor_across_shards(tiny_llama: Path, tmp_path: Path) -> None:
    folder = tmp_path / "d"
    shutil.copytree(tiny_llama, folder)
    (folder / "model.safetensors.index.json").unlink()
    save_file({"model.norm.weight": torch.ones(64)}, str(folder / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight appears in both"):
        load_weights(build(folder), folder)


def test_no_weights(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files"):
        checkpoint_files(tmp_path)
