"""LLMEngine end to end. Engine logic runs on FakeRunner (conftest), whose KV cache checks
every read against the sequence's tokens; the acceptance tests at the end use the real tiny
model from deepflow.engine.testmodel."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepflow.engine import EngineConfig, LLMEngine, SamplingParams

from .conftest import FAKE_EOS, FakeTokenizer, assert_blocks_ok

TOK = FakeTokenizer()
GREEDY = SamplingParams(temperature=0, max_tokens=8)


def run(engine, check=True):
    """Step to the end; final outputs by request id, and the streamed text per (request, index)."""
    final, streamed = {}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            for c in out.outputs:
                streamed[(out.request_id, c.index)] = (
                    streamed.get((out.request_id, c.index), "") + c.delta_text
                )
            if out.finished:
                final[out.request_id] = out
        if check:
            assert_blocks_ok(engine)
    return final, streamed


def greedy_reference(runner, prompt_ids, max_tokens):
    ids, out = list(prompt_ids), []
    for _ in range(max_tokens):
        token = int(runner.logits_for(ids).argmax())
        ids.append(token)
        out.append(token)
    return out


def script(runner, prompt_len, tokens):
    """Make greedy decoding emit ``tokens`` after a prompt of ``prompt_len`` tokens."""
    runner.favour = lambda ids: tokens[min(len(ids) - prompt_len, len(tokens) - 1)]


PROMPTS = ["hello world", "abcd" * 5, "the quick brown fox", "hello world, hello", "x"]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"max_num_batched_tokens": 5},
        {"max_num_batched_tokens": 64, "enable_chunked_prefill": False},
        {"num_blocks": 10, "max_num_batched_tokens": 7},  # forces preemption
        {"enable_prefix_caching": False, "max_num_seqs": 2},
    ],
)
def test_greedy_outputs_do_not_depend_on_scheduling(make_fake_engine, options):
    engine = make_fake_engine(**options)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, GREEDY)
    final, streamed = run(engine)
    for i, prompt in enumerate(PROMPTS):
        out = final[str(i)].outputs[0]
        assert out.token_ids == greedy_reference(engine.model_runner, TOK.encode(prompt), 8)
        assert out.finish_reason == "length" and out.text == TOK.decode(out.token_ids)
        assert streamed[(str(i), 0)] == out.text
    if options.get("num_blocks") == 10:
        assert engine.get_stats().num_preemptions > 0


def test_step_returns_only_requests_that_produced_tokens(make_fake_engine):
    engine = make_fake_engine(max_num_batched_tokens=4)
    engine.add_request("long", list(range(1, 17)), GREEDY)  # 4 tokens a step: 4 steps
    engine.add_request("short", "hi", GREEDY)
    assert engine.step() == []
    assert engine.step() == []
    assert engine.step() == []
    assert [o.request_id for o in engine.step()] == ["long"]
    assert [o.request_id for o in engine.step()] == ["long", "short"]
    engine.abort("long")
    engine.abort("short")


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_unstreamed_requests_get_one_final_output_equal_to_the_streamed_one(
    make_fake_engine, async_scheduling
):
    engine = make_fake_engine(async_scheduling=async_scheduling)
    euro = [TOK.token(b"\xe2\x82"), TOK.token(b"\xac")]
    requests = {
        "plain": ("hello world", GREEDY),
        "n2": ("abcd", SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=6)),
        "eos": ("x", SamplingParams(temperature=0, max_tokens=20, min_tokens=2)),
        "stop": ("the quick", SamplingParams(temperature=0, max_tokens=12, stop=["c"])),
        "cut": ("€ ", SamplingParams(temperature=0, max_tokens=1)),  # ends inside a character
    }
    script(engine.model_runner, 2, [euro[0], euro[1], FAKE_EOS])
    results = {}
    for stream in (True, False):
        for rid, (prompt, params) in requests.items():
            engine.add_request(f"{rid}-{stream}", prompt, params, stream=stream)
        outputs = []
        while engine.has_unfinished_requests():
            outputs += engine.step()
        if not stream:
            assert all(o.finished for o in outputs) and len(outputs) == len(requests)
        final = {o.request_id.rsplit("-", 1)[0]: o for o in outputs if o.finished}
        results[stream] = {
            rid: [(c.text, c.token_ids, c.finish_reason, c.stop_reason) for c in o.outputs]
            for rid, o in final.items()
        }
        if not stream:
            for o in final.values():
                assert all(c.delta_text == c.text and c.delta_token_ids == c.token_ids
                           for c in o.outputs)  # fmt: skip
    assert results[False] == results[True]
    assert results[True]["cut"][0][0] == "\ufffd"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": "a" * 65}, "context"),
        ({"prompt": "a" * 64}, "context"),  # no room for one generated token
        ({"prompt": ""}, "empty"),
        ({"prompt": [1, 2, 300]}, "token ids"),
        ({"prompt": [1, "2"]}, "token ids"),
        ({"params": SamplingParams(n=5)}, "max_num_seqs"),
        ({"params": SamplingParams(stop_token_ids=[300])}, "vocabulary"),
        ({"priority": 1.5}, "priority"),
        ({"request_id": "dup"}, "already exists"),
    ],
)
def test_invalid_requests_raise_before_any_state_changes(make_fake_engine, kwargs, message):
    engine = make_fake_engine(num_blocks=16, max_model_len=64, max_num_seqs=4)
    engine.add_request("dup", "hi", GREEDY)
    before = (dict(engine.requests), list(engine.scheduler.waiting))
    bm = engine.scheduler.block_manager
    args = {"request_id": "new", "prompt": "ok", "params": GREEDY, "priority": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        engine.add_request(**args)
    assert (dict(engine.requests), list(engine.scheduler.waiting)) == before
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == 16
    engine.abort("dup")


def test_prompt_over_the_budget_without_chunked_prefill_is_rejected(make_fake_engine):
    engine = make_fake_engine(max_num_batched_tokens=8, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="chunked prefill"):
        engine.add_request("r", "a" * 9, GREEDY)
    assert not engine.has_unfinished_requests()
    with pytest.raises(TypeError):
        engine.add_request("r", "abc", {"temperature": 0})


def test_stop_string_across_tokens_is_cut_exactly(make_fake_engine):
    engine = make_fake_engine()
    ab, cd = TOK.token("ab"), TOK.token("cd")
    script(engine.model_runner, 2, [ord("z"), ab, cd, ord("q")])
    engine.add_request("cut", "hi", SamplingParams(temperature=0, stop=["bc"], max_tokens=10))
    final, streamed = run(engine)
    out = final["cut"].outputs[0]
    assert out.text == "za" and streamed[("cut", 0)] == "za"
    assert (out.finish_reason, out.stop_reason) == ("stop", "bc")
    assert out.token_ids == [ord("z"), ab, cd]
    engine.add_request(
        "keep",
        "hi",
        SamplingParams(temperature=0, stop="bc", include_stop_str_in_output=True, max_tokens=10),
    )
    final, streamed = run(engine)
    assert final["keep"].outputs[0].text == "zabc" == streamed[("keep", 0)]


def test_stop_string_split_inside_a_multibyte_character(make_fake_engine):
    engine = make_fake_engine()
    head, tail = TOK.token(b"\xe2\x82"), TOK.token(b"\xac")
    script(engine.model_runner, 2, [ord("a"), head, tail, ord("b"), ord("c")])
    engine.add_request("r", "hi", SamplingParams(temperature=0, stop="€b", max_tokens=10))
    final, streamed = run(engine)
    assert final["r"].outputs[0].text == "a" == streamed[("r", 0)]


def test_eos_stop_tokens_and_ignore_eos(make_fake_engine):
    engine = make_fake_engine()
    script(engine.model_runner, 2, [ord("a"), ord("b"), FAKE_EOS, ord("c"), 7])
    engine.add_request("eos", "hi", SamplingParams(temperature=0, max_tokens=10))
    engine.add_request(
        "stop_id", "hi", SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[ord("b")])
    )
    engine.add_request("ignore", "hi", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    engine.add_request("min", "hi", SamplingParams(temperature=0, max_tokens=5, min_tokens=4))
    final, _ = run(engine)
    eos = final["eos"].outputs[0]
    assert (eos.text, eos.finish_reason, eos.stop_reason) == ("ab", "stop", None)
    assert eos.token_ids == [ord("a"), ord("b"), FAKE_EOS]
    stop_id = final["stop_id"].outputs[0]
    assert (stop_id.text, stop_id.finish_reason, stop_id.stop_reason) == ("a", "stop", ord("b"))
    ignore = final["ignore"].outputs[0]
    assert ignore.finish_reason == "length" and len(ignore.token_ids) == 5
    assert FAKE_EOS not in final["min"].outputs[0].token_ids[:4]


def test_context_limit_finishes_with_length(make_fake_engine):
    engine = make_fake_engine(max_model_len=12)
    engine.add_request("r", list(range(1, 11)), SamplingParams(temperature=0, max_tokens=None))
    final, _ = run(engine)
    assert final["r"].outputs[0].finish_reason == "length"
    assert len(final["r"].outputs[0].token_ids) == 2


def test_seeded_sampling_is_reproducible_whatever_the_batch(make_fake_engine):
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=12)
    alone = make_fake_engine()
    alone.model_runner.favour = lambda ids: 97  # noise decides more: sampling matters
    alone.add_request("x", "hello world", params)
    expected = run(alone)[0]["x"].outputs[0].token_ids

    crowded = make_fake_engine(num_blocks=14, max_num_batched_tokens=6)
    crowded.model_runner.favour = lambda ids: 97
    crowded.add_request("a", "abcdabcd", SamplingParams(temperature=1.0, max_tokens=12))
    crowded.add_request("b", "hello", SamplingParams(temperature=0.8, seed=7, max_tokens=12))
    crowded.add_request("x", "hello world", params)
    crowded.add_request("c", "qq", SamplingParams(temperature=1.0, n=2, max_tokens=12))
    final, _ = run(crowded)
    assert final["x"].outputs[0].token_ids == expected
    other = make_fake_engine()
    other.model_runner.favour = lambda ids: 97
    other.add_request("x", "hello world", SamplingParams(temperature=1.0, seed=99, max_tokens=12))
    assert run(other)[0]["x"].outputs[0].token_ids != expected


def test_n_samples_share_the_prompt_blocks_then_copy_on_write(make_fake_engine):
    engine = make_fake_engine(block_size=4)
    engine.model_runner.favour = lambda ids: 97
    prompt = "hello world ab"  # 4 tokens: one full block... plus a partial one
    ids = TOK.encode(prompt + "cd e")
    assert len(ids) == 7
    engine.add_request("r", ids, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6))
    engine.step()  # prefill and fork
    group = engine.requests["r"]
    assert len(group.seqs) == 3
    tables = [list(s.block_table) for s in group.seqs]
    assert tables[0] == tables[1] == tables[2] and len(tables[0]) == 2
    bm = engine.scheduler.block_manager
    assert [bm.ref_count(b) for b in tables[0]] == [3, 3]
    assert_blocks_ok(engine)
    engine.step()  # each sample writes position 7 of the shared partial block
    full, partial = tables[0]
    assert [s.block_table[0] for s in group.seqs] == [full] * 3
    assert len({s.block_table[1] for s in group.seqs}) == 3
    assert len(engine.model_runner.copies) == 2 and {c[0] for c in engine.model_runner.copies} == {
        partial
    }
    final, _ = run(engine)
    outs = final["r"].outputs
    assert [o.index for o in outs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in outs}) > 1
    again = make_fake_engine(block_size=4)
    again.model_runner.favour = lambda ids: 97
    again.add_request("r", ids, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6))
    assert [o.token_ids for o in run(again)[0]["r"].outputs] == [o.token_ids for o in outs]


def test_n_greedy_samples_agree_with_one(make_fake_engine):
    engine = make_fake_engine(num_blocks=12, max_num_batched_tokens=6)
    engine.add_request("one", "hello world!", SamplingParams(temperature=0, max_tokens=10))
    engine.add_request("many", "hello world!", SamplingParams(n=4, temperature=0, max_tokens=10))
    final, _ = run(engine)
    expected = final["one"].outputs[0].token_ids
    assert [o.token_ids for o in final["many"].outputs] == [expected] * 4


@pytest.mark.parametrize("phase", ["waiting", "mid-prefill", "decoding", "preempted", "forked"])
def test_abort_at_every_phase_frees_every_block(make_fake_engine, phase):
    engine = make_fake_engine(num_blocks=8, max_num_batched_tokens=6)
    engine.add_request("old", list(range(50, 62)), SamplingParams(temperature=0, max_tokens=14))
    n = 2 if phase == "forked" else 1
    engine.add_request("r", list(range(1, 13)), SamplingParams(temperature=0, max_tokens=20, n=n))
    seq = engine.requests["r"].seqs[0]
    steps = {"waiting": 0, "mid-prefill": 3, "decoding": 5, "forked": 5, "preempted": 0}[phase]
    for _ in range(steps):
        engine.step()
    if phase == "preempted":
        while engine.scheduler.num_preemptions == 0:
            engine.step()
        assert seq in engine.scheduler.waiting
    if phase == "mid-prefill":
        assert 0 < seq.num_computed_tokens < seq.num_prompt_tokens
    if phase in ("decoding", "forked"):
        assert seq.num_output_tokens > 0 and len(engine.requests["r"].seqs) == n
    out = engine.abort("r")
    assert out.finished and all(c.finish_reason == "abort" for c in out.outputs)
    assert engine.abort("r") is None
    assert_blocks_ok(engine)
    run(engine)
    bm = engine.scheduler.block_manager
    assert bm.num_used_blocks == 0 and bm.num_free_blocks + bm.num_cached_free == 8


def test_preemption_keeps_the_oldest_running_and_outputs_exact(make_fake_engine):
    engine = make_fake_engine(num_blocks=9, max_num_batched_tokens=16)
    prompts = ["abcdabcdab", "hello world", "qwertyuiop", "zz"]
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=12))
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
        assert_blocks_ok(engine)
    assert engine.get_stats().num_preemptions > 0
    assert order[0] == "0"


def test_priority_runs_first(make_fake_engine):
    engine = make_fake_engine(max_num_seqs=1)
    engine.add_request("late", "aa", SamplingParams(temperature=0, max_tokens=2), priority=1)
    engine.add_request("urgent", "bb", SamplingParams(temperature=0, max_tokens=2), priority=-1)
    engine.add_request("normal", "cc", SamplingParams(temperature=0, max_tokens=2))
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["urgent", "normal", "late"]


def test_prefix_cache_hits_are_counted_and_change_nothing(make_fake_engine):
    engine = make_fake_engine(block_size=4)
    prompt = "abcd" * 6  # 12 tokens (ab, cd pairs): 3 full blocks
    engine.add_request("a", prompt, GREEDY)
    first = run(engine)[0]["a"].outputs[0].token_ids
    engine.add_request("b", prompt, GREEDY)
    assert run(engine)[0]["b"].outputs[0].token_ids == first
    stats = engine.get_stats()
    assert stats.prefix_cache_hit_tokens == 8
    assert stats.prefix_cache_queried_tokens == 24


def test_logprobs_metrics_and_stats(make_fake_engine):
    engine = make_fake_engine()
    engine.add_request("r", "hello", SamplingParams(temperature=0, max_tokens=4, logprobs=3))
    engine.add_request("plain", "hello", SamplingParams(temperature=0, max_tokens=2))
    stats = engine.get_stats()
    assert (stats.num_running, stats.num_waiting) == (0, 2)
    engine.step()
    stats = engine.get_stats()
    assert (stats.num_running, stats.num_waiting) == (2, 0) and stats.kv_cache_usage > 0
    final, _ = run(engine)
    out = final["r"].outputs[0]
    assert len(out.logprobs) == 4
    for token, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert token in entry and 3 <= len(entry) <= 4
        assert sorted(lp.rank for lp in entry.values())[:3] == [1, 2, 3]
        assert entry[token].decoded_token == TOK.decode([token], skip_special_tokens=False)
    assert out.cumulative_logprob == pytest.approx(
        sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs, strict=True))
    )
    assert final["plain"].outputs[0].logprobs is None
    m = final["r"].metrics
    assert m.arrival_time <= m.first_token_time <= m.finished_time
    stats = engine.get_stats()
    assert stats.generation_tokens == 6 and stats.prompt_tokens == 2 * len(TOK.encode("hello"))
    assert stats.kv_cache_usage == 0.0 and stats.num_running == 0


def test_from_model_rejects_unknown_options():
    with pytest.raises(TypeError, match="unknown engine options"):
        LLMEngine.from_model("x", block_sise=8)


# ---- acceptance: the real tiny model ----------------------------------------------------------
@pytest.fixture
def tiny_engine_factory(tiny_llama):
    """make(**EngineConfig fields) -> LLMEngine on the real tiny Llama; blocks checked after."""
    engines = []

    def make(model=tiny_llama, **kwargs):
        kwargs.setdefault("num_kv_blocks", 64)
        kwargs.setdefault("block_size", 8)
        engines.append(LLMEngine(EngineConfig(model=str(model), **kwargs)))
        return engines[-1]

    yield make
    for engine in engines:
        assert_blocks_ok(engine)


REAL_PROMPTS = ["Hello there, how are you", "The quick brown fox jumps", "Once upon", "a b c d e f"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_real_model_greedy_is_the_same_however_it_is_scheduled(
    tiny_engine_factory, tiny_model_dirs, arch
):
    model = tiny_model_dirs[arch]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    reference = {}
    for i, prompt in enumerate(REAL_PROMPTS):
        engine = tiny_engine_factory(model)
        engine.add_request(str(i), prompt, params)
        reference[str(i)] = run(engine)[0][str(i)].outputs[0].token_ids
    engine = tiny_engine_factory(model, num_kv_blocks=9, max_num_batched_tokens=7)
    for i, prompt in enumerate(REAL_PROMPTS):
        engine.add_request(str(i), prompt, params)
    final, streamed = run(engine)
    assert {k: v.outputs[0].token_ids for k, v in final.items()} == reference
    assert engine.get_stats().num_preemptions > 0
    for k, v in final.items():
        assert (
            streamed[(k, 0)] == v.outputs[0].text == engine.tokenizer.decode(v.outputs[0].token_ids)
        )


def test_real_model_copy_on_write_and_prefix_cache(tiny_engine_factory):
    engine = tiny_engine_factory(block_size=5)
    prompt = "Hello there, how are you"
    ids = engine.tokenizer.encode(prompt)
    assert len(ids) % 5 != 0  # the prompt's last block is partial: the samples copy it
    engine.add_request("one", prompt, SamplingParams(temperature=0, max_tokens=10))
    expected = run(engine)[0]["one"].outputs[0].token_ids
    engine.add_request("n", prompt, SamplingParams(n=3, temperature=0, max_tokens=10))
    final, _ = run(engine)
    assert [o.token_ids for o in final["n"].outputs] == [expected] * 3
    stats = engine.get_stats()
    assert stats.prefix_cache_hit_tokens == (len(ids) - 1) // 5 * 5 > 0


def test_real_model_seeded_sampling_and_abort(tiny_engine_factory):
    params = SamplingParams(temperature=0.9, top_k=50, seed=3, max_tokens=10)
    engine = tiny_engine_factory()
    engine.add_request("x", "Once upon a time", params)
    expected = run(engine)[0]["x"].outputs[0].token_ids
    engine = tiny_engine_factory(max_num_batched_tokens=5)
    engine.add_request("y", "The quick brown fox", SamplingParams(temperature=1.0, max_tokens=10))
    engine.add_request("x", "Once upon a time", params)
    engine.add_request("z", "a b c", SamplingParams(max_tokens=30))
    for _ in range(4):
        engine.step()
    engine.abort("z")
    final, _ = run(engine)
    assert final["x"].outputs[0].token_ids == expected
    assert "z" not in final


def test_real_model_logits_rows_follow_chunk_order(tiny_engine_factory):
    engine = tiny_engine_factory()
    engine.add_request("a", "Hello", SamplingParams(temperature=0, max_tokens=3, logprobs=1))
    final, _ = run(engine)
    lp = final["a"].outputs[0].logprobs
    assert all(torch.isfinite(torch.tensor([e.logprob for e in d.values()])).all() for d in lp)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    requests=st.lists(
        st.tuples(
            st.lists(st.integers(1, 40), min_size=1, max_size=14),  # prompt ids
            st.integers(1, 3),  # n
            st.integers(1, 10),  # max_tokens
            st.integers(-1, 1),  # priority
            st.one_of(st.none(), st.integers(0, 12)),  # abort after this many steps
        ),
        min_size=1,
        max_size=6,
    ),
    num_blocks=st.integers(8, 20),
    budget=st.integers(3, 20),
    shared_prefix=st.booleans(),
)
def test_random_workloads_end_to_end(make_fake_engine, requests, num_blocks, budget, shared_prefix):
    """Whatever the mix (n samples, priorities, aborts, preemption, prefix hits), greedy
    outputs equal the unbatched reference and the block accounting stays exact."""
    engine = make_fake_engine(
        num_blocks=num_blocks, block_size=2, max_num_batched_tokens=budget, max_num_seqs=4
    )
    aborts = {}
    for i, (ids, n, max_tokens, priority, abort_at) in enumerate(requests):
        prompt = [5, 6, 7, 8, *ids] if shared_prefix else ids
        prompt = prompt[: num_blocks * 2 - 11]
        engine.add_request(
            str(i),
            prompt,
            SamplingParams(n=n, temperature=0, max_tokens=max_tokens),
            priority=priority,
        )
        if abort_at is not None:
            aborts[str(i)] = abort_at
    final, step = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        step += 1
        for request_id, at in aborts.items():
            if at == step and request_id in engine.requests:
                final[request_id] = engine.abort(request_id)
        assert_blocks_ok(engine)
        assert step < 500
    for i, (_, n, max_tokens, _, _) in enumerate(requests):
        out = final[str(i)]
        for c in out.outputs:
            if c.finish_reason == "abort":
                continue
            expected = greedy_reference(engine.model_runner, out.prompt_token_ids, max_tokens)
            assert c.token_ids == expected
        if all(c.finish_reason != "abort" for c in out.outputs):
            assert len(out.outputs) == n
