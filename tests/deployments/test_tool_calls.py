"""MiniMax-M3 tool calls read back from model text, whole and split at every position."""

from __future__ import annotations

import pytest

from deployments.tool_calls import (
    CALL_END,
    CALL_START,
    NAMESPACE,
    ToolCallExtractor,
    parse_tool_calls,
)

N = NAMESPACE
SCHEMAS = {"get_weather": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
    "zip": {"type": "string"},
    "where": {"type": "object", "properties": {"lat": {"type": "number"}}},
    "tags": {"type": "array", "items": {"type": "string"}}}}}
CALL = (f'{CALL_START}\n{N}<invoke name="get_weather">{N}<city>Paris{N}</city>{N}<days>3{N}</days>'
        f'{N}<metric>true{N}</metric>{N}<zip>07001{N}</zip>{N}<where>{N}<lat>48.8{N}</lat>{N}</where>'
        f'{N}<tags>{N}<item>a{N}</item>{N}<item>b{N}</item>{N}</tags>{N}</invoke>\n'
        f'{N}<invoke name="other">{N}<q>7{N}</q>{N}</invoke>\n{CALL_END}')
ARGUMENTS = {"city": "Paris", "days": 3, "metric": True, "zip": "07001",
             "where": {"lat": 48.8}, "tags": ["a", "b"]}


def test_arguments_are_typed_by_the_schema():
    first, second = parse_tool_calls(CALL, SCHEMAS)
    assert (first.name, first.arguments) == ("get_weather", ARGUMENTS)
    assert (second.name, second.arguments) == ("other", {"q": 7})  # no schema: inferred
    assert first.id != second.id and first.id.startswith("call_")
    body = first.body(index=0)
    assert body["index"] == 0 and body["function"]["name"] == "get_weather"


@pytest.mark.parametrize("split", range(0, len(CALL) + 12, 23))
def test_streamed_deltas_give_the_same_content_and_calls(split):
    text = "Let me check." + CALL + " Done."
    extractor = ToolCallExtractor(SCHEMAS)
    content, calls = [], []
    for piece in (text[:split], text[split:]):
        got, new = extractor.feed(piece)
        content.append(got)
        calls += new
    content.append(extractor.finish())
    assert "".join(content) == "Let me check. Done."
    assert [c.arguments for c in calls] == [ARGUMENTS, {"q": 7}]


def test_text_that_is_not_a_call_stays_content():
    extractor = ToolCallExtractor(SCHEMAS)
    broken = f'{CALL_START}{N}<invoke name="get_weather">{N}<days>many{N}</days>{N}</invoke>{CALL_END}'
    content, calls = extractor.feed("a ]<] b " + broken)
    assert calls == [] and content == "a ]<] b " + broken
    unclosed = ToolCallExtractor(SCHEMAS)
    content, calls = unclosed.feed("x" + CALL_START + "never closed")
    assert (content, calls) == ("x", [])
    assert unclosed.finish() == CALL_START + "never closed"
