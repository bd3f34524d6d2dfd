"""A llama.cpp GGUF file as a Hugging Face model folder that FlowServe and transformers load.

llama.cpp keeps a model's weights quantized and renamed, its tokenizer as lists (tokens,
merges, token types) and its chat template as metadata. The folder made here has the weights
dequantized to one dtype under Hugging Face's names, with the rows of q and k put back in
Hugging Face's order (llama.cpp's converter interleaves each head's two rotary halves), a
``tokenizer.json`` rebuilt from the lists, and the template in ``tokenizer_config.json``.
Only the Llama architecture with a byte-level BPE tokenizer is read; anything else is refused
naming what it is. The folder is written to a temporary name and renamed when complete, so a
failed import never leaves a half-written model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, TokenType
from gguf.quants import dequantize
from safetensors.torch import save_file
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
)

from deepflow.engine.testmodel import TRANSFORMERS_VERSION

LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
PRE_TOKENIZERS = {
    # llama.cpp's pre-tokenizer names whose splitting is GPT-2's byte-level regex, with
    # digits split one by one first where the name says so (SmolLM's tokenizer.json does).
    "gpt2": False,
    "default": False,
    "smollm": True,
    "starcoder": True,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class GGUFImportError(ValueError):
    """The file is not a GGUF model this importer can read; the message says why."""


def import_gguf(source: Path, folder: Path, dtype: str = "float32") -> Path:
    """Write ``source`` (a .gguf file) as a Hugging Face folder at ``folder`` (which must not
    exist) with weights in ``dtype``; returns ``folder``."""
    if dtype not in DTYPES:
        raise GGUFImportError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if folder.exists():
        raise GGUFImportError(f"{folder} exists already")
    try:
        reader = GGUFReader(str(source))
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise GGUFImportError(f"{source} is not a readable GGUF file: {exc}") from exc
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFImportError(f"{source}: architecture {arch!r} is not supported (llama is)")
    config = _config(meta, has_output=any(t.name == "output.weight" for t in reader.tensors))
    partial = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        tensors = _weights(reader, config, DTYPES[dtype], source)
        save_file(tensors, str(partial / "model.safetensors"), metadata={"format": "pt"})
        config["torch_dtype"] = dtype
        (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (partial / "generation_config.json").write_text(
            json.dumps(
                {
                    "bos_token_id": config["bos_token_id"],
                    "eos_token_id": config["eos_token_id"],
                    "transformers_version": TRANSFORMERS_VERSION,
                },
                indent=2,
            )
            + "\n"
        )
        _write_tokenizer(meta, partial, source)
        partial.rename(folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return folder


def _metadata(reader: GGUFReader) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        out[name] = field.contents()
    return out


def _require(meta: dict[str, Any], key: str) -> Any:
    if key not in meta:
        raise GGUFImportError(f"the file's metadata has no {key}")
    return meta[key]


def _config(meta: dict[str, Any], has_output: bool) -> dict[str, Any]:
    hidden = int(_require(meta, "llama.embedding_length"))
    heads = int(_require(meta, "llama.attention.head_count"))
    kv_heads = int(meta.get("llama.attention.head_count_kv", heads))
    head_dim = int(meta.get("llama.rope.dimension_count", hidden // heads))
    if head_dim * heads != hidden:
        raise GGUFImportError(f"head size {head_dim} x {heads} heads is not hidden size {hidden}")
    if meta.get("llama.rope.scaling.type") not in (None, "none"):
        raise GGUFImportError(f"rope scaling {meta['llama.rope.scaling.type']!r} is not supported")
    tokens = _require(meta, "tokenizer.ggml.tokens")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_require(meta, "llama.feed_forward_length")),
        "num_hidden_layers": int(_require(meta, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": int(_require(meta, "llama.context_length")),
        "rms_norm_eps": float(_require(meta, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "vocab_size": int(meta.get("llama.vocab_size", len(tokens))),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": not has_output,
        "bos_token_id": int(meta.get("tokenizer.ggml.bos_token_id", 1)),
        "eos_token_id": int(meta.get("tokenizer.ggml.eos_token_id", 2)),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "initializer_range": 0.02,
        "use_cache": True,
        "transformers_version": TRANSFORMERS_VERSION,
    }


def _hf_name(name: str) -> str:
    stem, _, suffix = name.rpartition(".")
    parts = stem.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{suffix}"
    if stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.{suffix}"
    raise GGUFImportError(f"tensor {name!r} has no Hugging Face Llama name")


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary interleave of q or k rows: within each head, rows came as
    (pair, half) and go back to (half, pair)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _weights(
    reader: GGUFReader, config: dict[str, Any], dtype: torch.dtype, source: Path
) -> dict[str, Any]:
    out = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        shape = tuple(reversed(t.shape.tolist()))
        try:
            values = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
            values = values.reshape(shape)
        except NotImplementedError as exc:
            raise GGUFImportError(f"{source}: tensor {t.name}: {t.tensor_type.name} {exc}") from exc
        except ValueError as exc:  # its data is cut short: a partly copied file
            raise GGUFImportError(f"{source}: tensor {t.name} is incomplete ({exc})") from exc
        if name.endswith("q_proj.weight"):
            values = _unpermute(values, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            values = _unpermute(values, config["num_key_value_heads"])
        out[name] = torch.tensor(values, dtype=dtype)  # a copy: F32 tensors are read-only views
    expected = 2 + 9 * config["num_hidden_layers"] + (0 if config["tie_word_embeddings"] else 1)
    if len(out) != expected:
        raise GGUFImportError(f"the file holds {len(out)} weight tensors, a Llama {expected}")
    return out


def _write_tokenizer(meta: dict[str, Any], folder: Path, source: Path) -> None:
    kind = _require(meta, "tokenizer.ggml.model")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in PRE_TOKENIZERS:
        raise GGUFImportError(
            f"{source}: tokenizer {kind!r} with pre-tokenizer {pre!r} is not supported "
            f"(byte-level BPE, gpt2, with one of {', '.join(PRE_TOKENIZERS)})"
        )
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type", [TokenType.NORMAL] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if PRE_TOKENIZERS[pre]:
        digits = pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, kind_ in zip(tokens, types, strict=True)
        if kind_ == TokenType.CONTROL
    ]
    tok.add_special_tokens(special)

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos = token("bos")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    tok.save(str(folder / "tokenizer.json"))

    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "model_max_length": int(meta.get("llama.context_length", 2048)),
        "clean_up_tokenization_spaces": False,
    }
    if "tokenizer.chat_template" in meta:
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
