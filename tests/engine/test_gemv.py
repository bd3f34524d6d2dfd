"""kernels/gemv.py and kernels/sampling.py against their torch oracles (F.linear; log_softmax +
argmax), on fresh random inputs of several shapes, and the layers that pick them.

Without an accelerator the kernels run in Triton's interpreter (as in test_kernels.py), in
float16 and float32 (the interpreter mishandles bf16); on a GPU the same tests run compiled, in
bf16 too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepflow.engine import kernels
from tests.engine.triton_setup import DEVICE, INTERPRET

if DEVICE.type == "npu":
    pytest.skip("the Triton kernels target CUDA", allow_module_level=True)
pytest.importorskip("triton")

from deepflow.engine.kernels.gemv import MAX_ROWS, gemv
from deepflow.engine.kernels.sampling import greedy

DEV = DEVICE.torch_device
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("m", "n", "k", "bias"),
    [(1, 37, 100, False), (1, 64, 512, True), (2, 19, 1030, True), (2, 300, 2048, False),
     (1, 8, 8, False)],
)  # fmt: skip
def test_gemv_matches_linear(dtype, m, n, k, bias) -> None:
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=g, dtype=torch.float32).to(dtype).to(DEV)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype).to(DEV)
    b = torch.randn(n, generator=g).to(dtype).to(DEV) if bias else None
    out = gemv(x, w, b)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert out.shape == (m, n) and out.dtype == dtype
    assert torch.isfinite(out).all()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(out, ref) < tol


def test_gemv_strided_rows() -> None:
    """x may be a row slice of a wider tensor (its rows strided), W a row slice too."""
    g = torch.Generator().manual_seed(7)
    wide = torch.randn(2, 600, generator=g, dtype=torch.float16).to(DEV)
    x = wide[:, :256]
    w = torch.randn(70, 256, generator=g, dtype=torch.float16).to(DEV)[5:60]
    ref = F.linear(x.double(), w.double())
    assert rel_err(gemv(x, w), ref) < 1e-2


def test_linear_layer_picks_gemv_only_for_few_rows(monkeypatch) -> None:
    from deepflow.engine.kernels import gemv as gemv_mod
    from deepflow.engine.layers import linear as linear_mod

    calls = []
    monkeypatch.setattr(gemv_mod, "supports", lambda x, w: calls.append(x.shape[0]) or False)
    x = torch.randn(MAX_ROWS + 1, 16)
    w = torch.randn(8, 16)
    with kernels.use_backend("triton"):
        linear_mod.linear(x[:1], w)
        linear_mod.linear(x, w)
    with kernels.use_backend("torch"):
        linear_mod.linear(x[:1], w)
    assert calls == [1]  # only the triton backend, only a few rows, asks the kernel


@pytest.mark.parametrize("block", [None, 1024])
@pytest.mark.parametrize(("rows", "vocab"), [(1, 100), (3, 5000), (2, 9000), (4, 4096)])
def test_greedy_matches_argmax_and_log_softmax(rows, vocab, block) -> None:
    g = torch.Generator().manual_seed(rows * vocab)
    # bf16-rounded logits, as a bf16 model gives: ties are common and go to the lower index
    logits = (torch.randn(rows, vocab, generator=g) * 4).to(torch.bfloat16).float()
    top = logits.max(dim=-1).values
    logits[0, vocab // 3] = logits[0, vocab - 1] = top[0] + 1  # a tie across blocks
    logits = logits.to(DEV)
    tokens, logprobs = greedy(logits, block)
    ref_tokens = logits.argmax(dim=-1)
    ref = torch.log_softmax(logits, dim=-1).gather(1, ref_tokens[:, None])[:, 0]
    assert torch.equal(tokens, ref_tokens)
    assert tokens[0].item() == vocab // 3
    assert torch.allclose(logprobs, ref, atol=1e-5, rtol=1e-5)


def test_greedy_strided_rows() -> None:
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(3)).to(DEV)[::2]
    tokens, logprobs = greedy(logits)
    assert torch.equal(tokens, logits.argmax(dim=-1))
    ref = torch.log_softmax(logits, dim=-1).max(dim=-1).values
    assert torch.allclose(logprobs, ref, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "inter", "k", "bias"), [(1, 40, 100, False), (2, 64, 512, True)])
def test_gemv_silu_and_mul_matches_two_kernel_path(dtype, m, inter, k, bias) -> None:
    from deepflow.engine.kernels.gemv import gemv_silu_and_mul

    g = torch.Generator().manual_seed(m + inter + k)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEV)
    w = (torch.randn(2 * inter, k, generator=g) * 0.1).to(dtype).to(DEV)
    b = torch.randn(2 * inter, generator=g).to(dtype).to(DEV) if bias else None
    out = gemv_silu_and_mul(x, w, b)
    gate_up = gemv(x, w, b)  # the unfused path: the same GEMV, then SwiGLU's roundings
    gate, up = gate_up.float().chunk(2, dim=-1)
    ref = (F.silu(gate).to(dtype).float() * up).to(dtype)
    assert out.shape == (m, inter)
    assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 1e-2)
    full = F.linear(x.double(), w.double(), None if b is None else b.double())
    exact = F.silu(full[:, :inter]) * full[:, inter:]
    assert rel_err(out, exact) < (1e-5 if dtype == torch.float32 else 2e-2)
