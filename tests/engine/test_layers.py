"""layers/: each block against transformers' own implementation, and paged attention against
dense causal attention over ragged batches."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from deepflow.engine.layers.activation import SiluAndMul
from deepflow.engine.layers.attention import Attention, AttentionMetadata, store_kv
from deepflow.engine.layers.linear import MergedLinear
from deepflow.engine.layers.norm import RMSNorm
from deepflow.engine.layers.rotary import RotaryEmbedding, apply_rotary
from deepflow.engine.model_config import ModelConfig
from deepflow.engine.models.decoder import MLP

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("torch_one_thread")
hf_llama = pytest.importorskip("transformers.models.llama.modeling_llama")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_transformers(dtype: torch.dtype) -> None:
    """float32: transformers' result bit for bit. bf16: transformers' float32 result rounded
    once (it rounds twice: x * rstd, then the product with the weight), and the residual sum
    kept in float32 (it rounds that too)."""
    torch.manual_seed(0)
    ref32 = hf_llama.LlamaRMSNorm(48, eps=1e-5)
    ref32.weight.data = torch.randn(48).to(dtype).float()
    ours = RMSNorm(48, eps=1e-5)
    ours.weight.data.copy_(ref32.weight.data)
    ours = ours.to(dtype)
    x, residual = torch.randn(7, 48, dtype=dtype) * 3, torch.randn(7, 48, dtype=dtype)
    assert torch.equal(ours(x), ref32(x.float()).to(dtype))
    normed, summed = ours(x, residual)
    assert summed.dtype == torch.float32
    assert torch.equal(summed, x.float() + residual.float())
    assert torch.equal(normed, ref32(summed).to(dtype))
    if dtype == torch.bfloat16:  # and never further from the float32 result than transformers'
        ref = hf_llama.LlamaRMSNorm(48, eps=1e-5).to(dtype)
        ref.weight.data.copy_(ours.weight.data)
        truth = ref32(x.float())
        assert (ours(x).float() - truth).norm() <= (ref(x).float() - truth).norm()


def test_swiglu_mlp_matches_transformers() -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=80)
    ref = hf_llama.LlamaMLP(config)
    cfg = ModelConfig.from_dict(
        {
            "model_type": "llama",
            "hidden_size": 32,
            "intermediate_size": 80,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "vocab_size": 10,
        }
    )
    ours = MLP(cfg)
    gate_up = ours.gate_up_proj
    gate_up.weight.data[gate_up.parts["gate_proj"]] = ref.gate_proj.weight.data
    gate_up.weight.data[gate_up.parts["up_proj"]] = ref.up_proj.weight.data
    ours.down_proj.weight.data.copy_(ref.down_proj.weight.data)
    x = torch.randn(5, 32)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-6)
    assert SiluAndMul()(torch.tensor([[1.0, 2.0]])).item() == pytest.approx(
        F.silu(torch.tensor(1.0)) * 2
    )


def test_merged_linear_splits_in_declared_order() -> None:
    layer = MergedLinear(4, {"a": 2, "b": 3, "c": 1}, bias=True)
    assert layer.parts == {"a": slice(0, 2), "b": slice(2, 5), "c": slice(5, 6)}
    assert [t.shape[-1] for t in layer.split(torch.zeros(7, 6))] == [2, 3, 1]


ROPE_CASES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn-mscale": {
        "rope_type": "yarn",
        "factor": 8.0,
        "original_max_position_embeddings": 32,
        "mscale": 0.707,
        "mscale_all_dim": 1.0,
        "beta_fast": 16,
        "beta_slow": 2,
    },
    "yarn-untruncated": {
        "rope_type": "yarn",
        "factor": 3.0,
        "attention_factor": 1.2,
        "original_max_position_embeddings": 48,
        "truncate": False,
    },
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_matches_transformers(tmp_path: Path, case: str) -> None:
    """cos/sin and the rotation equal transformers' for every RoPE variant, config.json first."""
    max_pos, seq_len = 64, 200  # past max_pos, where the scaling variants differ
    params = {"rope_theta": 10000.0, "rope_type": "default", **(ROPE_CASES[case] or {})}
    hf_config = transformers.LlamaConfig(
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        num_hidden_layers=1,
        vocab_size=10,
        max_position_embeddings=max_pos,
        rope_parameters=params,
    )
    hf_config.save_pretrained(tmp_path)
    cfg = ModelConfig.from_folder(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["rope_parameters"]["rope_type"]
    ref = hf_llama.LlamaRotaryEmbedding(hf_config)
    ours = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, max_pos, seq_len)
    positions = torch.arange(seq_len)
    q, k = torch.randn(seq_len, 4, 32), torch.randn(seq_len, 2, 32)
    ref_cos, ref_sin = ref(q, positions[None])
    cos, sin = ours(positions, torch.float32)
    torch.testing.assert_close(cos, ref_cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, ref_sin[0], rtol=0, atol=1e-6)
    ref_q, ref_k = hf_llama.apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], ref_cos, ref_sin
    )
    torch.testing.assert_close(
        apply_rotary(q, cos, sin), ref_q[0].transpose(0, 1), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        apply_rotary(k, cos, sin), ref_k[0].transpose(0, 1), atol=1e-5, rtol=0
    )


def test_dynamic_rope_is_plain_rope_within_max_positions() -> None:
    plain = RotaryEmbedding(32, 10000.0, None, 64, 64)
    dynamic = RotaryEmbedding(32, 10000.0, {"rope_type": "dynamic", "factor": 2.0}, 64, 64)
    assert torch.equal(plain.inv_freq, dynamic.inv_freq)


# ---- paged attention ----------------------------------------------------------------------


def dense_chunk_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int
) -> torch.Tensor:
    """Plain causal attention over a whole sequence [length, heads, dim]; rows from `start`."""
    group = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.repeat_interleave(group, dim=1).transpose(0, 1),
        v.repeat_interleave(group, dim=1).transpose(0, 1),
        is_causal=True,
    )
    return out.transpose(0, 1)[start:]


def run_paged(
    chunks: list[tuple[int, int]], block_size: int, heads: int, kv_heads: int, seed: int
) -> None:
    """chunks: (positions already cached, new tokens) per sequence, all in one batch."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    dim = 8
    need = [-(-(s + n) // block_size) for s, n in chunks]
    num_blocks = sum(need) + 3
    physical = list(range(num_blocks))
    rng.shuffle(physical)
    # Unrelated blocks hold junk that must never leak into a result.
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen) * 100
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen) * 100
    tables, seqs = [], []
    for (start, n), count in zip(chunks, need, strict=True):
        table = [physical.pop() for _ in range(count)]
        tables.append(table)
        length = start + n
        q = torch.randn(length, heads, dim, generator=gen)
        k = torch.randn(length, kv_heads, dim, generator=gen)
        v = torch.randn(length, kv_heads, dim, generator=gen)
        seqs.append((q, k, v))
        slots = torch.tensor(
            [table[p // block_size] * block_size + p % block_size for p in range(length)]
        )
        store_kv(k[:start], v[:start], k_cache, v_cache, slots[:start])
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(
            [
                table[p // block_size] * block_size + p % block_size
                for (start, n), table in zip(chunks, tables, strict=True)
                for p in range(start, start + n)
            ]
        ),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        chunk_starts=[s for s, _ in chunks],
        chunk_lens=[n for _, n in chunks],
    )
    attn = Attention(heads, kv_heads, dim, dim**-0.5)
    attn.k_cache, attn.v_cache = k_cache, v_cache
    cat = [
        torch.cat([t[s : s + n] for (s, n), t in zip(chunks, part, strict=True)])
        for part in zip(*seqs, strict=True)
    ]
    out = attn(*cat, meta)
    expected = torch.cat(
        [dense_chunk_attention(q, k, v, s) for (s, _), (q, k, v) in zip(chunks, seqs, strict=True)]
    )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for (start, n), table, (_, k, v) in zip(chunks, tables, seqs, strict=True):
        for p in range(start, start + n):  # the new K/V landed in their slots
            assert torch.equal(k_cache[table[p // block_size], p % block_size], k[p])
            assert torch.equal(v_cache[table[p // block_size], p % block_size], v[p])


@pytest.mark.parametrize(
    "chunks",
    [
        [(0, 4)],  # one prefill filling a block exactly
        [(0, 5), (0, 3), (0, 8), (0, 1)],  # ragged prefills around block boundaries
        [(3, 1), (4, 1), (7, 1), (8, 1), (15, 1)],  # decodes at and across block boundaries
        [(4, 9), (11, 1), (0, 12), (12, 4), (1, 1)],  # chunked prefill mixed with decodes
        [(16, 16), (31, 1)],  # a chunk that starts and ends on boundaries
    ],
)
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (6, 1)])
def test_paged_attention_matches_dense(
    chunks: list[tuple[int, int]], heads: int, kv_heads: int
) -> None:
    run_paged(chunks, block_size=4, heads=heads, kv_heads=kv_heads, seed=len(chunks) + heads)


@settings(max_examples=40, deadline=None)
@given(
    chunks=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 20)), min_size=1, max_size=6),
    block_size=st.sampled_from([1, 2, 3, 4, 8, 16]),
    seed=st.integers(0, 1000),
)
def test_paged_attention_ragged_batches(
    chunks: list[tuple[int, int]], block_size: int, seed: int
) -> None:
    run_paged(chunks, block_size, heads=4, kv_heads=2, seed=seed)
