"""SamplingParams validation (errors name the field, for a 400) and stop-string search."""

import dataclasses

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from tandem.serve.sampling_params import SamplingParams, find_stop, find_stop_span


def test_defaults_are_valid_and_sampled():
    p = SamplingParams()
    assert (p.n, p.max_tokens, p.temperature, p.top_k, p.top_p) == (1, 16, 1.0, 0, 1.0)
    assert not p.is_greedy and not p.uses_penalties
    assert p.stop == () and p.max_stop_len == 0


def test_temperature_zero_is_greedy():
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=0.0).is_greedy
    assert not SamplingParams(temperature=0.01).is_greedy


def test_stop_is_normalised_to_a_tuple():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop_token_ids=[2, 7]).stop_token_ids == (2, 7)
    assert SamplingParams(stop=["a", "bcd"]).max_stop_len == 3


def test_params_are_frozen_and_hashable():
    p = SamplingParams(stop=["x"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5
    assert hash(p) == hash(SamplingParams(stop=("x",)))


def test_uses_penalties():
    assert SamplingParams(repetition_penalty=1.1).uses_penalties
    assert SamplingParams(presence_penalty=-0.5).uses_penalties
    assert SamplingParams(frequency_penalty=0.1).uses_penalties


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 0),
        ("max_tokens", 0),
        ("max_tokens", None),
        ("max_tokens", 2.5),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_k", -2),
        ("top_k", 1.5),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.01),
        ("seed", 1.5),
        ("stop", [""]),
        ("stop", [3]),
        ("stop_token_ids", [-1]),
        ("logprobs", -1),
        ("logprobs", 21),
        ("prompt_logprobs", -1),
        ("prompt_logprobs", 21),
    ],
)
def test_invalid_value_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize(
    "field, value",
    [
        ("top_k", -1),
        ("top_k", 1),
        ("top_p", 1.0),
        ("min_p", 1.0),
        ("presence_penalty", -2.0),
        ("frequency_penalty", 2.0),
        ("seed", -5),
        ("logprobs", 0),
        ("logprobs", 20),
        ("prompt_logprobs", 0),
    ],
)
def test_boundary_values_are_accepted(field, value):
    SamplingParams(**{field: value})


def test_find_stop_returns_where_the_earliest_stop_begins():
    text = "abc STOP xyz END"
    assert find_stop(text, ("END", "STOP"), 0) == 4
    assert find_stop(text, ("END",), 0) == 13
    assert find_stop(text, ("nope",), 0) is None
    assert find_stop(text, (), 0) is None


def test_find_stop_span_ends_after_the_stop_string():
    # include_stop_str_in_output keeps text[:end]; otherwise text[:begin]
    assert find_stop_span("say hi###bye", ("###",), 0) == (6, 9)
    # two stops begin at 1: the shorter one ends first
    assert find_stop_span("xabcd", ("abc", "ab"), 0) == (1, 3)


def test_find_stop_across_chunks():
    # "ST" arrives in one chunk and "OP" in the next; the second search starts 3
    # characters before the new text ("STOP" is 4 long), so the split stop is found.
    text = "Hello ST"
    assert find_stop(text, ("STOP",), 0) is None
    start = len(text)
    text += "OP now"
    assert find_stop(text, ("STOP",), start) == 6


def test_find_stop_ignores_matches_that_ended_before_the_new_text():
    # The engine would have stopped at the first "##" already; only new matches count.
    assert find_stop("a##bcd", ("##",), 4) is None
    assert find_stop("a##bcd##", ("##",), 6) == 6


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="ab", max_size=30),
    stop=st.text(alphabet="ab", min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 30), max_size=8),
)
def test_streamed_search_finds_what_a_whole_text_search_finds(text, stop, cuts):
    # Feeding text in arbitrary chunks finds the first occurrence at the same index.
    found, start = None, 0
    for end in sorted(set(cuts) | {len(text)}):
        end = min(end, len(text))
        found = find_stop(text[:end], (stop,), start)
        if found is not None:
            break
        start = end
    expected = text.find(stop)
    assert found == (None if expected < 0 else expected)
