"""model_runner.py: logits equal transformers' for whole prompts, chunked prefill, mixed batches
and every RoPE variant; the KV cache is sized and copied as the contract says."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from deepflow.engine.config import EngineConfig
from deepflow.engine.model_runner import ModelRunner
from deepflow.engine.outputs import ScheduledChunk, SchedulerOutput
from deepflow.engine.sampling_params import SamplingParams
from deepflow.engine.sequence import Sequence

ATOL = 1e-4
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def cpu_config(folder: Path, **kwargs) -> EngineConfig:
    """This file tests the CPU reference path, whatever accelerator the machine has."""
    return EngineConfig(model=str(folder), device="cpu", **kwargs)


def make_seq(seq_id: int, token_ids: list[int], blocks: list[int], computed: int = 0) -> Sequence:
    seq = Sequence(seq_id, str(seq_id), token_ids, SamplingParams())
    seq.block_table = list(blocks)
    seq.num_computed_tokens = computed
    return seq


def run(runner: ModelRunner, *chunks: tuple[Sequence, int], copies=()) -> torch.Tensor:
    """The step's logits (the runner keeps them for its sampler until the next step)."""
    runner.execute(SchedulerOutput([ScheduledChunk(s, n) for s, n in chunks], list(copies)))
    return runner.logits.clone()


def tokens(n: int, seed: int, vocab: int = 512) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.fixture(params=["llama", "qwen2"])
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


def test_whole_prompt_logits_match_transformers(tiny_model_dirs, hf_model, arch: str) -> None:
    folder = tiny_model_dirs[arch]
    runner = ModelRunner(cpu_config(folder, block_size=4, num_kv_blocks=64))
    assert runner.device.type == "cpu" and runner.dtype == torch.float32
    ids = tokens(45, seed=1)
    seq = make_seq(0, ids, blocks=list(range(63, 51, -1)))  # 12 blocks, out of order
    input_ids, positions, meta, _ = runner.prepare([ScheduledChunk(seq, len(ids))])
    with torch.inference_mode():
        every = runner.model.compute_logits(runner.model(input_ids, positions, meta))
    expected = hf_logits(hf_model(folder), ids)
    torch.testing.assert_close(every, expected, atol=ATOL, rtol=0)
    seq2 = make_seq(1, ids, blocks=list(range(12)))
    last = run(runner, (seq2, len(ids)))
    assert last.shape == (1, 512) and last.dtype == torch.float32
    torch.testing.assert_close(last[0], expected[-1], atol=ATOL, rtol=0)


def test_chunked_prefill_and_mixed_batch(tiny_model_dirs, hf_model, arch: str) -> None:
    folder = tiny_model_dirs[arch]
    hf = hf_model(folder)
    runner = ModelRunner(cpu_config(folder, block_size=4, num_kv_blocks=64))
    a, b, c = tokens(37, 2), tokens(9, 3), tokens(16, 4)
    seq_a = make_seq(0, a, list(range(0, 10)))
    seq_b = make_seq(1, b, list(range(10, 13)))
    seq_c = make_seq(2, c, list(range(13, 18)))
    # Step 1: the first chunks of a and c, all of b but its last token.
    out = run(runner, (seq_a, 10), (seq_b, 8), (seq_c, 16))
    assert out.shape == (1, 512)  # only c's chunk reached the end of its tokens
    torch.testing.assert_close(out[0], hf_logits(hf, c)[-1], atol=ATOL, rtol=0)
    seq_a.num_computed_tokens, seq_b.num_computed_tokens, seq_c.num_computed_tokens = 10, 8, 16
    # Step 2: a's middle chunk (crossing blocks), b's last prompt token, c decodes a token.
    seq_c.token_ids.append(7)
    before = (list(seq_a.token_ids), seq_a.num_computed_tokens, list(seq_a.block_table))
    out = run(runner, (seq_a, 15), (seq_b, 1), (seq_c, 1))
    assert (list(seq_a.token_ids), seq_a.num_computed_tokens, list(seq_a.block_table)) == before
    torch.testing.assert_close(out[0], hf_logits(hf, b)[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1], hf_logits(hf, [*c, 7])[-1], atol=ATOL, rtol=0)
    seq_a.num_computed_tokens = 25
    # Step 3: a's last chunk alone.
    out = run(runner, (seq_a, 12))
    torch.testing.assert_close(out[0], hf_logits(hf, a)[-1], atol=ATOL, rtol=0)


def test_block_copies_apply_before_the_step(tiny_llama: Path) -> None:
    runner = ModelRunner(cpu_config(tiny_llama, block_size=4, num_kv_blocks=16))
    ids = tokens(10, 5)
    seq = make_seq(0, ids, [0, 1, 2])
    run(runner, (seq, 9))  # positions 0..8: block 2 holds position 8
    reference = run(runner, (make_seq(1, ids, [0, 1, 2], computed=9), 1))
    # Another sequence shares blocks 0-1 and writes into its own copy (7) of block 2.
    fork = make_seq(2, ids, [0, 1, 7], computed=9)
    out = run(runner, (fork, 1), copies=[(2, 7)])
    assert torch.equal(runner.kv_cache[:, :, 7, :1], runner.kv_cache[:, :, 2, :1])
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=0)


ROPE_VARIANTS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
    "yarn": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("variant", list(ROPE_VARIANTS))
def test_rope_variants_end_to_end(tiny_llama: Path, tmp_path: Path, variant: str) -> None:
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / variant
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 64
    config["rope_parameters"] = {"rope_theta": 10000.0, **ROPE_VARIANTS[variant]}
    (folder / "config.json").write_text(json.dumps(config))
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokens(100, 6)  # past max_position_embeddings, so the scaling matters
    runner = ModelRunner(cpu_config(folder, block_size=8, num_kv_blocks=16, max_model_len=100))
    seq = make_seq(0, ids, list(range(13)))
    input_ids, positions, meta, _ = runner.prepare([ScheduledChunk(seq, 100)])
    with torch.inference_mode():
        every = runner.model.compute_logits(runner.model(input_ids, positions, meta))
    torch.testing.assert_close(every, hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_cache_sizing(tiny_llama: Path) -> None:
    per_block = 2 * 2 * 16 * 2 * 16 * 4  # K and V, layers, block size, kv heads, head dim, fp32
    runner = ModelRunner(cpu_config(tiny_llama, block_size=16, kv_cache_bytes=per_block * 37 + 5))
    assert runner.bytes_per_block == per_block
    assert runner.num_blocks == 37
    assert runner.kv_cache.shape == (2, 2, 37, 16, 2, 16)
    assert runner.max_model_len == 2048
    exact = ModelRunner(cpu_config(tiny_llama, num_kv_blocks=5, max_model_len=256))
    assert (exact.num_blocks, exact.max_model_len) == (5, 256)
    with pytest.raises(RuntimeError, match="less than one block"):
        ModelRunner(cpu_config(tiny_llama, kv_cache_bytes=100))


def test_bfloat16_on_the_cpu(tiny_qwen2: Path, hf_model) -> None:
    runner = ModelRunner(cpu_config(tiny_qwen2, dtype="bfloat16", num_kv_blocks=8))
    assert runner.kv_cache.dtype == torch.bfloat16
    assert runner.model.model.norm.weight.dtype == torch.bfloat16
    ids = tokens(20, 7)
    out = run(runner, (make_seq(0, ids, [0, 1]), 20))
    assert out.dtype == torch.float32
    expected = hf_logits(hf_model(tiny_qwen2), ids)[-1]
    assert torch.nn.functional.cosine_similarity(out[0], expected, dim=0) > 0.99


def test_edges(tiny_llama: Path) -> None:
    runner = ModelRunner(cpu_config(tiny_llama, num_kv_blocks=4))
    assert run(runner).shape == (0, 512)
    with pytest.raises(ValueError, match="tensor_parallel_size=2 needs one ModelRunner per rank"):
        ModelRunner(cpu_config(tiny_llama, tensor_parallel_size=2))
