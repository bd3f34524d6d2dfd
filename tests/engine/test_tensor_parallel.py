"""Tensor parallelism on the CPU: 2 real processes over gloo give the single-process results.

Greedy outputs equal token for token (ragged batch, chunked prefill, a prefix-cache hit and a
copy-on-write fork), logits agree to float32 precision, every checkpoint tensor is split over
the ranks exactly once, bad shapes fail before a process starts, and no worker outlives its
engine, whether it is shut down, collected, killed, or a worker fails.
"""

from __future__ import annotations

import gc
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from deepflow.engine.config import EngineConfig
from deepflow.engine.layers.embedding import VocabEmbedding
from deepflow.engine.llm_engine import LLMEngine
from deepflow.engine.loader import checkpoint_files, load_weights
from deepflow.engine.model_config import ModelConfig
from deepflow.engine.models.decoder import DecoderForCausalLM
from deepflow.engine.outputs import ScheduledChunk, SchedulerOutput
from deepflow.engine.parallel.group import TPGroup
from deepflow.engine.parallel.runner import SOURCE_ROOT, TensorParallelRunner, WorkerError
from deepflow.engine.parallel.step import STEP
from deepflow.engine.sampling_params import SamplingParams
from deepflow.engine.sequence import Sequence

pytestmark = pytest.mark.usefixtures("torch_one_thread")
EQUALITY_DEVICE = os.environ.get("DEEPFLOW_TP_TEST_DEVICE", "cpu")
"""The equality test on accelerators too: `DEEPFLOW_TP_TEST_DEVICE=cuda` with 2 GPUs (NCCL)."""
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
FORKED = SamplingParams(n=2, temperature=0.0, max_tokens=5, ignore_eos=True)


# ---- model folders ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from deepflow.engine.testmodel import make_test_model

    root = tmp_path_factory.mktemp("small_models")
    return {arch: make_test_model(root / arch, arch, "small") for arch in ("llama", "qwen2")}


@pytest.fixture(scope="module")
def one_kv_head(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny llama cut down to one KV head: fewer KV heads than ranks, so each is replicated."""
    dst = tmp_path_factory.mktemp("kv1") / "llama"
    shutil.copytree(tiny_llama, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.json"))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny_llama / name, dst / name)
    config = json.loads((tiny_llama / "config.json").read_text())
    config["num_key_value_heads"] = 1
    (dst / "config.json").write_text(json.dumps(config))
    tensors: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(tiny_llama):
        tensors |= load_file(path)
    for name in tensors:
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            tensors[name] = tensors[name][: config["head_dim"]].clone()
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


@pytest.fixture
def model_dir(request, tiny_model_dirs, small_model_dirs, one_kv_head) -> Path:
    size, arch = request.param.split("-")
    if size == "kv1":
        return one_kv_head
    return (tiny_model_dirs if size == "tiny" else small_model_dirs)[arch]


# ---- helpers ------------------------------------------------------------------------------------
def config(
    folder: Path, tp: int, async_scheduling: bool = False, device: str = "cpu"
) -> EngineConfig:
    return EngineConfig(
        model=str(folder),
        device=device,
        block_size=4,
        num_kv_blocks=96,
        max_num_batched_tokens=16,  # the 19- and 37-token prompts prefill in chunks
        tensor_parallel_size=tp,
        async_scheduling=async_scheduling,
    )


def tokens(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def generate(engine: LLMEngine) -> dict[str, list[list[int]]]:
    """A ragged batch, then prompts reusing its cached prefix, one of them forked in two."""
    vocab = engine.vocab_size
    first = {f"a{i}": tokens(n, i, vocab) for i, n in enumerate((3, 19, 37))}
    second = {"b0": first["a2"][:24] + tokens(6, 7, vocab), "b1": tokens(11, 8, vocab)}
    outputs: dict[str, list[list[int]]] = {}
    for batch, params in ((first, GREEDY), (second, FORKED)):
        for request_id, ids in batch.items():
            engine.add_request(request_id, ids, params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = [c.token_ids for c in out.outputs]
    assert engine.get_stats().prefix_cache_hit_tokens >= 24
    return outputs


def make_seq(seq_id: int, ids: list[int], blocks: range) -> Sequence:
    seq = Sequence(seq_id, str(seq_id), ids, SamplingParams())
    seq.block_table = list(blocks)
    return seq


def mixed_steps(runner, vocab: int) -> list[torch.Tensor]:
    """Two steps mixing a prefill chunk, whole prompts and decodes; their logits."""
    a, b, c = (
        make_seq(i, tokens(n, 20 + i, vocab), range(20 * i, 20 * i + 12))
        for i, n in enumerate((37, 9, 16))
    )
    first = [ScheduledChunk(a, 10), ScheduledChunk(b, 9), ScheduledChunk(c, 16)]
    runner.execute(SchedulerOutput(first))
    out = [runner.logits.clone()]
    a.num_computed_tokens, b.num_computed_tokens, c.num_computed_tokens = 10, 9, 16
    b.token_ids.append(1)
    c.token_ids.append(2)
    step = [ScheduledChunk(a, 27), ScheduledChunk(b, 1), ScheduledChunk(c, 1)]
    runner.execute(SchedulerOutput(step))
    out.append(runner.logits.clone())
    return out


def alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def assert_gone(pids: list[int], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if alive(p)], "tensor-parallel workers outlived their engine"


def my_workers() -> list[int]:
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"deepflow.engine.parallel.worker" in cmdline and ppid == os.getpid():
            found.append(int(proc.name))
    return found


# ---- tests --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model_dir", "async_scheduling"),
    [
        ("tiny-llama", False),
        ("tiny-qwen2", False),
        ("small-llama", True),
        ("small-qwen2", True),
        ("kv1-llama", True),
    ],
    indirect=["model_dir"],
)
def test_two_ranks_equal_one_process(model_dir: Path, async_scheduling: bool) -> None:
    """kv heads == ranks (tiny), > ranks (small), < ranks (kv1: replicated); qwen2 has q/k/v
    biases and a tied head. With async scheduling the previous step's samples reach the workers
    from rank 0's device; the reference always runs synchronously."""
    reference = LLMEngine(config(model_dir, 1, device=EQUALITY_DEVICE))
    engine = LLMEngine(config(model_dir, 2, async_scheduling, EQUALITY_DEVICE))
    assert engine.async_scheduling == async_scheduling
    runner = engine.model_runner
    assert isinstance(runner, TensorParallelRunner) and runner.num_blocks == 96
    pids = runner.worker_pids
    try:
        ours_all = mixed_steps(runner, engine.vocab_size)
        theirs_all = mixed_steps(reference.model_runner, engine.vocab_size)
        for ours, theirs in zip(ours_all, theirs_all, strict=True):
            assert ours.shape == theirs.shape and ours.dtype == torch.float32
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max())
        expected = generate(reference)
        assert generate(engine) == expected
        assert all(len(v) == 2 for k, v in expected.items() if k == "b1")
    finally:
        runner.shutdown()
    assert_gone(pids, within_s=0.5)  # shutdown waits for them
    assert not my_workers()


@pytest.mark.parametrize("name", ["llama", "qwen2", "kv1"])
def test_shards_cover_every_tensor_exactly_once(name, tiny_model_dirs, one_kv_head) -> None:
    """Loaded shards put back together give each checkpoint tensor; an element is held by one
    rank, or by every rank where the layer is replicated (norms) or its KV head is shared."""
    folder = one_kv_head if name == "kv1" else tiny_model_dirs[name]
    cfg = ModelConfig.from_folder(folder)
    stored: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(folder):
        with safe_open(path, framework="pt") as f:
            stored |= {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118
    total = {n: torch.zeros_like(t) for n, t in stored.items()}
    copies = {n: torch.zeros_like(t) for n, t in stored.items()}
    for rank in range(2):
        model = DecoderForCausalLM(cfg, 64, TPGroup(rank, 2))
        load_weights(model, folder)
        for tensor_name, target in model.checkpoint_tensors().items():
            where = (slice(None),) * target.dim + (target.shard or slice(None),)
            total[tensor_name][where] += target.destination
            copies[tensor_name][where] += 1
    for tensor_name, full in stored.items():
        replicated = tensor_name.endswith("norm.weight") or (
            name == "kv1" and tensor_name.endswith(("k_proj.weight", "v_proj.weight"))
        )
        held = 2 if replicated else 1
        assert torch.equal(copies[tensor_name], torch.full_like(full, held)), tensor_name
        torch.testing.assert_close(total[tensor_name], full * held, rtol=0, atol=0)


def test_vocab_shards_pad_the_last_rank() -> None:
    shards = [VocabEmbedding(10, 3, TPGroup(rank, 3)) for rank in range(3)]
    layout = [(e.vocab.start, e.vocab.size, e.weight.shape[0]) for e in shards]
    assert layout == [(0, 4, 4), (4, 4, 4), (8, 2, 4)]
    assert torch.equal(shards[2].weight[2:], torch.zeros(2, 3))


def test_shapes_that_do_not_split_fail_before_any_process(tiny_llama: Path) -> None:
    heads = r"num_attention_heads \(4\) is not divisible by tensor_parallel_size \(3\)"
    with pytest.raises(ValueError, match=heads):
        LLMEngine(config(tiny_llama, 3))
    assert not my_workers()
    with pytest.raises(ValueError, match=r"num_key_value_heads \(3\) is not divisible"):
        TPGroup(0, 2).kv_heads(3)
    with pytest.raises(ValueError, match=r"multiple of num_key_value_heads \(3\)"):
        TPGroup(0, 4).kv_heads(3)
    assert TPGroup(3, 4).kv_heads(2) == TPGroup(2, 4).kv_heads(2)  # ranks 2, 3 share head 1
    with pytest.raises(ValueError, match="needs one ModelRunner per rank"):
        from deepflow.engine.model_runner import ModelRunner

        ModelRunner(config(tiny_llama, 2))


def test_a_killed_worker_fails_the_next_step_clearly(tiny_llama: Path) -> None:
    engine = LLMEngine(config(tiny_llama, 2))
    runner = engine.model_runner
    engine.add_request("a", tokens(9, 1, engine.vocab_size), GREEDY)
    engine.step()
    os.kill(runner.worker_pids[0], signal.SIGKILL)
    with pytest.raises(WorkerError, match=r"worker 1 \(pid \d+\) was killed by SIGKILL"):
        engine.step()
    with pytest.raises(WorkerError, match="shut down"):
        engine.step()
    assert not my_workers()


def test_an_exception_in_a_worker_surfaces_in_rank_0(tiny_llama: Path) -> None:
    runner = TensorParallelRunner(config(tiny_llama, 2))
    pids = runner.worker_pids
    # A step the worker cannot read: it raises, reports its traceback and leaves the group.
    runner._group.workers[0].conn.send_bytes(STEP + pickle.dumps("not a step"))
    seq = make_seq(0, tokens(5, 1, 512), range(2))
    with pytest.raises(WorkerError, match=r"(?s)worker 1 failed:.*Traceback.*ValueError"):
        runner.execute(SchedulerOutput([ScheduledChunk(seq, 5)]))
    assert_gone(pids)


def test_workers_stop_when_the_runner_is_collected(tiny_llama: Path) -> None:
    engine = LLMEngine(config(tiny_llama, 2))
    pids = engine.model_runner.worker_pids
    del engine
    gc.collect()
    assert_gone(pids)


RANK_0 = """
import sys, time
from deepflow.engine.llm_engine import LLMEngine
from deepflow.engine.config import EngineConfig
engine = LLMEngine(EngineConfig(model=sys.argv[1], device="cpu", tensor_parallel_size=2,
                                num_kv_blocks=16))
print(*engine.model_runner.worker_pids, flush=True)
time.sleep(60)
"""


def test_workers_exit_when_rank_0_is_killed(tiny_llama: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(SOURCE_ROOT))
    rank0 = subprocess.Popen(
        [sys.executable, "-c", RANK_0, str(tiny_llama)], stdout=subprocess.PIPE, env=env
    )
    try:
        assert rank0.stdout is not None
        pids = [int(p) for p in rank0.stdout.readline().split()]
        assert len(pids) == 1 and alive(pids[0])
    finally:
        rank0.kill()
        rank0.wait()
    assert_gone(pids)
