from hypothesis import given, settings
from hypothesis import strategies as st

from deepflow.engine.detokenizer import IncrementalDetokenizer
from deepflow.engine.sampling_params import SamplingParams

from .conftest import FakeTokenizer

TOK = FakeTokenizer()


def detok(prompt="x", **params):
    return IncrementalDetokenizer(TOK, TOK.encode(prompt), SamplingParams(**params))


def feed(d, tokens):
    return [d.add_token(t) for t in tokens]


def test_a_character_split_over_tokens_is_held_back_until_complete():
    d = detok()
    euro_head, euro_tail = TOK.token(b"\xe2\x82"), TOK.token(b"\xac")
    assert feed(d, [euro_head]) == [""]
    assert feed(d, [euro_tail]) == ["€"]
    e_acute = list("é".encode())
    assert feed(d, e_acute) == ["", "é"]
    assert d.text == "€é"


@settings(max_examples=50, deadline=None)
@given(text=st.text(min_size=1, max_size=30), prompt=st.text(max_size=8))
def test_deltas_add_up_to_the_decoded_text(text, prompt):
    # One token per byte: every multi-byte character is split across tokens.
    d = detok(prompt or "p")
    deltas = feed(d, list(text.encode()))
    assert "".join(deltas) == text == d.text


def test_flush_turns_an_unfinished_character_into_a_replacement_char():
    d = detok()
    feed(d, [ord("a"), 0xE2, 0x82])
    assert d.text == "a"
    d.flush()
    assert d.text == "a\ufffd"


def test_stop_string_found_across_token_boundaries_and_cut_before_it():
    d = detok(stop=["bc"])
    for token in (TOK.token("ab"), TOK.token("cd")):
        new = d.add_token(token)
        stop = d.find_stop(len(new))
    assert stop == "bc" and d.text == "a"


def test_include_stop_str_in_output_keeps_it():
    d = detok(stop=["bc"], include_stop_str_in_output=True)
    for token in (TOK.token("ab"), TOK.token("cd")):
        stop = d.find_stop(len(d.add_token(token)))
    assert stop == "bc" and d.text == "abc"


def test_earliest_stop_string_wins():
    d = detok(stop=["world", "lo w"])
    stop = d.find_stop(len(d.add_token(TOK.token("hello")) + d.add_token(TOK.token(" world"))))
    assert stop == "lo w" and d.text == "hel"


def test_streaming_holds_back_what_may_begin_a_stop_string():
    d = detok(stop=["xyz"])
    streamed = []
    for ch in "abxy":
        d.find_stop(len(d.add_token(ord(ch))))
        streamed.append(d.take_delta(finished=False))
    # The last len("xyz") - 1 characters might still begin "xyz": held back.
    assert streamed == ["", "", "a", "b"]
    d.find_stop(len(d.add_token(ord("q"))))
    assert d.take_delta(finished=False) == "x"
    assert d.take_delta(finished=True) == "yq"
    d2 = detok(stop=["xyz"])
    for ch in "abxyz":
        stop = d2.find_stop(len(d2.add_token(ord(ch))))
        d2.take_delta(finished=stop is not None)
    assert stop == "xyz" and d2.emitted_text == "ab"


def test_special_tokens_skipped_or_kept():
    assert feed(detok(), [256]) == [""]
    assert feed(detok(skip_special_tokens=False), [256]) == ["<eos>"]


@settings(max_examples=50, deadline=None)
@given(text=st.text(min_size=1, max_size=30), prompt=st.text(max_size=8))
def test_deferred_tokens_decode_to_the_same_text(text, prompt):
    one_by_one, deferred = detok(prompt or "p"), detok(prompt or "p")
    tokens = [*text.encode(), 0xE2]  # ends inside a character: flush must show it
    feed(one_by_one, tokens)
    one_by_one.flush()
    for token in tokens:
        deferred.defer(token)
    assert deferred.text == ""
    deferred.flush()
    assert deferred.text == one_by_one.text == text + "\ufffd"
