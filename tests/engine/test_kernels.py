"""kernels/: each Triton kernel against the torch reference layer it replaces, on fresh random
inputs of several shapes (ragged batches, block-boundary lengths, strided views).

Without an accelerator the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before
the kernels are first imported), so CI checks their indexing and masking; on a GPU the same
tests run compiled. The interpreter mishandles bf16 matrix products and truncates when it rounds
to bf16, so attention is checked there in float32 and float16 and bf16 results within a
tolerance (bf16 runs compiled on the device: bench/device_check.py).
"""

from __future__ import annotations

import pytest
import torch

from deepflow.engine import kernels
from deepflow.engine.kernels.metadata import build_fast_metadata
from deepflow.engine.layers.activation import SiluAndMul
from deepflow.engine.layers.attention import Attention, AttentionMetadata, store_kv
from deepflow.engine.layers.norm import RMSNorm
from deepflow.engine.layers.rotary import RotaryEmbedding, apply_rotary
from tests.engine.triton_setup import DEVICE, INTERPRET

if DEVICE.type == "npu":
    pytest.skip("the Triton kernels target CUDA", allow_module_level=True)
pytest.importorskip("triton")
DEV = DEVICE.torch_device
ATTENTION_DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "hidden"), [(1, 64), (5, 96), (3, 256), (4, 2048)])
def test_rms_norm_with_and_without_residual(dtype, rows, hidden) -> None:
    """The model's case: x in the model's dtype, the residual stream in float32 (the sum is
    exact float32 on both paths), the norm rounded once to the weight's dtype."""
    g = gen(rows * hidden)
    norm = RMSNorm(hidden, 1e-5).to(DEV, dtype)
    norm.weight.data = (1 + torch.randn(hidden, generator=g)).to(DEV, dtype)
    x = torch.randn(rows, hidden, generator=g).to(DEV, dtype) * 3
    r = torch.randn(rows, hidden, generator=g).to(DEV) * 5
    ref_plain, (ref_out, ref_res) = norm(x), norm(x, r)
    with kernels.use_backend("triton"):
        plain, (out, res) = norm(x), norm(x, r)
        _, res_from_low = norm(x, r.to(dtype))  # a residual in the model's dtype is widened
    assert res.dtype == torch.float32 and out.dtype == plain.dtype == dtype
    assert torch.equal(res, ref_res) and torch.equal(res_from_low, x.float() + r.to(dtype).float())
    # float32: the order of a sum apart. bf16 compiled: the same float32 value rounded once
    # (a rare last-bit difference); the interpreter truncates to bf16 instead of rounding.
    low = TOL[dtype] if INTERPRET else 1e-3
    tol = 1e-6 if dtype == torch.float32 else low
    assert rel_err(plain, ref_plain) < tol and rel_err(out, ref_out) < tol
    # Against float64 the kernel is as close as one rounding to the model's dtype allows.
    x64 = r.double() + x.double()
    exact = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    assert rel_err(out, exact) < (1e-6 if dtype == torch.float32 else max(low, 3e-3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "inter"), [(1, 64), (7, 176), (2, 1500)])
def test_silu_and_mul(dtype, rows, inter) -> None:
    x = (torch.randn(rows, 2 * inter, generator=gen(inter)) * 4).to(DEV, dtype)
    act = SiluAndMul()
    expected = act(x)
    with kernels.use_backend("triton"):
        out = act(x)
    assert out.shape == (rows, inter)
    assert rel_err(out, expected) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "heads", "kv_heads", "dim"), [(3, 4, 2, 16), (9, 6, 2, 24)])
def test_rotary_in_place_on_strided_views(dtype, tokens, heads, kv_heads, dim) -> None:
    g = gen(tokens + dim)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g).to(DEV, dtype)
    q, k, _ = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    rope = RotaryEmbedding(dim, 10000.0, None, 2048, 2048).to(DEV)
    positions = torch.randint(0, 2000, (tokens,), generator=g).to(DEV)
    cos, sin = rope(positions, torch.float32)  # the model's tables are float32 for any dtype
    q, k = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim)
    expected_q, expected_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    before = qkv.clone()
    with kernels.use_backend("triton"):
        out_q, out_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    assert out_q.data_ptr() == q.data_ptr()  # in place, into the projection's buffer
    assert rel_err(out_q, expected_q) < TOL[dtype] and rel_err(out_k, expected_k) < TOL[dtype]
    v_cols = slice((heads + kv_heads) * dim, None)
    assert torch.equal(qkv[:, v_cols], before[:, v_cols])  # v untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 64])
def test_lm_head_logits_are_float32(dtype, rows) -> None:
    """The head writes float32 logits from model-dtype inputs, on the GEMV (1-2 rows), the
    library GEMM and the reference alike: within float32 accumulation of the exact product."""
    from deepflow.engine.layers.embedding import LMHead

    if INTERPRET and dtype == torch.bfloat16:
        pytest.skip("the interpreter mishandles bf16 products")
    g = gen(rows + 31)
    head = LMHead(1000, 256, None).to(DEV, dtype)
    head.weight.data = (torch.randn(1000, 256, generator=g) * 0.05).to(DEV, dtype)
    x = torch.randn(rows, 256, generator=g).to(DEV, dtype)
    exact = x.double() @ head.weight.double().T
    ref = head(x)
    with kernels.use_backend("triton"):
        fast = head(x)
    assert ref.dtype == fast.dtype == torch.float32
    assert rel_err(ref, exact) < 1e-6 and rel_err(fast, exact) < 1e-6


def test_store_kv_skips_padding_slots() -> None:
    g = gen(5)
    k_cache = torch.randn(6, 4, 2, 16, generator=g).to(DEV)
    v_cache = torch.randn(6, 4, 2, 16, generator=g).to(DEV)
    k = torch.randn(5, 2, 16, generator=g).to(DEV)
    v = torch.randn(5, 2, 16, generator=g).to(DEV)
    slots = torch.tensor([3, 17, -1, 0, 23], device=DEV)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    store_kv(k[keep], v[keep], expected_k, expected_v, slots[keep])
    from deepflow.engine.kernels.attention import store_kv as fast_store

    fast_store(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def run_attention(
    chunks: list[tuple[int, int]],
    block_size: int,
    heads: int,
    kv_heads: int,
    dim: int,
    dtype: torch.dtype,
    seed: int,
) -> None:
    """Reference Attention and the kernels on the same step; outputs and caches compared."""
    g = gen(seed)
    need = [-(-(s + n) // block_size) for s, n in chunks]
    num_blocks = sum(need) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()  # scattered, out-of-order blocks
    tables = [[order.pop() for _ in range(c)] for c in need]
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(DEV, dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(DEV, dtype)
    tokens = sum(n for _, n in chunks)
    # q/k/v as strided views of one projection, as the decoder hands them over.
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g).to(DEV, dtype)
    q, k, v = (
        t.view(tokens, -1, dim)
        for t in qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    )
    slots = [
        t[p // block_size] * block_size + p % block_size
        for (s, n), t in zip(chunks, tables, strict=True)
        for p in range(s, s + n)
    ]
    width = max(need)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=DEV),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], device=DEV),
        chunk_starts=[s for s, _ in chunks],
        chunk_lens=[n for _, n in chunks],
    )
    ref = Attention(heads, kv_heads, dim, dim**-0.5)
    ref.k_cache, ref.v_cache = k_cache.clone(), v_cache.clone()
    expected = ref(q, k, v, meta)
    fast = Attention(heads, kv_heads, dim, dim**-0.5)
    fast.k_cache, fast.v_cache = k_cache.clone(), v_cache.clone()
    meta.fast = build_fast_metadata(
        meta.chunk_starts, meta.chunk_lens, tables, slots, lambda t: t.to(DEV)
    )
    out = fast(q, k, v, meta)
    assert torch.isfinite(out).all()
    assert rel_err(out, expected) < TOL[dtype], rel_err(out, expected)
    assert torch.equal(fast.k_cache, ref.k_cache) and torch.equal(fast.v_cache, ref.v_cache)


ATTENTION_CASES = {
    "decodes at block boundaries": [(3, 1), (4, 1), (7, 1), (8, 1), (15, 1), (0, 1)],
    "ragged prefills": [(0, 5), (0, 3), (0, 8), (0, 2)],
    "prefill over cached prefixes": [(4, 9), (12, 4), (1, 7)],
    "chunked prefill mixed with decodes": [(4, 9), (11, 1), (0, 12), (12, 4), (1, 1)],
    "long chunk, several tiles": [(16, 70), (100, 1), (3, 66)],
    "long decodes over many splits": [(700, 1), (33, 1), (64, 1), (511, 1), (1, 1)],
}


@pytest.fixture(params=["split", "whole"])
def decode_path(request, monkeypatch):
    """Decodes through the split kernel (small batches: flash-decoding) or the one-program-per-
    (sequence, KV head) kernel (large batches), whatever the test's batch size."""
    from deepflow.engine.kernels import attention

    monkeypatch.setattr(attention, "SPLIT_BELOW_PROGRAMS", 10**9 if request.param == "split" else 0)
    return request.param


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
@pytest.mark.parametrize("dtype", ATTENTION_DTYPES)
@pytest.mark.usefixtures("decode_path")
def test_paged_attention_kernels(case: str, dtype: torch.dtype) -> None:
    run_attention(ATTENTION_CASES[case], 4, heads=8, kv_heads=2, dim=16, dtype=dtype, seed=1)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block_size"), [(4, 4, 16, 16), (6, 1, 24, 3), (8, 8, 32, 1)]
)
@pytest.mark.usefixtures("decode_path")
def test_paged_attention_kernels_shapes(heads, kv_heads, dim, block_size) -> None:
    chunks = [(0, 17), (block_size * 2, 1), (5, 1), (block_size, block_size + 1)]
    run_attention(chunks, block_size, heads, kv_heads, dim, torch.float32, seed=heads + dim)


@pytest.mark.parametrize("seed", range(3))
def test_paged_attention_kernels_random_batches(seed: int) -> None:
    g = gen(100 + seed)
    count = int(torch.randint(1, 7, (1,), generator=g))
    chunks = [
        (int(torch.randint(0, 40, (1,), generator=g)), int(torch.randint(1, 20, (1,), generator=g)))
        for _ in range(count)
    ]
    block_size = [1, 2, 4, 8, 16][seed]
    run_attention(chunks, block_size, heads=4, kv_heads=2, dim=16, dtype=torch.float32, seed=seed)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_model_runner_fast_path_matches_reference(tiny_model_dirs, arch: str) -> None:
    """The whole tiny model through the kernels (eager) against the reference layers, over a
    mixed prefill step and a decode step that feeds a token still on the device."""
    from deepflow.engine.config import EngineConfig
    from deepflow.engine.model_runner import ModelRunner
    from deepflow.engine.outputs import (
        PENDING_TOKEN,
        PendingTokens,
        ScheduledChunk,
        SchedulerOutput,
    )
    from deepflow.engine.sampling_params import SamplingParams
    from deepflow.engine.sequence import Sequence

    def runner(backend: str) -> ModelRunner:
        config = EngineConfig(
            model=str(tiny_model_dirs[arch]), device=str(DEV), dtype="float32", block_size=4,
            num_kv_blocks=40, kernel_backend=backend, enforce_eager=True,
        )  # fmt: skip
        return ModelRunner(config)

    def seqs() -> list[Sequence]:
        g = gen(7)
        out = []
        for i, (n, blocks) in enumerate([(13, range(0, 6)), (4, range(6, 8)), (70, range(8, 27))]):
            s = Sequence(
                i, str(i), torch.randint(0, 500, (n,), generator=g).tolist(), SamplingParams()
            )
            s.block_table = list(blocks)
            out.append(s)
        return out

    results = []
    for backend in ("torch", "triton"):
        r, (a, b, c) = runner(backend), seqs()
        r.execute(
            SchedulerOutput([ScheduledChunk(a, 13), ScheduledChunk(b, 3), ScheduledChunk(c, 40)])
        )
        first = r.logits.clone()
        a.num_computed_tokens, b.num_computed_tokens, c.num_computed_tokens = 13, 3, 40
        a.token_ids.append(PENDING_TOKEN)  # sampled by the step before, still on the device
        pending = PendingTokens(torch.tensor([0, 321], device=DEV), {a.seq_id: 1})
        step = [ScheduledChunk(c, 30), ScheduledChunk(a, 1), ScheduledChunk(b, 1)]
        r.execute(SchedulerOutput(step), pending)
        second = r.logits.clone()
        results.append((first, second))
    (ref1, ref2), (fast1, fast2) = results
    assert fast1.shape == ref1.shape == (1, 512) and fast2.shape == (3, 512)
    assert rel_err(fast1, ref1) < 1e-5 and rel_err(fast2, ref2) < 1e-5
