"""Async scheduling: step N+1 is scheduled and launched before step N's samples reach the host,
and nothing a user sees changes. Runs the real tiny model on the CPU with the overlap forced on
(on the CPU it hides nothing, but every bookkeeping path is the same as on a GPU)."""

from __future__ import annotations

import pytest

from deepflow.engine.config import EngineConfig
from deepflow.engine.llm_engine import LLMEngine
from deepflow.engine.outputs import PENDING_TOKEN, PendingTokens
from deepflow.engine.sampling_params import SamplingParams
from tests.engine.conftest import assert_blocks_ok

pytestmark = pytest.mark.usefixtures("torch_one_thread")

PROMPTS = ["Hello there, how are you", "The quick brown fox jumps", "Once upon", "a b c d e f"]


def make(model, overlap: bool, **kwargs) -> LLMEngine:
    kwargs.setdefault("num_kv_blocks", 64)
    kwargs.setdefault("block_size", 4)
    return LLMEngine(EngineConfig(model=str(model), async_scheduling=overlap, **kwargs))


def run(engine: LLMEngine, requests, abort_at: dict[str, int] | None = None):
    """Add every request, step to the end (aborting as asked); final outputs and the text
    streamed per (request, sample)."""
    for request_id, prompt, params in requests:
        engine.add_request(request_id, prompt, params)
    final, streamed, step = {}, {}, 0
    while engine.has_unfinished_requests():
        for request_id, at in (abort_at or {}).items():
            if at == step and request_id in engine.requests:
                final[request_id] = engine.abort(request_id)
        for out in engine.step():
            for o in out.outputs:
                streamed[(out.request_id, o.index)] = streamed.get((out.request_id, o.index), "")
                streamed[(out.request_id, o.index)] += o.delta_text
            if out.finished:
                final[out.request_id] = out
        step += 1
    assert_blocks_ok(engine)
    return final, streamed


def summary(final) -> dict:
    return {
        rid: [(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in out.outputs]
        for rid, out in final.items()
    }


def mixed_requests(engine: LLMEngine):
    eos = engine.eos_token_ids[0]
    stop_text = engine.tokenizer.decode(engine.tokenizer.encode("the")[-1:])
    return [
        ("greedy", PROMPTS[0], SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)),
        ("n3", PROMPTS[1], SamplingParams(n=3, temperature=0, max_tokens=9)),
        ("seeded", PROMPTS[2], SamplingParams(temperature=0.9, top_k=40, seed=7, max_tokens=11)),
        (
            "penalties",
            PROMPTS[3],
            SamplingParams(
                temperature=0, repetition_penalty=1.3, frequency_penalty=0.4, max_tokens=12
            ),
        ),
        ("stop", PROMPTS[0], SamplingParams(temperature=0, stop=[stop_text], max_tokens=20)),
        ("stop_id", PROMPTS[2], SamplingParams(temperature=0, stop_token_ids=[eos], min_tokens=3)),
        ("logprobs", PROMPTS[1], SamplingParams(temperature=0, max_tokens=5, logprobs=3)),
    ]


@pytest.mark.parametrize(
    "options",
    [{}, {"num_kv_blocks": 14, "max_num_batched_tokens": 7}, {"enable_prefix_caching": False}],
    ids=["roomy", "preempting", "no-prefix-cache"],
)
def test_outputs_equal_the_synchronous_engine(tiny_llama, options) -> None:
    sync = make(tiny_llama, False, **options)
    expected, expected_stream = run(sync, mixed_requests(sync))
    engine = make(tiny_llama, True, **options)
    assert engine.async_scheduling
    final, streamed = run(engine, mixed_requests(engine))
    assert summary(final) == summary(expected)
    assert streamed == expected_stream
    for rid, out in final.items():
        ref = expected[rid].outputs
        for o, r in zip(out.outputs, ref, strict=True):
            assert o.cumulative_logprob == pytest.approx(r.cumulative_logprob, abs=1e-4)
            assert (o.logprobs is None) == (r.logprobs is None)
    if options.get("num_kv_blocks") == 14:
        assert engine.get_stats().num_preemptions > 0


def test_next_step_is_launched_before_the_last_samples_are_read(tiny_llama) -> None:
    engine = make(tiny_llama, True)
    runner, execute = engine.model_runner, engine.model_runner.execute
    fed_pending = []

    def watching(batch, pending=None):
        for chunk in batch.chunks:
            if chunk.seq.token_ids[chunk.start + chunk.num_tokens - 1] == PENDING_TOKEN:
                assert isinstance(pending, PendingTokens)
                assert chunk.seq.seq_id in pending.rows
                fed_pending.append(chunk.seq.seq_id)
        execute(batch, pending)

    runner.execute = watching
    engine.add_request("a", PROMPTS[0], SamplingParams(temperature=0, max_tokens=6))
    assert engine.step() == []  # the prefill is launched; its sample is still on the device
    outputs = engine.step()  # launches the first decode, then emits the prefill's token
    assert [len(o.outputs[0].token_ids) for o in outputs] == [1]
    final, _ = run(engine, [])
    assert len(fed_pending) == 5  # every decode fed the token its predecessor sampled
    assert final["a"].outputs[0].finish_reason == "length"
    assert not engine.scheduler.finishing


def test_abort_while_a_step_is_in_flight(tiny_llama) -> None:
    requests = [
        (str(i), p, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
        for i, p in enumerate(PROMPTS)
    ]
    sync = make(tiny_llama, False)
    expected, _ = run(sync, requests, abort_at={"1": 3})
    engine = make(tiny_llama, True)
    final, _ = run(engine, requests, abort_at={"1": 3})
    assert final["1"].outputs[0].finish_reason == "abort"
    assert PENDING_TOKEN not in final["1"].outputs[0].token_ids
    assert summary({k: v for k, v in final.items() if k != "1"}) == summary(
        {k: v for k, v in expected.items() if k != "1"}
    )
