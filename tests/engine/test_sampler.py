import math

import pytest
import torch

from deepflow.engine.sampler import Sampler, _apply_penalties
from deepflow.engine.sampling_params import SamplingParams
from deepflow.engine.sequence import Sequence

EOS = 9
V = 10


def seq(params=None, prompt=(1, 2, 3), output=(), seq_id=0, index=0):
    s = Sequence(seq_id, f"r{seq_id}", list(prompt), params or SamplingParams(), index=index)
    for t in output:
        s.append_token(t)
    return s


def probs_logits(probs):
    return torch.tensor(probs).log().unsqueeze(0)


def support(logits, params, draws=400):
    """Tokens drawn from one row over many draws (one sequence, fresh seed per draw)."""
    sampler = Sampler(seed=0)
    seqs = [seq(params) for _ in range(draws)]
    return set(sampler(logits.expand(draws, -1), seqs, [EOS]).token_ids)


def test_greedy_takes_the_argmax_and_ignores_seeds():
    logits = torch.tensor([[0.1, 3.0, 2.9, -1, 0, 0, 0, 0, 0, 0]])
    for seed in (None, 1, 2):
        out = Sampler()(logits, [seq(SamplingParams(temperature=0, seed=seed))], [EOS])
        assert out.token_ids == [1]


def test_top_k_one_is_greedy_at_any_temperature():
    logits = torch.randn(1, V)
    assert support(logits, SamplingParams(temperature=5.0, top_k=1)) == {int(logits.argmax())}


def test_top_k_restricts_to_the_k_most_likely():
    logits = torch.arange(V, dtype=torch.float32).unsqueeze(0) * 0.1
    assert support(logits, SamplingParams(temperature=1.0, top_k=3)) == {7, 8, 9}


@pytest.mark.parametrize(("top_p", "expected"), [(0.45, {0}), (0.75, {0, 1}), (0.85, {0, 1, 2})])
def test_top_p_keeps_the_smallest_head_reaching_p(top_p, expected):
    logits = probs_logits([0.5, 0.3, 0.15, 0.05])
    assert support(logits, SamplingParams(top_p=top_p)) == expected


def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability():
    logits = probs_logits([0.5, 0.3, 0.15, 0.05])
    assert support(logits, SamplingParams(min_p=0.2)) == {0, 1, 2}


def test_temperature_shapes_the_distribution():
    logits = probs_logits([0.6, 0.3, 0.1])
    draws = 4000
    sampler = Sampler(seed=1)
    for temperature in (0.5, 1.0, 2.0):
        params = SamplingParams(temperature=temperature)
        seqs = [seq(params) for _ in range(draws)]
        tokens = sampler(logits.expand(draws, -1), seqs, []).token_ids
        expected = torch.softmax(logits[0] / temperature, -1)
        for t in range(3):
            assert abs(tokens.count(t) / draws - expected[t].item()) < 0.03


@pytest.mark.parametrize(
    ("params", "prompt", "expected"),
    [
        (SamplingParams(temperature=5e-324), (5,), {1}),  # 0 in float32
        (SamplingParams(temperature=1e-40), (5,), {1}),  # logits / t overflow float32
        (SamplingParams(repetition_penalty=5e-324), (1, 3), {1}),  # 0 in float32
        (SamplingParams(temperature=1e-30, repetition_penalty=1e-30), (1, 3), {1}),
        (SamplingParams(repetition_penalty=1e39), (0, 1, 2), {0, 1, 3, 4}),  # inf; 0 * inf
    ],
)
def test_extreme_temperatures_and_penalties_sample_their_limit(params, prompt, expected):
    """Values float32 rounds to 0 or inf drew from a NaN softmax, which raised in the engine
    loop and killed it (a fuzzed request to the daemon did)."""
    logits = torch.tensor([[0.0, 3.0, -1.0, 2.0, 1.0]])
    draws = 400
    seqs = [seq(params, prompt=prompt) for _ in range(draws)]
    assert set(Sampler(seed=0)(logits.expand(draws, -1), seqs, [EOS]).token_ids) == expected


def test_penalties_follow_vllm_semantics():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 3.0]])
    s = seq(
        SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
        prompt=[0, 1],
        output=[2, 2, 1],
    )
    _apply_penalties(logits, [s])
    # repetition over prompt+output (0, 1, 2); presence/frequency over the output (2 twice, 1 once)
    expected = [2.0 / 2, -2.0 * 2 - 0.5 - 0.25, 1.0 / 2 - 0.5 - 0.5, 0.5, 3.0]
    assert logits[0].tolist() == pytest.approx(expected)


def test_penalties_change_only_their_rows():
    logits = torch.ones(2, 5)
    plain, penalised = seq(), seq(SamplingParams(presence_penalty=1.0), output=[4])
    _apply_penalties(logits, [plain, penalised])
    assert logits[0].tolist() == [1.0] * 5 and logits[1].tolist() == [1, 1, 1, 1, 0]


def test_seeded_rows_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    rows = torch.randn(6, 4, V)  # 6 steps of 4 rows

    def run(batch_rows, with_neighbours):
        sampler = Sampler(seed=123)
        target = seq(SamplingParams(temperature=1.0, seed=42, top_p=0.9))
        others = [seq(SamplingParams(temperature=0.7, seed=s)) for s in (1, 2)] + [seq()]
        tokens = []
        for step in rows:
            seqs = [others[0], target, *others[1:]] if with_neighbours else [target]
            logits = step[: len(seqs)].clone()
            logits[1 if with_neighbours else 0] = step[1]
            out = sampler(logits, seqs, [EOS])
            tokens.append(out.token_ids[1 if with_neighbours else 0])
            for s, t in zip(seqs, out.token_ids, strict=True):
                s.append_token(t)
        return tokens

    alone = run(rows, False)
    assert run(rows, True) == alone
    other_seed = Sampler()
    target = seq(SamplingParams(seed=43))
    assert [other_seed(rows[i, 1:2], [target], []).token_ids[0] for i in range(6)] != alone


def test_min_tokens_masks_eos_and_stop_tokens():
    logits = torch.zeros(1, V)
    logits[0, EOS] = 10.0
    logits[0, 4] = 9.0
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[4])
    assert Sampler()(logits, [seq(params, output=[1])], [EOS]).token_ids != [EOS]
    assert Sampler()(logits, [seq(params, output=[1])], [EOS]).token_ids != [4]
    assert Sampler()(logits, [seq(params, output=[1, 1])], [EOS]).token_ids == [EOS]
    ignore = SamplingParams(temperature=0, min_tokens=2, ignore_eos=True)
    assert Sampler()(logits, [seq(ignore)], [EOS]).token_ids == [EOS]


def test_logprobs_are_raw_and_include_the_chosen_token_and_top_n():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0, 0, 0, 0, 0, 0]])
    raw = torch.log_softmax(logits[0], -1)
    params = SamplingParams(temperature=0, logprobs=2, repetition_penalty=2.0)
    s = seq(params, prompt=[1])  # the penalty turns greedy to token 2, logprobs stay raw
    out = Sampler()(logits, [s], [EOS])
    assert out.token_ids == [2]
    assert out.logprobs[0] == pytest.approx(raw[2].item())
    top = out.top_logprobs[0]
    assert set(top) == {1, 2}
    assert top[1].rank == 1 and top[2].rank == 2
    assert top[1].logprob == pytest.approx(raw[1].item())
    chosen_outside = SamplingParams(temperature=0, logprobs=1, repetition_penalty=2.0)
    top = Sampler()(logits, [seq(chosen_outside, prompt=[1])], [EOS]).top_logprobs[0]
    assert set(top) == {1, 2} and top[2].rank == 2
    assert Sampler()(logits, [seq()], [EOS]).top_logprobs == [None]
    zero = Sampler()(logits, [seq(SamplingParams(temperature=0, logprobs=0))], [EOS])
    assert set(zero.top_logprobs[0]) == {1}
    assert math.isclose(sum(math.exp(x) for x in raw.tolist()), 1.0, rel_tol=1e-5)
