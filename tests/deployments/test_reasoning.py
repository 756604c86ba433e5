"""Reasoning split from the answer at the model's markers, whole and delta by delta."""

from __future__ import annotations

import random

import pytest

from deployments.openai_api import ReasoningSplitter

MARKERS = ("<mm:think>", "</mm:think>")


def split_whole(text: str, opens: bool) -> tuple[str, str]:
    splitter = ReasoningSplitter(MARKERS, opens)
    reasoning, content = splitter.feed(text)
    held_reasoning, held_content = splitter.finish()
    return reasoning + held_reasoning, content + held_content


def split_streamed(text: str, opens: bool, seed: int) -> tuple[str, str]:
    """The same text cut into random deltas (markers split across them)."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, 12))) if len(text) > 1 \
        else []
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    splitter = ReasoningSplitter(MARKERS, opens)
    reasoning, content = [], []
    for piece in pieces:
        r, c = splitter.feed(piece)
        reasoning.append(r)
        content.append(c)
    r, c = splitter.finish()
    return "".join(reasoning) + r, "".join(content) + c


CASES = [
    # (output, prompt left reasoning open, reasoning, content)
    ("<mm:think>add 2 and 2</mm:think>\n\nIt is 4.", False, "add 2 and 2", "It is 4."),
    ("add 2 and 2</mm:think>It is 4.", True, "add 2 and 2", "It is 4."),
    ("still thinking when max_tokens hit", True, "still thinking when max_tokens hit", ""),
    ("<mm:think>cut off mid-marker </mm:th", False, "cut off mid-marker </mm:th", ""),
    ("A plain answer, no reasoning.", False, "", "A plain answer, no reasoning."),
    ("The tag <mm:think> later is just text", False, "",
     "The tag <mm:think> later is just text"),
    ("<mm:th", False, "", "<mm:th"),  # a start marker that never completed
    ("", True, "", ""),
]


@pytest.mark.parametrize("output,opens,reasoning,content", CASES)
def test_split_whole_and_streamed_agree(output, opens, reasoning, content):
    assert split_whole(output, opens) == (reasoning, content)
    for seed in range(5):
        assert split_streamed(output, opens, seed) == (reasoning, content), seed


def test_no_delta_shows_part_of_a_marker():
    splitter = ReasoningSplitter(MARKERS, opens_reasoning=True)
    seen = []
    for piece in ["step one ", "</mm", ":thi", "nk>", "answer"]:
        seen.append(splitter.feed(piece))
    assert seen == [("step one ", ""), ("", ""), ("", ""), ("", ""), ("", "answer")]
