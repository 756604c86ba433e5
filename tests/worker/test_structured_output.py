"""Structured output: constrained decoding through xgrammar on the tiny model (random weights,
so only the constraint makes its output well-formed)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from worker.engine.grammar import _strict_json_strings
from worker.errors import InvalidRequestError
from worker.wire import GuidedDecoding, SamplingParams

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
    },
    "required": ["name", "age", "member", "color", "tags"],
    "additionalProperties": False,
}


def constrained(guided: GuidedDecoding, seed: int, **extra) -> SamplingParams:
    return SamplingParams(**{"temperature": 1.0, "seed": seed, "max_tokens": 120,
                             "guided": guided, **extra})


def test_json_schema_output_always_parses_and_validates(make_tiny_engine):
    engine = make_tiny_engine()
    guided = GuidedDecoding("json_schema", json.dumps(PERSON))
    outputs = engine.generate([[5, 6, 7]] * 20, [constrained(guided, seed) for seed in range(20)],
                              use_tqdm=False)
    for out in outputs:
        assert out.finish_reason.value == "stop", out.text
        jsonschema.validate(json.loads(out.text), PERSON)
    assert len({out.text for out in outputs}) > 10, "seeded samples differ"


def test_regex_grammar_and_json_object(make_tiny_engine):
    engine = make_tiny_engine()
    yes_no = GuidedDecoding("regex", r"(yes|no) [0-9]{3}")
    regex = engine.generate([[9, 9]] * 4, [constrained(yes_no, seed) for seed in range(4)],
                            use_tqdm=False)
    assert all(re.fullmatch(r"(yes|no) [0-9]{3}", out.text) for out in regex)
    grammar = 'root ::= "(" digit ("+" digit)* ")"\ndigit ::= [0-9]'
    for out in engine.generate([[3]] * 4, [constrained(GuidedDecoding("grammar", grammar), seed)
                                           for seed in range(4)], use_tqdm=False):
        assert re.fullmatch(r"\(\d(\+\d)*\)", out.text) or out.finish_reason.value == "length"
    objects = engine.generate([[4]] * 4, [constrained(GuidedDecoding("json"), seed,
                                                      max_tokens=400) for seed in range(4)],
                              use_tqdm=False)
    finished = [out for out in objects if out.finish_reason.value == "stop"]
    assert finished and all(isinstance(json.loads(out.text), dict) for out in finished)


def test_constrained_rows_leave_the_rest_of_the_batch_alone(make_tiny_engine):
    """One constrained request batched with free ones: the free ones generate what they
    generate alone, and parallel samples (n=3) each keep their own grammar state."""
    engine = make_tiny_engine()
    free = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    alone = engine.generate([[11, 12, 13]], free, use_tqdm=False)[0]
    guided = GuidedDecoding("json_schema", json.dumps(PERSON))
    mixed = engine.generate([[11, 12, 13], [5, 6, 7]], [free, constrained(guided, 1, n=3)],
                            use_tqdm=False)
    assert mixed[0].new_token_ids == alone.new_token_ids
    for out in mixed[1:]:
        jsonschema.validate(json.loads(out.text), PERSON)


def test_bad_constraints_are_refused_before_the_engine(make_tiny_engine):
    engine = make_tiny_engine()
    for guided in (GuidedDecoding("json_schema", "{not json"),
                   GuidedDecoding("json_schema", '{"type": "object", "minProperties": "x"}'),
                   GuidedDecoding("regex", "(unclosed"),
                   GuidedDecoding("grammar", "root ::= missing_rule")):
        with pytest.raises(InvalidRequestError, match="constraint"):
            engine.add_request([1, 2], constrained(guided, 0))
    with pytest.raises(InvalidRequestError, match="needs its specification"):
        GuidedDecoding("regex")
    assert not engine.has_unfinished_requests


def test_bounded_strings_become_patterns_of_safe_characters():
    schema = _strict_json_strings({"type": "object", "properties": {
        "a": {"type": "string", "minLength": 2, "maxLength": 4},
        "b": {"type": "string", "pattern": "^x+$", "maxLength": 3},
        "c": {"type": "string"}}})
    pattern = schema["properties"]["a"]["pattern"]
    assert "minLength" not in schema["properties"]["a"]
    assert re.fullmatch(pattern, "abc") and re.fullmatch(pattern, "ü€x")
    assert not any(re.fullmatch(pattern, text) for text in ("a", "abcde", 'a"b', "a\x14", "a\\b"))
    assert schema["properties"]["b"] == {"type": "string", "pattern": "^x+$", "maxLength": 3}
    assert schema["properties"]["c"] == {"type": "string"}
