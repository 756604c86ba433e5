"""Tool calls in model output: MiniMax-M3's format, found in the text and turned into OpenAI's
`tool_calls`, whole or delta by delta.

M3 writes a call as namespaced XML, every tag behind the `]<]minimax[>[` prefix:

    ]<]minimax[>[<tool_call>
    ]<]minimax[>[<invoke name="get_weather">]<]minimax[>[<city>Paris]<]minimax[>[</city>...
    ]<]minimax[>[</invoke>
    ]<]minimax[>[</tool_call>

Argument values are raw text for strings and JSON for other scalars; objects nest elements and
arrays repeat `<item>`. The tool's JSON schema says which is which (xgrammar's `minimax_m3`
structural tag, used for forced calls, writes the same form).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

NAMESPACE = "]<]minimax[>["
CALL_START = NAMESPACE + "<tool_call>"
CALL_END = NAMESPACE + "</tool_call>"
_INVOKE = re.compile(re.escape(NAMESPACE) + r'<invoke name="([^"]*)">(.*?)'
                     + re.escape(NAMESPACE) + r"</invoke>", re.S)
_OPEN_TAG = re.compile(re.escape(NAMESPACE) + r"<([^<>/\s]+)>")

MINIMAX_M3 = "minimax_m3"


def tool_call_format(chat_template: str | None) -> str | None:
    """The tool-call format a chat template writes, or None when it has no tool support that
    msa-serve can parse back."""
    if chat_template and "tools" in chat_template and NAMESPACE in chat_template:
        return MINIMAX_M3
    return None


class ToolCallError(ValueError):
    """The model's tool call does not parse (kept as text rather than guessed at)."""


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = ""

    def __post_init__(self):
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def body(self, index: int | None = None) -> dict[str, Any]:
        """OpenAI's shape; with index, as a streamed delta."""
        body = {"id": self.id, "type": "function",
                "function": {"name": self.name,
                             "arguments": json.dumps(self.arguments, ensure_ascii=False)}}
        return body if index is None else {"index": index, **body}


def _elements(text: str) -> list[tuple[str, str]]:
    """Top-level (name, inner text) elements of namespaced XML, in order."""
    found, at = [], 0
    while (match := _OPEN_TAG.search(text, at)) is not None:
        name = match.group(1)
        opening, closing = NAMESPACE + f"<{name}>", NAMESPACE + f"</{name}>"
        depth, scan = 1, match.end()
        while depth:
            next_close = text.find(closing, scan)
            if next_close < 0:
                raise ToolCallError(f"the element <{name}> is never closed")
            next_open = text.find(opening, scan, next_close)
            if next_open >= 0:
                depth, scan = depth + 1, next_open + len(opening)
            else:
                depth, scan = depth - 1, next_close + len(closing)
        found.append((name, text[match.end(): scan - len(closing)]))
        at = scan
    return found


def _value(text: str, schema: dict[str, Any] | None) -> Any:
    """One argument value, read as its schema types it (inferred when there is no schema)."""
    schema = schema or {}
    kind = schema.get("type")
    if kind == "string" or ("enum" in schema and all(isinstance(v, str) for v in schema["enum"])):
        return text
    if kind == "object" or (kind is None and NAMESPACE in text and not text.lstrip().startswith(
            NAMESPACE + "<item>")):
        properties = schema.get("properties", {})
        return {name: _value(inner, properties.get(name)) for name, inner in _elements(text)}
    if kind == "array" or (kind is None and NAMESPACE + "<item>" in text):
        return [_value(inner, schema.get("items")) for name, inner in _elements(text)
                if name == "item"]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if kind in ("integer", "number", "boolean", "null"):
            raise ToolCallError(f"{text!r} is not a {kind}") from None
        return text


def parse_tool_calls(block: str, schemas: dict[str, dict[str, Any]]) -> list[ToolCall]:
    """The calls in one `<tool_call>` block; schemas: each tool's parameters by name."""
    calls = [ToolCall(name, _value(inner, schemas.get(name, {"type": "object"})))
             for name, inner in _INVOKE.findall(block)]
    if not calls:
        raise ToolCallError("a tool-call block without a call")
    return calls


def partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of text that begins the marker (held back while
    streaming, in case the marker completes in the next delta)."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


class ToolCallExtractor:
    """Splits one choice's answer text into content and tool calls, fed whole or delta by
    delta. Content streams as it comes; a tool-call block is held until it closes, then
    comes out as calls. A block that never closes or does not parse stays content."""

    def __init__(self, schemas: dict[str, dict[str, Any]]):
        self.schemas = schemas
        self.calls: list[ToolCall] = []
        self._pending = ""  # held text: a possible block start, or an open block

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        """(content, new calls) this delta completes."""
        text = self._pending + delta
        self._pending = ""
        content, calls = [], []
        while text:
            start = text.find(CALL_START)
            if start < 0:
                keep = partial_suffix(text, CALL_START)
                content.append(text[:len(text) - keep])
                self._pending = text[len(text) - keep:]
                break
            content.append(text[:start])
            end = text.find(CALL_END, start)
            if end < 0:
                self._pending = text[start:]
                break
            block, text = text[start:end + len(CALL_END)], text[end + len(CALL_END):]
            try:
                calls += parse_tool_calls(block, self.schemas)
            except ToolCallError:
                content.append(block)
        self.calls += calls
        return "".join(content), calls

    def finish(self) -> str:
        """Text still held when the output ends (an unclosed block) is content."""
        held, self._pending = self._pending, ""
        return held
