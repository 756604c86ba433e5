"""The tiny MiniMax-M3 (released layout, written by make-tiny-model) served by the whole stack:
real Ray Serve, redis-server and the official `openai` SDK."""

from __future__ import annotations

import json

import numpy as np
import openai
import pytest
from PIL import Image

from tests.deployments.stack import openai_client, serving
from tests.preprocess.media_files import data_url, encode_image, encode_video
from worker.tiny_model import make_m3_checkpoint

SYSTEM = ("Answer briefly. " * 30).strip()  # over two pages of the byte-level tokenizer


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    model_dir = make_m3_checkpoint(tmp_path_factory.mktemp("tiny-m3-served"), seed=1)
    app = {
        "model": {"engine": {"model": str(model_dir), "device": "cpu", "dtype": "float32",
                             "kv_cache_memory": "8MiB", "max_num_batched_tokens": 256,
                             "served_model_name": "tiny-m3"},
                  "num_replicas": 1, "num_cpus": 0.5, "cpu_threads": 1},
        "preprocess": {"num_replicas": 1, "autoscaling": None, "num_cpus": 0.25,
                       "media": {"max_pixels": 56 * 84}},
        "ingress": {"num_cpus": 0.25},
    }
    with serving(app, num_cpus=3) as endpoints:
        yield openai_client(endpoints)


def _image_url() -> str:
    pixels = np.zeros((56, 84, 3), dtype=np.uint8)
    pixels[:, :42] = (200, 30, 30)
    return data_url(encode_image(Image.fromarray(pixels), "PNG"), "image/png")


def test_streamed_chat_and_prefix_cache_hit(client):
    """The template opens M3's reasoning, so the (random) model's whole output is reasoning:
    streamed as reasoning_content deltas, equal to the non-streamed message's (a prefix-cache
    hit, index keys restored with the pages)."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]
    reasoning, content, usage = [], [], None
    for chunk in client.chat.completions.create(
            model="tiny-m3", messages=messages, temperature=0, max_tokens=8, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
        if chunk.choices:
            reasoning.append(getattr(chunk.choices[0].delta, "reasoning_content", None) or "")
            content.append(chunk.choices[0].delta.content or "")
        usage = chunk.usage or usage
    assert usage.completion_tokens == 8 and usage.prompt_tokens > 256
    assert "".join(reasoning) and not "".join(content)
    again = client.chat.completions.create(model="tiny-m3", messages=messages, temperature=0,
                                           max_tokens=8, extra_body={"ignore_eos": True})
    assert again.choices[0].message.reasoning_content == "".join(reasoning)
    assert again.choices[0].message.content == ""
    assert again.usage.prompt_tokens_details.cached_tokens == \
        (usage.prompt_tokens - 1) // 128 * 128


def test_thinking_mode_reaches_the_template(client):
    """thinking_mode "disabled" renders no open reasoning marker: the answer is plain content
    and the prompt is one token shorter."""
    messages = [{"role": "user", "content": "hello"}]
    thinking = client.chat.completions.create(
        model="tiny-m3", messages=messages, temperature=0, max_tokens=5,
        extra_body={"ignore_eos": True})
    direct = client.chat.completions.create(
        model="tiny-m3", messages=messages, temperature=0, max_tokens=5,
        extra_body={"ignore_eos": True, "thinking_mode": "disabled"})
    assert thinking.choices[0].message.reasoning_content
    assert direct.choices[0].message.content
    assert getattr(direct.choices[0].message, "reasoning_content", None) is None
    assert thinking.usage.prompt_tokens == direct.usage.prompt_tokens + 1


def test_image_chat(client):
    content = [{"type": "text", "text": "What is this?"},
               {"type": "image_url", "image_url": {"url": _image_url()}}]
    with_image = client.chat.completions.create(
        model="tiny-m3", messages=[{"role": "user", "content": content}], temperature=0,
        max_tokens=4, extra_body={"ignore_eos": True})
    text_only = client.chat.completions.create(
        model="tiny-m3", messages=[{"role": "user", "content": content[:1]}], temperature=0,
        max_tokens=4, extra_body={"ignore_eos": True})
    # 56 x 84 pixels: 4 x 6 patches of 14, merged 2 x 2 -> 6 tokens, plus the two markers.
    assert with_image.usage.prompt_tokens - text_only.usage.prompt_tokens == 6 + 2
    assert with_image.usage.completion_tokens == 4


def test_video_chat(client):
    """A 2 s clip sampled at M3's 1 fps: 2 frames, one temporal patch of 64x48 -> 56x56 pixels
    (4 tokens), laid out as `]<]0.0 seconds[>[` + start marker + 4 tokens + end marker."""
    video = {"type": "video_url", "video_url": {"url": data_url(encode_video(8, fps=4),
                                                                "video/mp4")}}
    text = {"type": "text", "text": "What happens?"}
    with_video = client.chat.completions.create(
        model="tiny-m3", max_tokens=3, temperature=0, extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": [text, video]}])
    text_only = client.chat.completions.create(
        model="tiny-m3", max_tokens=3, temperature=0, extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": [text]}])
    timestamp_tokens = len("]<]0.0 seconds[>[")  # byte-level tokenizer: a token a byte
    assert with_video.usage.prompt_tokens - text_only.usage.prompt_tokens == \
        timestamp_tokens + 2 + 4
    assert with_video.usage.completion_tokens == 3


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "additionalProperties": False,
                   "required": ["city", "days"],
                   "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                  "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "required": ["zone"],
                                       "properties": {"zone": {"enum": ["UTC", "CET"]}}}}}


def test_tool_calls_forced_parsed_streamed_and_continued(client):
    """tool_choice "required" and a named tool force a call in M3's format (the random model
    could not write one by chance); the SDK reads it back as tool_calls, whole and streamed,
    and a conversation carrying the call and its result continues."""
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    # The tiny tokenizer spells one character per token: a call takes ~150 tokens.
    args = dict(model="tiny-m3", messages=messages, tools=[WEATHER, CLOCK], max_tokens=300,
                seed=3, parallel_tool_calls=False, extra_body={"thinking_mode": "disabled"})
    reply = client.chat.completions.create(**args, tool_choice="required")
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        arguments = json.loads(call.function.arguments)
        if call.function.name == "get_weather":
            assert arguments["city"] in ("Paris", "Rome") and 1 <= arguments["days"] <= 7
        else:
            assert call.function.name == "get_time" and arguments["zone"] in ("UTC", "CET")

    named = dict(args, tool_choice={"type": "function", "function": {"name": "get_time"}})
    whole = client.chat.completions.create(**named).choices[0]
    assert [c.function.name for c in whole.message.tool_calls] == ["get_time"]
    streamed, finish = [], None
    for chunk in client.chat.completions.create(**named, stream=True):
        streamed += chunk.choices[0].delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in streamed] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]

    call = whole.message.tool_calls[0]
    history = messages + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "12:00"}]
    after = client.chat.completions.create(model="tiny-m3", messages=history, max_tokens=4,
                                           tools=[WEATHER, CLOCK], extra_body={
                                               "ignore_eos": True, "thinking_mode": "disabled"})
    assert after.usage.prompt_tokens > reply.usage.prompt_tokens  # the call and result are in
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-m3", messages=history[:2] + [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "x", "type": "function",
                 "function": {"name": "get_time", "arguments": "{not json"}}]}])
    assert "arguments must be JSON" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**dict(args, tool_choice={
            "type": "function", "function": {"name": "nope"}}))
    assert "not among the tools" in err.value.body["message"]
