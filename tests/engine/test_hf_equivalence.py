"""The acceptance test: FlowServe's greedy output equals transformers' own generate, token for
token, for Llama and Qwen2 tiny models in float32 on the CPU, while the engine is made to do
what could break it: requests arriving between steps, chunked prefill, prefix-cache hits and
preemption, each forced and asserted. Afterwards no KV block may be leaked.

The tiny models' weights are scaled so that greedy outputs depend on the whole prompt for
hundreds of tokens (not a short loop); the tests check that, and a control run with a planted
position bug checks that the comparison fails when it should.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepflow.engine.config import EngineConfig
from deepflow.engine.llm_engine import LLMEngine
from deepflow.engine.sampling_params import SamplingParams
from deepflow.engine.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

TEXTS = [
    "The fishing boats came in a little after six, while the fog still sat low over the water.",
    "def count_words(text: str) -> int:",
    "Q: Why is the sky blue?\nA:",
    "Dear Anna, the supply boat came today, two days late, with your parcel and the new lamp "
    "mantles. Thank you for the socks; they are exactly the right thickness.",
    "SELECT a.name, COUNT(b.id) FROM authors AS a",
    "Spring arrived late",
]
_hf_cache: dict[tuple[Path, tuple[int, ...], int], list[int]] = {}


def hf_greedy(model, folder: Path, ids: list[int], n: int) -> list[int]:
    """transformers' generate, greedy, exactly n new tokens (EOS ignored); cached per session."""
    key = (folder, tuple(ids), n)
    if key not in _hf_cache:
        # Neither stop at EOS nor suppress it (min_new_tokens would): the engine's ignore_eos
        # keeps sampling EOS like any token. generate falls back to the model's own generation
        # config for unset fields, so the EOS is cleared there.
        model.generation_config.eos_token_id = None
        config = transformers.GenerationConfig(do_sample=False, max_new_tokens=n)
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                generation_config=config,
            )
        _hf_cache[key] = out[0, len(ids) :].tolist()
        assert len(_hf_cache[key]) == n
    return _hf_cache[key]


def record_batches(engine: LLMEngine) -> list[list[tuple[int, int, int]]]:
    """Per step, (seq_id, start, num_tokens) of each chunk the runner was given."""
    steps: list[list[tuple[int, int, int]]] = []
    execute = engine.model_runner.execute

    def recording(batch, pending=None):
        steps.append([(c.seq.seq_id, c.start, c.num_tokens) for c in batch.chunks])
        execute(batch, pending)

    engine.model_runner.execute = recording
    return steps


def drive(
    engine: LLMEngine, arrivals: dict[int, list[tuple[str, list[int]]]], params: SamplingParams
) -> dict[str, list[int]]:
    """Add requests at the given step numbers, step until all are done; output ids by request."""
    outputs: dict[str, list[int]] = {}
    step = 0
    while engine.has_unfinished_requests() or any(s >= step for s in arrivals):
        for request_id, ids in arrivals.get(step, []):
            engine.add_request(request_id, ids, params)
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
        step += 1
    return outputs


def check_against_hf(
    folder: Path, hf_model, prompts: dict[str, list[int]], outputs: dict[str, list[int]], n: int
) -> None:
    model = hf_model(folder)
    assert outputs.keys() == prompts.keys()
    for request_id, ids in prompts.items():
        expected = hf_greedy(model, folder, ids, n)
        got = outputs[request_id]
        first = next(
            (i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b), None
        )
        assert first is None, f"request {request_id}: first difference at output token {first}"
    # The comparison has teeth: long, prompt-dependent, non-degenerate outputs.
    distinct = {tuple(o) for o in outputs.values()}
    assert len(distinct) == len(outputs), "two prompts gave the same output"
    assert all(len(set(o)) >= 30 for o in outputs.values()), "an output is a short loop"


@pytest.fixture(params=["llama", "qwen2"])
def model_dir(request: pytest.FixtureRequest, tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs[request.param]


def encode_all(folder: Path) -> list[list[int]]:
    tok = Tokenizer.from_folder(folder)
    return [tok.encode(t) for t in TEXTS]


def test_staggered_arrivals_and_chunked_prefill(model_dir: Path, hf_model, check_blocks) -> None:
    n = 200
    ids = encode_all(model_dir)
    assert max(len(i) for i in ids) > 24 > min(len(i) for i in ids)
    prompts = {str(i): p for i, p in enumerate(ids)}
    engine = LLMEngine(
        EngineConfig(
            model=str(model_dir), block_size=4, num_kv_blocks=512, max_num_batched_tokens=24
        )
    )
    steps = record_batches(engine)
    arrivals = {
        0: [("0", ids[0]), ("1", ids[1])],
        3: [("2", ids[2]), ("3", ids[3])],
        11: [("4", ids[4])],
        40: [("5", ids[5])],
    }
    outputs = drive(engine, arrivals, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    check_blocks(engine)
    # Forced: a prompt was split over steps, and prefill chunks shared steps with decodes.
    assert any(start > 0 and num > 1 for step in steps for _, start, num in step)
    assert any({num > 1 for *_, num in step} == {True, False} for step in steps)
    check_against_hf(model_dir, hf_model, prompts, outputs, n)


def test_prefix_cache_hits(model_dir: Path, hf_model, check_blocks) -> None:
    n = 160
    tok = Tokenizer.from_folder(model_dir)
    shared = tok.encode(TEXTS[3] + " " + TEXTS[0])[:48]  # six full blocks of 8
    tails = ["Reply:", " and then the gulls came", "\n\ndef f():", " 12345"]
    prompts = {
        str(i): shared + tok.encode(t, add_special_tokens=False) for i, t in enumerate(tails)
    }
    engine = LLMEngine(EngineConfig(model=str(model_dir), block_size=8, num_kv_blocks=256))
    arrivals = {
        0: [("0", prompts["0"])],
        5: [("1", prompts["1"]), ("2", prompts["2"])],
        30: [("3", prompts["3"])],
    }
    outputs = drive(engine, arrivals, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    check_blocks(engine)
    # Forced: every later request found the shared 48-token prefix in the cache.
    assert engine.scheduler.prefix_cache_hit_tokens >= 3 * 48
    assert engine.get_stats().prefix_cache_hit_tokens == engine.scheduler.prefix_cache_hit_tokens
    check_against_hf(model_dir, hf_model, prompts, outputs, n)


def test_preemption(model_dir: Path, hf_model, check_blocks) -> None:
    n = 150
    ids = encode_all(model_dir)[:4]
    prompts = {str(i): p for i, p in enumerate(ids)}
    # Each request ends needing ~45 blocks of 4; 70 blocks cannot hold all four at once.
    engine = LLMEngine(EngineConfig(model=str(model_dir), block_size=4, num_kv_blocks=70))
    arrivals = {0: list(prompts.items())[:3], 2: list(prompts.items())[3:]}
    outputs = drive(engine, arrivals, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    check_blocks(engine)
    assert engine.scheduler.num_preemptions > 0
    check_against_hf(model_dir, hf_model, prompts, outputs, n)


def test_a_planted_bug_is_caught(tiny_llama: Path, hf_model) -> None:
    """Control: decode positions off by one must make the comparison fail."""
    n = 60
    ids = encode_all(tiny_llama)[:3]
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), block_size=4, num_kv_blocks=128))
    runner, prepare = engine.model_runner, engine.model_runner.prepare

    def off_by_one(chunks):
        input_ids, positions, meta, rows = prepare(chunks)
        if all(c.num_tokens == 1 for c in chunks):
            positions = positions + 1
        return input_ids, positions, meta, rows

    runner.prepare = off_by_one
    outputs = drive(
        engine,
        {0: [(str(i), p) for i, p in enumerate(ids)]},
        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
    )
    model = hf_model(tiny_llama)
    mismatches = [outputs[str(i)] != hf_greedy(model, tiny_llama, p, n) for i, p in enumerate(ids)]
    assert all(mismatches)
