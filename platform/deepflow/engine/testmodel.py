"""Random-weight Llama / Qwen2 model folders that transformers itself can load.

Each folder has a config.json written as transformers writes it, safetensors shards with an index
(one file for `small`), and a real byte-level BPE tokenizer trained on the bundled corpus, with
special tokens and a chat template. Weights are drawn per tensor from a generator seeded by
(seed, tensor name), so a folder is reproducible whatever its sharding, and shards are written
one at a time: the 1b model never sits in memory whole.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

CORPUS = Path(__file__).parent / "data" / "corpus.txt"
TRANSFORMERS_VERSION = "5.24.0"


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_positions: int
    shards: int
    dtype: torch.dtype
    std: float | None  # fixed std for weights; None scales by 1/sqrt(fan_in)
    head_spread: float = 0.0  # log-normal spread of the LM head's row norms (see _random)


SIZES = {
    # tiny/small get fan-in scaled weights (see _random); 1b gets the usual 0.02, which keeps
    # bf16 activations sane through 16 layers, GPT-2's 1/sqrt(2 * layers) on the projections
    # into the residual stream, and an LM head whose row norms spread log-normally.
    "tiny": Size(64, 2, 4, 2, 176, 512, 2048, 2, torch.float32, None),
    "small": Size(256, 4, 8, 4, 704, 4096, 2048, 1, torch.float32, None),
    "1b": Size(2048, 16, 32, 8, 8192, 32000, 4096, 4, torch.bfloat16, 0.02, head_spread=0.7),
}

LLAMA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim }}{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
CHATML_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system = 'You are a helpful assistant.' %}{%- set turns = messages %}"
    "{%- endif %}"
    "{{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}"
    "{%- for message in turns %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class Arch:
    model_type: str
    cls: str
    specials: tuple[str, ...]  # trained first, so they take ids 0, 1, ...
    bos: str | None
    eos: str
    chat_eos: str  # ends a chat turn; generation stops on it too
    pad: str
    template: str
    tied: bool
    bias: bool  # on q/k/v
    theta: float


ARCHS = {
    "llama": Arch(
        "llama", "LlamaForCausalLM",
        ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|start_header_id|>",
         "<|end_header_id|>", "<|eot_id|>"),
        "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|pad|>",
        LLAMA_TEMPLATE, tied=False, bias=False, theta=10000.0,
    ),
    "qwen2": Arch(
        "qwen2", "Qwen2ForCausalLM", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        None, "<|im_end|>", "<|endoftext|>", "<|endoftext|>",
        CHATML_TEMPLATE, tied=True, bias=True, theta=1000000.0,
    ),
}  # fmt: skip


# Qwen2's published split pattern: transformers rebuilds a qwen2 tokenizer around it, so the test
# tokenizer uses it too and both tokenise alike.
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def train_tokenizer(arch: str, vocab_size: int) -> Tokenizer:
    """Byte-level BPE on the bundled corpus; stops early if the corpus runs out of merges."""
    spec = ARCHS[arch]
    tok = Tokenizer(models.BPE())
    if arch == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(spec.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(CORPUS)], trainer)
    if spec.bos is not None:
        bos = (spec.bos, tok.token_to_id(spec.bos))
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B:1", special_tokens=[bos]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _tensor_plan(arch: str, size: Size) -> list[tuple[str, tuple[int, ...]]]:
    spec, h, d = ARCHS[arch], size.hidden, size.hidden // size.heads
    plan: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (size.vocab, h))]
    for i in range(size.layers):
        p = f"model.layers.{i}."
        plan += [
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
        for proj, rows in (
            ("q", size.heads * d),
            ("k", size.kv_heads * d),
            ("v", size.kv_heads * d),
        ):
            plan.append((f"{p}self_attn.{proj}_proj.weight", (rows, h)))
            if spec.bias:
                plan.append((f"{p}self_attn.{proj}_proj.bias", (rows,)))
        plan.append((p + "self_attn.o_proj.weight", (h, size.heads * d)))
        plan += [
            (p + "mlp.gate_proj.weight", (size.intermediate, h)),
            (p + "mlp.up_proj.weight", (size.intermediate, h)),
            (p + "mlp.down_proj.weight", (h, size.intermediate)),
        ]
    plan.append(("model.norm.weight", (h,)))
    if not spec.tied:
        plan.append(("lm_head.weight", (size.vocab, h)))
    return plan


def _random(name: str, shape: tuple[int, ...], size: Size, tied: bool, seed: int) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    noise = torch.randn(shape, generator=gen)
    if name.endswith("norm.weight"):
        return 1.0 + (0.0 if size.std is not None else 0.1) * noise
    if size.std is not None:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            return noise * size.std / math.sqrt(2 * size.layers)
        if name == "lm_head.weight" and size.head_spread:
            # With equal row norms every one of the 32,000 logits is alike (a flat distribution,
            # median top-1 probability 0.001) and rounding flips near-ties; spread norms give a
            # trained model's peaked next-token distributions, the choice still set by context.
            spread = torch.exp(size.head_spread * torch.randn(shape[0], 1, generator=gen))
            return noise * size.std * spread
        return noise * size.std
    if name.endswith(".bias"):
        return noise * 0.1
    if name == "model.embed_tokens.weight":
        # Tied, a large embedding would dominate the residual stream and the model would echo
        # its last token forever.
        return noise * (0.25 / math.sqrt(shape[1]) if tied else 1.0)
    # Sharp attention (large q/k) and strong layer outputs make the next token depend on the
    # whole context, not only on the last token: outputs vary with the prompt for hundreds of
    # tokens instead of settling into a short loop.
    gain = 3.0 if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.5
    return noise * (1.0 if name == "lm_head.weight" else gain) / math.sqrt(shape[1])


def _shards(plan: list[tuple[str, tuple[int, ...]]], count: int, layers: int) -> list[list]:
    """`count` groups of whole layers; the embedding joins the first, the head the last."""
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[] for _ in range(count)]
    for name, shape in plan:
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            groups[layer * count // layers].append((name, shape))
        else:
            groups[0 if name.startswith("model.embed") else -1].append((name, shape))
    return groups


def _config(arch: str, size: Size, tok: Tokenizer) -> dict:
    spec = ARCHS[arch]
    eos = [tok.token_to_id(spec.eos), tok.token_to_id(spec.chat_eos)]
    dtype = str(size.dtype).removeprefix("torch.")
    config = {
        "architectures": [spec.cls],
        "model_type": spec.model_type,
        "attention_dropout": 0.0,
        "bos_token_id": tok.token_to_id(spec.bos or spec.pad),
        "eos_token_id": eos,
        "pad_token_id": tok.token_to_id(spec.pad),
        "head_dim": size.hidden // size.heads,
        "hidden_act": "silu",
        "hidden_size": size.hidden,
        "initializer_range": 0.02,
        "intermediate_size": size.intermediate,
        "max_position_embeddings": size.max_positions,
        "num_attention_heads": size.heads,
        "num_hidden_layers": size.layers,
        "num_key_value_heads": size.kv_heads,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": spec.theta, "rope_type": "default"},
        "tie_word_embeddings": spec.tied,
        "dtype": dtype,
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": size.vocab,
    }
    if arch == "llama":
        config |= {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
    else:
        config |= {
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": size.layers,
            "layer_types": ["full_attention"] * size.layers,
        }
    return dict(sorted(config.items()))


def _write_tokenizer(folder: Path, arch: str, tok: Tokenizer, max_len: int) -> None:
    spec = ARCHS[arch]
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": spec.bos,
        "eos_token": spec.eos,
        "pad_token": spec.pad,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "chat_template": spec.template,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def make_test_model(
    dir: str | Path, arch: str = "llama", size: str = "tiny", seed: int = 0
) -> Path:
    """Write a random-weight model folder; the same arguments always give the same files."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, not {arch!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, not {size!r}")
    folder, shape, spec = Path(dir), SIZES[size], ARCHS[arch]
    folder.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(arch, shape.vocab)
    config = _config(arch, shape, tok)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    generation["transformers_version"] = TRANSFORMERS_VERSION
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    _write_tokenizer(folder, arch, tok, shape.max_positions)

    groups = _shards(_tensor_plan(arch, shape), shape.shards, shape.layers)
    weight_map: dict[str, str] = {}
    total = 0
    for i, group in enumerate(groups, start=1):
        file = (
            "model.safetensors"
            if len(groups) == 1
            else f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        )
        tensors = {n: _random(n, s, shape, spec.tied, seed).to(shape.dtype) for n, s in group}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map |= dict.fromkeys(tensors, file)
        del tensors
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deepflow.engine.testmodel",
        description="Write a random-weight Llama/Qwen2 model folder with a real tokenizer.",
    )
    parser.add_argument("dir", help="folder to write (created if missing)")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="llama")
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    folder = make_test_model(args.dir, args.arch, args.size, args.seed)
    files = sorted(p.name for p in folder.iterdir())
    print(f"wrote {args.arch} {args.size} test model to {folder}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
