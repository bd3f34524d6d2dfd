import asyncio
import contextlib
import threading
import time

import pytest

from deepflow.engine import AsyncLLMEngine, EngineConfig, LLMEngine, SamplingParams
from deepflow.engine.async_engine import EngineDeadError

from .conftest import assert_blocks_ok

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def make_async(tiny_llama):
    engines: list[AsyncLLMEngine] = []

    def make(engine=None, **kwargs):
        if engine is None:
            kwargs.setdefault("num_kv_blocks", 64)
            kwargs.setdefault("block_size", 8)
            engine = LLMEngine(EngineConfig(model=str(tiny_llama), **kwargs))
        engines.append(AsyncLLMEngine(engine))
        return engines[-1]

    yield make
    for a in engines:
        a.shutdown()
        assert a._thread is None
        assert_blocks_ok(a.engine)


async def wait_idle(engine: AsyncLLMEngine, timeout=10.0):
    deadline = time.monotonic() + timeout
    while engine.engine.has_unfinished_requests() or engine._commands:
        assert time.monotonic() < deadline, "the engine never went idle"
        await asyncio.sleep(0.01)


async def collect(agen):
    return [out async for out in agen]


async def test_stream_deltas_add_up_and_end_finished(make_async):
    engine = make_async()
    outs = await collect(engine.generate("Once upon a time", SamplingParams(max_tokens=12, seed=1)))
    # at most one output a step (a reader that falls behind gets merged ones: see below)
    assert 1 <= len(outs) <= 12 and outs[-1].finished
    assert not any(o.finished for o in outs[:-1])
    final = outs[-1].outputs[0]
    assert "".join(o.outputs[0].delta_text for o in outs) == final.text
    assert [t for o in outs for t in o.outputs[0].delta_token_ids] == final.token_ids
    assert all(o.request_id == outs[0].request_id for o in outs)


async def test_a_reader_that_falls_behind_gets_merged_outputs(make_async):
    """While the reader sleeps, the steps' outputs merge into one: no backlog builds up,
    and the deltas it does get still add up to the whole text and tokens."""
    engine = make_async()
    outs = []
    async for out in engine.generate("Hi", SamplingParams(max_tokens=40, ignore_eos=True)):
        outs.append(out)
        if len(outs) == 1:
            await wait_idle(engine)  # every other step runs while this reader is away
    assert len(outs) == 2 and outs[-1].finished
    final = outs[-1].outputs[0]
    assert len(final.token_ids) == 40
    assert "".join(o.outputs[0].delta_text for o in outs) == final.text
    assert [t for o in outs for t in o.outputs[0].delta_token_ids] == final.token_ids


async def test_concurrent_requests_match_the_sync_engine(make_async, tiny_llama):
    prompts = ["Hello there", "The quick brown fox", "a b c", "Once upon"]
    params = SamplingParams(temperature=0, max_tokens=10)
    sync = LLMEngine(EngineConfig(model=str(tiny_llama), num_kv_blocks=64, block_size=8))
    expected = {}
    for i, p in enumerate(prompts):
        sync.add_request(str(i), p, params)
    while sync.has_unfinished_requests():
        for out in sync.step():
            if out.finished:
                expected[out.request_id] = out.outputs[0].token_ids
    engine = make_async()
    results = await asyncio.gather(
        *(collect(engine.generate(p, params, request_id=str(i))) for i, p in enumerate(prompts))
    )
    assert {r[-1].request_id: r[-1].outputs[0].token_ids for r in results} == expected


async def test_cancelling_the_consumer_aborts_and_frees_blocks(make_async):
    engine = make_async()
    first = asyncio.Event()

    async def consume():
        async for _ in engine.generate("Hello", SamplingParams(max_tokens=500, ignore_eos=True)):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 10)
    assert engine.engine.scheduler.block_manager.num_used_blocks > 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_idle(engine)
    assert engine.engine.scheduler.block_manager.num_used_blocks == 0


async def test_closing_the_stream_early_aborts(make_async):
    engine = make_async()
    params = SamplingParams(max_tokens=500, ignore_eos=True)
    async with contextlib.aclosing(engine.generate("Hi", params, request_id="r")) as stream:
        async for out in stream:
            assert not out.finished
            break
    await wait_idle(engine)
    assert "r" not in engine.engine.requests


async def test_invalid_requests_raise_in_the_caller_and_change_nothing(make_async):
    engine = make_async(max_model_len=32)
    with pytest.raises(ValueError, match="context"):
        await collect(engine.generate("word " * 40, SamplingParams()))
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    assert engine._thread is None and not engine.engine.has_unfinished_requests()
    params = SamplingParams(max_tokens=200, ignore_eos=True)
    stream = engine.generate("Hi", params, request_id="dup")
    await anext(stream)
    with pytest.raises(ValueError, match="already exists"):
        await collect(engine.generate("Hi", params, request_id="dup"))
    await stream.aclose()
    await wait_idle(engine)


async def test_abort_from_outside_ends_the_stream(make_async):
    engine = make_async()
    outs = []
    async for out in engine.generate("Hi", SamplingParams(max_tokens=500, ignore_eos=True),
                                     request_id="r"):
        outs.append(out)
        if len(outs) == 2:
            await engine.abort("r")
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    await wait_idle(engine)


async def test_the_event_loop_keeps_running_while_the_model_works(make_fake_engine):
    fake = make_fake_engine()
    execute = fake.model_runner.execute

    def slow_execute(batch, pending=None):
        time.sleep(0.05)
        execute(batch, pending)

    fake.model_runner.execute = slow_execute
    engine = AsyncLLMEngine(fake)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    tick_task = asyncio.create_task(ticker())
    outs = await collect(engine.generate("hello", SamplingParams(max_tokens=6)))
    tick_task.cancel()
    assert outs[-1].finished and ticks >= 20  # 6 steps x 50 ms of model time
    engine.shutdown()


async def test_a_failing_step_fails_every_stream_and_later_calls(make_fake_engine):
    fake = make_fake_engine()

    def broken(batch, pending=None):
        raise RuntimeError("device lost")

    fake.model_runner.execute = broken
    engine = AsyncLLMEngine(fake)
    with pytest.raises(EngineDeadError, match="device lost"):
        await collect(engine.generate("hello", SamplingParams()))
    with pytest.raises(EngineDeadError):
        await collect(engine.generate("hello", SamplingParams()))
    engine.shutdown()
    assert not fake.has_unfinished_requests()  # its requests were aborted, blocks freed


async def test_shutdown_stops_the_thread_and_refuses_new_requests(make_async):
    engine = make_async()
    await collect(engine.generate("Hi", SamplingParams(max_tokens=2)))
    thread = engine._thread
    assert thread is not None and thread.is_alive()
    await asyncio.to_thread(engine.shutdown)
    assert not thread.is_alive()
    assert not any(t.name == "flowserve-engine" and t is thread for t in threading.enumerate())
    with pytest.raises(EngineDeadError):
        await collect(engine.generate("Hi", SamplingParams()))
    stats = engine.get_stats()
    assert stats.num_running == 0 and stats.generation_tokens == 2
