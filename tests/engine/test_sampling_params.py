from dataclasses import fields

import pytest

from deepflow.engine import SamplingParams


def test_defaults_are_vllms():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.max_tokens) == (1, 1.0, 1.0, 0, 16)
    assert p.stop_strings == () and p.stop_token_ids == []
    assert SamplingParams(temperature=0).greedy


def test_stop_is_normalised():
    assert SamplingParams(stop="x").stop_strings == ("x",)
    assert SamplingParams(stop=["a", "bc"]).stop_strings == ("a", "bc")
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"n": 0}, "n must"),
        ({"n": 2.0}, "n must"),
        ({"min_p": 1.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"seed": "7"}, "seed"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"logprobs": -1}, "logprobs"),
        ({"prompt_logprobs": 1}, "prompt_logprobs"),
        ({"stop": 3}, "stop must"),
        ({"stop": ["ok", 3]}, "stop must"),
        ({"stop": [""]}, "empty"),
        ({"stop_token_ids": "3"}, "stop_token_ids"),
        ({"stop_token_ids": [1, "2"]}, "stop_token_ids"),
        ({"stop_token_ids": [True]}, "stop_token_ids"),
    ],
)
def test_invalid_values_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_off_switches_are_valid():
    """Each value that turns a feature off (top_k -1 or 0, no max_tokens) or to its edge
    (greedy, the chosen token's logprob only, seed 0) is accepted and kept as given (seed 0
    is a seed, not None), and leaves every other field at its default."""
    default = SamplingParams()
    switches = {"top_k": [-1, 0], "max_tokens": [None], "temperature": [0], "logprobs": [0],
                "seed": [0]}
    for name, values in switches.items():
        for value in values:
            p = SamplingParams(**{name: value})
            assert (type(getattr(p, name)), getattr(p, name)) == (type(value), value), name
            others = [f.name for f in fields(p) if f.name != name]
            assert [getattr(p, f) for f in others] == [getattr(default, f) for f in others]
    together = SamplingParams(top_k=-1, max_tokens=None, temperature=0, logprobs=0, seed=0)
    assert together.greedy
    assert (together.top_k, together.max_tokens, together.logprobs, together.seed) == (
        -1, None, 0, 0)
