import pytest

from deepflow.engine import LLM, SamplingParams

from .conftest import assert_blocks_ok


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), num_kv_blocks=48, block_size=8, max_num_batched_tokens=32)


@pytest.fixture(autouse=True)
def _no_leaks(llm):
    yield
    assert_blocks_ok(llm.engine)


GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def test_generate_keeps_prompt_order_and_accepts_text_or_token_ids(llm):
    prompts = ["Hello there", "The quick brown fox", "a b c"]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.prompt for o in outs] == prompts
    assert all(o.finished and len(o.outputs[0].token_ids) == 8 for o in outs)
    ids = [o.prompt_token_ids for o in outs]
    again = llm.generate(ids, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outs]
    assert again[0].prompt is None
    single = llm.generate(prompts[1], GREEDY, use_tqdm=False)
    assert len(single) == 1 and single[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    one_ids = llm.generate(ids[2], GREEDY, use_tqdm=False)
    assert one_ids[0].outputs[0].token_ids == outs[2].outputs[0].token_ids
    as_dicts = llm.generate([{"prompt": prompts[0]}, {"prompt_token_ids": ids[0]}], GREEDY,
                            use_tqdm=False)
    assert as_dicts[0].outputs[0].token_ids == as_dicts[1].outputs[0].token_ids


def test_a_list_of_sampling_params_applies_one_each(llm):
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (1, 3, 5)]
    outs = llm.generate(["a", "b", "c"], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [1, 3, 5]
    n_outs = llm.generate("Hello", SamplingParams(n=3, max_tokens=4, seed=2), use_tqdm=False)
    assert [c.index for c in n_outs[0].outputs] == [0, 1, 2]


def test_progress_bar(llm, capsys):
    llm.generate(["Hello", "World"], GREEDY, use_tqdm=True)
    assert "Processed prompts" in capsys.readouterr().err
    llm.generate(["Hello"], GREEDY, use_tqdm=False)
    assert "Processed prompts" not in capsys.readouterr().err


def test_one_bad_prompt_rejects_the_batch_before_anything_runs(llm):
    too_long = "word " * 2000
    with pytest.raises(ValueError, match="context"):
        llm.generate(["fine", too_long], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="match the prompts"):
        llm.generate(["a", "b"], [GREEDY], use_tqdm=False)
    with pytest.raises(ValueError, match="text or a list"):
        llm.generate([3.5], GREEDY, use_tqdm=False)


def test_priorities_and_seeded_batches(llm):
    """Lower priority values are served first: each prompt is longer than a step's budget
    (32 tokens), so the prompts' first tokens come one step apart, in priority order,
    whichever order they arrived in. A seeded sample is the same in a batch as alone."""
    for run, priority in enumerate(([1, 0, -1], [-1, 0, 1])):
        prompts = [f"run {run} prompt {k}: " + " ".join(f"w{run}{k}{i}" for i in range(12))
                   for k in range(3)]  # distinct: no prefix cache hit shortens a prefill
        outs = llm.generate(prompts, GREEDY, use_tqdm=False, priority=priority)
        assert all(len(o.prompt_token_ids) > 32 for o in outs)
        first_tokens = [o.metrics.first_token_time for o in outs]
        assert len(set(first_tokens)) == 3
        assert sorted(range(3), key=first_tokens.__getitem__) == sorted(
            range(3), key=priority.__getitem__)
    seeded = SamplingParams(temperature=1.0, seed=11, max_tokens=6)
    alone = llm.generate(["Once upon"], seeded, use_tqdm=False)[0].outputs[0].token_ids
    batch = llm.generate(["x y z", "Once upon", "Hello"], [GREEDY, seeded, GREEDY],
                         use_tqdm=False, priority=[1, 0, -1])
    assert batch[1].outputs[0].token_ids == alone


def test_interrupted_generate_leaves_nothing_behind(llm, monkeypatch):
    calls = 0
    step = llm.engine.step

    def flaky_step():
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        return step()

    monkeypatch.setattr(llm.engine, "step", flaky_step)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["Hello", "World"], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
