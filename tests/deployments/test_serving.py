"""The serving stack end to end on CPU: real redis-server, real Ray Serve, real clients.

One stack (tiny model, two model replicas) serves the whole module; the tests that break things
(Redis stopped, a replica killed) run last, in file order.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import jsonschema
import numpy as np
import openai
import pytest
import ray
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from ray import serve

from deployments.client import MSAServeClient
from deployments.local import Endpoints, banner
from deployments.proto import msa_serve_pb2 as pb
from tests.deployments.stack import openai_client, serving
from tests.preprocess.media_files import (
    data_url,
    encode_audio_only,
    encode_image,
    encode_video,
)

API_KEY = "test-key"
SYSTEM = ("Be careful. " * 25).strip()  # ~300 tokens of the byte-level tiny tokenizer
LONG = {"max_tokens": 600, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    """The directory file:// media URLs may read from, with one image in it."""
    directory = tmp_path_factory.mktemp("media")
    (directory / "red.png").write_bytes(_image_png((255, 0, 0)))
    return directory


@pytest.fixture(scope="module")
def stack(vision_model_dir, media_dir):
    app = {
        "model": {"engine": {"model": str(vision_model_dir), "device": "cpu", "dtype": "float32",
                             "kv_cache_memory": "16MiB", "max_model_len": 1024,
                             "max_num_batched_tokens": 512, "served_model_name": "tiny"},
                  "num_replicas": 2, "num_cpus": 0.5, "cpu_threads": 1},
        "preprocess": {"num_replicas": 1, "autoscaling": None, "num_cpus": 0.25,
                       "media": {"allowed_local_dir": str(media_dir), "max_pixels": 64 * 96}},
        "ingress": {"num_cpus": 0.25},
        "redis": {"lookup_timeout_ms": 500, "heartbeat_s": 0.3, "ttl_s": 5,
                  "flush_interval_ms": 20},
        "limits": {"max_body_bytes": 65536, "max_tokens": 1000, "default_max_tokens": 16},
        "api_keys": [API_KEY],
    }
    with serving(app, num_cpus=4) as endpoints:
        yield endpoints


@pytest.fixture(scope="module")
def client(stack):
    return openai_client(stack, API_KEY)


@pytest.fixture(scope="module")
def http(stack):
    with httpx.Client(base_url=stack.http, timeout=120,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as session:
        yield session


def _chat(http: httpx.Client, messages, **extra) -> httpx.Response:
    return http.post("/v1/chat/completions",
                     json={"model": "tiny", "messages": messages, "temperature": 0, **extra})


def _image_png(color) -> bytes:
    """96 x 64 pixels, the left half colored: 24 placeholder tokens on the tiny model."""
    pixels = np.zeros((64, 96, 3), dtype=np.uint8)
    pixels[:, :48] = color
    return encode_image(Image.fromarray(pixels), "PNG")


def _image_chat(client, url: str):
    """A system prompt of ~300 tokens, the image (its tokens on the third page), ~200 more."""
    content = [{"type": "text", "text": "What is in this picture?"},
               {"type": "image_url", "image_url": {"url": url}},
               {"type": "text", "text": "Describe it in detail. " * 9}]
    return client.chat.completions.create(
        model="tiny", temperature=0, max_tokens=6, extra_body={"ignore_eos": True},
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}])


def _metric(http: httpx.Client, name: str, **labels) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    line_start = f"{name}{{{wanted}}} " if labels else f"{name} "
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.split()[-1])
    return 0.0


def _replica_loads(stack) -> dict[str, dict[str, int]]:
    import redis

    client = redis.Redis.from_url(stack.redis.url, decode_responses=True)
    keys = client.keys("msa:tiny:load:*")
    return {k.rsplit(":", 1)[-1]: {f: int(v) for f, v in client.hgetall(k).items()} for k in keys}


def _wait_idle(stack, timeout_s: float = 15.0,
               generated_above: int = -1) -> dict[str, dict[str, int]]:
    """Waits until every replica reports no request and no page held by one (and, to skip
    figures published before the work at hand, more than `generated_above` tokens in all)."""
    deadline = time.monotonic() + timeout_s
    loads = {}
    while time.monotonic() < deadline:
        loads = _replica_loads(stack)
        if len(loads) == 2 and all(f["running"] == 0 and f["waiting"] == 0
                                   and f["kv_pages_in_use"] == 0 for f in loads.values()) and \
                sum(f["generated_tokens"] for f in loads.values()) > generated_above:
            return loads
        time.sleep(0.1)
    raise AssertionError(f"replicas still busy or holding pages: {loads}")


# -- the OpenAI API through the official SDK --------------------------------------------------
def test_models_health_and_metrics(client, http):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert http.get("/health").json() == {"status": "ok"}
    assert "msa_requests_total" in http.get("/metrics").text


def test_chat_completion_and_prefix_cache_hit(client):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]
    first = client.chat.completions.create(model="tiny", messages=messages, temperature=0,
                                           max_tokens=8, extra_body={"ignore_eos": True})
    again = client.chat.completions.create(model="tiny", messages=messages, temperature=0,
                                           max_tokens=8, extra_body={"ignore_eos": True})
    assert first.choices[0].finish_reason == "length"
    assert first.usage.completion_tokens == 8
    assert first.usage.prompt_tokens > 256
    assert first.choices[0].message.content == again.choices[0].message.content  # greedy
    # The repeat lands where the prefix lives and reuses its full pages.
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached == (first.usage.prompt_tokens - 1) // 128 * 128 > 0


def test_completion_streaming_matches_whole_and_stop_cuts(client):
    kwargs = dict(model="tiny", prompt="The quick brown fox", temperature=0, max_tokens=24,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs)
    text = whole.choices[0].text
    pieces, usage = [], None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True},
                                           **kwargs):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
        usage = chunk.usage or usage
    assert "".join(pieces) == text
    assert usage.completion_tokens == 24

    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), f"pick a visible stop string from {text!r}"
    stopped = client.completions.create(stop=[stop], **kwargs)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(stop)]


def test_chat_streaming_and_logprobs(client):
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "count"}], temperature=0,
        max_tokens=6, stream=True, logprobs=True, top_logprobs=2,
        extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    entries = [e for c in chunks for e in (c.choices[0].logprobs.content or [])]
    assert len(entries) == 6
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)
    # Greedy: the sampled token is the best alternative.
    assert all(e.top_logprobs[0].logprob == pytest.approx(e.logprob) for e in entries)


def test_completion_logprobs_text_offset(client):
    """text_offset: each token's start in the completion text, carried on across stream
    chunks; the same offsets whole and streamed."""
    args = dict(model="tiny", prompt="Once upon", temperature=0, max_tokens=8, logprobs=1,
                extra_body={"ignore_eos": True})
    whole = client.completions.create(**args).choices[0]
    tokens = whole.logprobs.tokens
    assert len(tokens) == 8
    assert whole.logprobs.text_offset == [len("".join(tokens[:i])) for i in range(8)]
    streamed = [o for chunk in client.completions.create(**args, stream=True)
                for o in (chunk.choices[0].logprobs.text_offset if chunk.choices[0].logprobs
                          else [])]
    assert streamed == whole.logprobs.text_offset


def test_usage_in_every_chunk_when_asked(client):
    """stream_options.continuous_usage_stats (aiperf's per-chunk usage, guidellm's default):
    each chunk carries the usage so far; without it only the last one does. A client slower
    than the engine may get several tokens in one chunk (the engine coalesces undelivered
    outputs), so the usage is checked against the tokens each chunk carries."""
    args = dict(model="tiny", prompt="The quick brown fox", temperature=0, max_tokens=6,
                logprobs=1, stream=True, extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(
        stream_options={"include_usage": True, "continuous_usage_stats": True}, **args))
    with_text = [c for c in chunks if c.choices]
    delivered = list(itertools.accumulate(len(c.choices[0].logprobs.tokens) for c in with_text))
    assert [c.usage.completion_tokens for c in with_text] == delivered
    assert delivered[-1] == 6
    assert len({c.usage.prompt_tokens for c in chunks}) == 1
    assert chunks[-1].usage.completion_tokens == 6  # the closing usage chunk
    plain = list(client.completions.create(stream_options={"include_usage": True}, **args))
    assert [c.usage is None for c in plain[:-1]] == [True] * (len(plain) - 1)
    assert not plain[-1].choices and plain[-1].usage.completion_tokens == 6


def test_completions_take_a_batch_of_prompts_text_or_token_ids(client, http):
    """As lm-eval's local-completions sends them (`prompt: [[ids], ...]`, batch size > 1): one
    choice set per prompt, in order, each what the prompt alone gets."""
    args = dict(model="tiny", temperature=0, max_tokens=5, extra_body={"ignore_eos": True})
    texts = ["The quick brown fox", "Once upon a time"]
    alone = [client.completions.create(prompt=text, **args) for text in texts]
    batch = client.completions.create(prompt=texts, **args)
    assert [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == [a.choices[0].text for a in alone]
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert batch.usage.completion_tokens == 10
    ids = [http.post("/tokenize", json={"prompt": text}).json()["tokens"] for text in texts]
    by_ids = client.completions.create(prompt=ids, **args)
    assert [c.text for c in by_ids.choices] == [c.text for c in batch.choices]
    pieces: dict[int, str] = {}
    for chunk in client.completions.create(prompt=ids, stream=True, **args):
        for choice in chunk.choices:
            pieces[choice.index] = pieces.get(choice.index, "") + choice.text
    assert pieces == {0: batch.choices[0].text, 1: batch.choices[1].text}
    sampled = client.completions.create(prompt=texts, n=2, seed=3, **{**args, "temperature": 1})
    assert sorted(c.index for c in sampled.choices) == [0, 1, 2, 3]
    empty = http.post("/v1/completions", json={"model": "tiny", "prompt": [[1, 2], []]})
    assert empty.status_code == 400 and "empty" in empty.json()["error"]["message"]


def test_echo_scores_prompts_as_lm_eval_reads_them(http):
    """lm-eval's log-likelihood request (a batch of token-id lists, `echo`, `logprobs: 1`,
    `max_tokens: 1`): the prompt's text opens each choice; its tokens come first in the
    logprobs, the first unscored; offsets point at each token's text; the batch scores as its
    prompts do one by one; `max_tokens: 0` scores alone."""
    texts = ["The quick brown fox jumps", "Once upon a time there was"]
    ids = [http.post("/tokenize", json={"prompt": text}).json()["tokens"] for text in texts]
    payload = {"model": "tiny", "prompt": ids, "temperature": 0, "max_tokens": 1, "logprobs": 1,
               "seed": 1234, "echo": True}
    batch = http.post("/v1/completions", json=payload).json()["choices"]
    assert [c["index"] for c in batch] == [0, 1]
    for choice, prompt_ids, text in zip(batch, ids, texts, strict=True):
        logprobs = choice["logprobs"]
        assert choice["text"].startswith(text)
        assert len(logprobs["tokens"]) == len(prompt_ids) + 1
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        # (A generated token may be part of a character, or EOS: no text of its own yet.)
        for token, offset in zip(logprobs["tokens"][:len(prompt_ids)],
                                 logprobs["text_offset"][:len(prompt_ids)], strict=True):
            assert choice["text"][offset:offset + len(token)] == token
        for value, top in zip(logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:],
                              strict=True):
            assert value <= 0 and len(top) == 1 and max(top.values()) >= value
        # Greedy: the generated token is its own best alternative (lm-eval's is_greedy).
        assert logprobs["token_logprobs"][-1] == max(logprobs["top_logprobs"][-1].values())
    for choice, prompt_ids in zip(batch, ids, strict=True):
        alone = http.post("/v1/completions", json={**payload, "prompt": prompt_ids}).json()
        assert alone["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(
            choice["logprobs"]["token_logprobs"][1:], abs=1e-5)
    scored = http.post("/v1/completions", json={**payload, "prompt": ids[0], "max_tokens": 0})
    assert scored.status_code == 200, scored.text
    only = scored.json()
    assert only["usage"]["completion_tokens"] == 0 and only["choices"][0]["text"] == texts[0]
    assert only["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(
        batch[0]["logprobs"]["token_logprobs"][1:-1], abs=1e-5)
    refused = http.post("/v1/completions", json={"model": "tiny", "prompt": "hi",
                                                 "max_tokens": 0})
    assert refused.status_code == 400 and "scores a prompt" in refused.json()["error"]["message"]


def test_streamed_echo_and_vllm_prompt_logprobs(client, http):
    """A streamed choice opens with its prompt; `prompt_logprobs` (vLLM's extension) gives each
    prompt token (after the first) with its rank and alternatives, on completions per choice
    and on chat for the request."""
    text = "The quick brown fox"
    chunks = list(client.completions.create(model="tiny", prompt=text, temperature=0,
                                            max_tokens=3, echo=True, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].text.startswith(text)
    whole = client.completions.create(model="tiny", prompt=text, temperature=0, max_tokens=3,
                                      echo=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    ids = http.post("/tokenize", json={"prompt": text}).json()["tokens"]
    body = http.post("/v1/completions", json={"model": "tiny", "prompt": text, "max_tokens": 1,
                                              "prompt_logprobs": 2}).json()
    entries = body["choices"][0]["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    for token_id, entry in zip(ids[1:], entries[1:], strict=True):
        own = entry[str(token_id)]
        assert own["rank"] >= 1 and own["logprob"] <= 0
        ranked = sorted(entry.values(), key=lambda e: e["rank"])
        assert ranked[0]["rank"] == 1 and len(entry) in (2, 3)
    chat = http.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
        "prompt_logprobs": 0}).json()
    assert chat["prompt_logprobs"][0] is None
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]


TOOL_REQUESTS = json.loads(
    (Path(__file__).parent / "fixtures" / "tool_requests.json").read_text())["requests"]


def _field(body: dict, dotted: str) -> list:
    """The values at a dotted path; a list along the way yields each of its items."""
    values = [body]
    for key in dotted.split("."):
        values = [v for value in values
                  for v in (value if isinstance(value, list) else [value])]
        assert all(key in value for value in values), (key, values)
        values = [value[key] for value in values]
    return values


@pytest.mark.parametrize("request_", TOOL_REQUESTS, ids=lambda r: r["tool"].split(",")[0])
def test_the_tools_request_bodies_get_the_fields_they_read(http, request_):
    """lm-eval's, aiperf's and guidellm's bodies (tests/deployments/fixtures): 200, and every
    field the tool reads is there, in every streamed chunk that carries choices."""
    body = request_["body"]
    if not body.get("stream"):
        response = http.post(request_["path"], json=body)
        assert response.status_code == 200, response.text
        for dotted in request_["reads"]:
            assert _field(response.json(), dotted)
        return
    with http.stream("POST", request_["path"], json=body) as response:
        assert response.status_code == 200
        events = [json.loads(line[len("data: "):]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    with_choices = [event for event in events if event["choices"]]
    assert with_choices and "error" not in events[-1]
    for event in with_choices:  # per-chunk usage: every chunk carries it
        for dotted in request_["reads"]:
            if dotted.startswith(("choices.delta.content", "choices.text")):
                continue  # a chunk may close the stream with no new text
            assert _field(event, dotted)
    assert any(_field(event, "choices.delta.content" if "chat" in request_["path"]
                      else "choices.text")[0] for event in with_choices)
    assert events[-1]["usage"]["completion_tokens"] >= 1


def test_tokenizer_routes_answer_as_vllm_s_for_lm_eval(http, client, stack):
    """/tokenizer_info, /tokenize and /detokenize as lm-eval's remote tokenizer calls them."""
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] and info["chat_template"] and info["model_max_length"] == 1024
    text = "The quick brown fox"
    tokenized = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False,
                                            "return_token_strs": True}).json()
    assert tokenized["count"] == len(tokenized["tokens"]) == len(tokenized["token_strs"]) > 3
    assert tokenized["max_model_len"] == 1024
    assert http.post("/detokenize", json={"tokens": tokenized["tokens"]}).json() == \
        {"prompt": text}
    # Messages are rendered by the chat template exactly as a chat request's prompt is.
    messages = [{"role": "user", "content": "hi"}]
    counted = http.post("/tokenize", json={"model": "tiny", "messages": messages}).json()
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1)
    assert counted["count"] == reply.usage.prompt_tokens
    bad = http.post("/detokenize", json={"tokens": [1, 10**9]})
    assert bad.status_code == 400 and "not in the vocabulary" in bad.json()["error"]["message"]
    both = http.post("/tokenize", json={"prompt": "x", "messages": messages})
    assert both.status_code == 400 and "either prompt" in both.json()["error"]["message"]
    assert httpx.get(f"{stack.http}/tokenizer_info").status_code == 401  # no key
    # gRPC's Tokenize and Detokenize answer as the HTTP routes do, behind the same key.
    with MSAServeClient(stack.grpc, api_key=API_KEY, timeout_s=60) as grpc_client:
        assert grpc_client.tokenize(text, add_special_tokens=False) == tokenized["tokens"]
        assert grpc_client.tokenize(messages=messages) == counted["tokens"]
        assert grpc_client.detokenize(tokenized["tokens"]) == text
        with pytest.raises(grpc.RpcError) as err:
            grpc_client.detokenize([10**9])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with MSAServeClient(stack.grpc, timeout_s=60) as keyless:
        with pytest.raises(grpc.RpcError) as err:
            keyless.tokenize(text)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_unknown_routes_and_methods_answer_openai_errors(http):
    missing = http.get("/v1/embeddings")
    assert missing.status_code == 404
    error = missing.json()["error"]
    assert error["code"] == "not_found" and "/v1/chat/completions" in error["message"]
    wrong = http.get("/v1/completions")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


def test_n_samples_and_best_of(client):
    """n=3: three different seeded samples of one prompt, streamed or whole alike; the usage
    counts the prompt once and every sample's tokens. best_of=4, n=2: the two samples of
    highest log-probability, in that order."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "three"}]
    args = dict(model="tiny", messages=messages, temperature=1.0, seed=5, max_tokens=6, n=3,
                extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**args)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    texts = [c.message.content for c in whole.choices]
    assert len(set(texts)) == 3 and all(c.finish_reason == "length" for c in whole.choices)
    assert whole.usage.completion_tokens == 18 and whole.usage.prompt_tokens > 256
    streamed = {0: "", 1: "", 2: ""}
    roles = 0
    for chunk in client.chat.completions.create(**args, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            roles += choice.delta.role == "assistant"
    assert [streamed[i] for i in range(3)] == texts and roles == 3

    args = dict(model="tiny", prompt="Once upon a time", temperature=1.0, seed=11, max_tokens=5,
                extra_body={"ignore_eos": True})
    samples = client.completions.create(**args, n=4, logprobs=0).choices
    score = {c.text: sum(c.logprobs.token_logprobs) for c in samples}
    best = client.completions.create(**args, n=2, best_of=4)
    assert [c.text for c in best.choices] == sorted(score, key=score.get, reverse=True)[:2]
    assert best.choices[0].logprobs is None and best.usage.completion_tokens == 20
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**args, n=3, best_of=2)
    assert "best_of" in err.value.body["message"]


ORDER = {"type": "object", "additionalProperties": False,
         "required": ["item", "quantity", "express"],
         "properties": {"item": {"type": "string", "maxLength": 8},
                        "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                        "express": {"type": "boolean"}}}


def test_structured_output_json_schema_and_json_object(client):
    """20 seeded samples under a json_schema all parse and validate (the tiny model's weights
    are random: only the constraint shapes its output); streamed output obeys it too; a
    schema that does not compile is a 400."""
    messages = [{"role": "user", "content": "order something"}]
    response_format = {"type": "json_schema",
                       "json_schema": {"name": "order", "schema": ORDER, "strict": True}}
    texts = []
    for seed in (1, 2):
        reply = client.chat.completions.create(model="tiny", messages=messages, n=10, seed=seed,
                                               max_tokens=80, response_format=response_format)
        texts += [c.message.content for c in reply.choices]
    for text in texts:
        jsonschema.validate(json.loads(text), ORDER)
    assert len(set(texts)) > 10
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in
                       client.chat.completions.create(model="tiny", messages=messages, seed=3,
                                                      max_tokens=80, stream=True,
                                                      response_format=response_format))
    jsonschema.validate(json.loads(streamed), ORDER)
    plain = client.completions.create(model="tiny", prompt="{", seed=4, max_tokens=200,
                                      extra_body={"response_format": {"type": "regex",
                                                                      "regex": "[a-c]{4}!"}})
    assert re.fullmatch("[a-c]{4}!", plain.choices[0].text)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="tiny", messages=messages, response_format={
                "type": "json_schema",
                "json_schema": {"name": "bad", "schema": {"type": "object", "required": 5}}})
    assert "constraint does not compile" in err.value.body["message"]


# -- images through the OpenAI API ------------------------------------------------------------
def test_image_chat_hits_the_prefix_cache_only_for_the_same_image(client, media_dir, stack):
    red = data_url(_image_png((255, 0, 0)), "image/png")
    first = _image_chat(client, red)
    assert first.usage.completion_tokens == 6
    again = _image_chat(client, red)
    assert again.choices[0].message.content == first.choices[0].message.content
    full_pages = (first.usage.prompt_tokens - 1) // 128 * 128
    assert again.usage.prompt_tokens_details.cached_tokens == full_pages > 256
    # The same pixels from a file:// URL in the allowed directory: the same cache entries.
    from_file = _image_chat(client, f"file://{media_dir}/red.png")
    assert from_file.usage.prompt_tokens_details.cached_tokens == full_pages
    # Another image in the same place: only the pages before the image are reused.
    blue = _image_chat(client, data_url(_image_png((0, 0, 255)), "image/png"))
    assert blue.usage.prompt_tokens == first.usage.prompt_tokens
    assert blue.usage.prompt_tokens_details.cached_tokens == 256
    assert blue.choices[0].message.content != first.choices[0].message.content
    # gRPC with the image's bytes inline: the same prompt, so the same cached pages.
    with MSAServeClient(stack.grpc, api_key=API_KEY, timeout_s=60) as grpc_client:
        reply = grpc_client.chat(
            [{"role": "system", "content": SYSTEM},
             {"role": "user", "content": [{"text": "What is in this picture?"},
                                          {"image": _image_png((255, 0, 0))},
                                          {"text": "Describe it in detail. " * 9}]}],
            max_tokens=6, temperature=0, ignore_eos=True)
    assert reply.message.content == first.choices[0].message.content
    assert reply.usage.cached_tokens == full_pages


def test_video_chat(client):
    # 2 s at 10 fps, sampled at 2 fps: 4 frames of 64 x 80 (after the resize policy) -> 40 tokens
    video = data_url(encode_video(20, fps=10), "video/mp4")
    content = [{"type": "video_url", "video_url": {"url": video}},
               {"type": "text", "text": "What happens?"}]
    text_only = [{"type": "text", "text": "What happens?"}]
    replies = [client.chat.completions.create(
        model="tiny", temperature=0, max_tokens=4, extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": parts}]) for parts in (content, text_only)]
    with_video, without = (r.usage.prompt_tokens for r in replies)
    assert with_video - without == 40 + 2  # the video's tokens and its start/end markers
    assert replies[0].usage.completion_tokens == 4


def test_bad_media_gets_400_and_the_server_keeps_serving(client, http, stack):
    truncated = encode_image(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")[:200]
    cases = {
        data_url(truncated, "image/jpeg"): "could not be decoded",
        "file:///etc/passwd": "outside the allowed directory",
        "https://example.com/cat.png": "fetching media from URLs is off",
        data_url(b"\x89PNG garbage", "image/png"): "could not be decoded",
    }
    generated = sum(f["generated_tokens"] for f in _replica_loads(stack).values())
    for url, message in cases.items():
        with pytest.raises(openai.BadRequestError) as err:
            _image_chat(client, url)
        assert message in err.value.message
    response = _chat(http, [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": data_url(encode_audio_only(), "audio/wav")}}]}])
    assert response.status_code == 400 and "no video stream" in response.text
    response = _chat(http, [{"role": "user", "content": [{"type": "input_audio"}]}])
    assert response.status_code == 400 and "unsupported content part type" in response.text
    assert _image_chat(client, data_url(_image_png((9, 9, 9)), "image/png")).usage
    _wait_idle(stack, generated_above=generated)


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, http, stack):
    raw = http.post("/v1/chat/completions", content=b"{not json",
                    headers={"Content-Type": "application/json"})
    assert raw.status_code == 400
    assert "Invalid JSON" in raw.json()["error"]["message"]

    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "x"}])
    assert err.value.body["code"] == "model_not_found"

    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="x", max_tokens="many")
    assert "max_tokens" in err.value.body["message"]

    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="x", n=17)
    assert "n:" in err.value.body["message"]

    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as err:  # a ChatML template without tools
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       tools=[tool], tool_choice="required")
    assert err.value.body["code"] == "tools_not_supported"

    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="x", max_tokens=5000)
    assert "at most 1000" in err.value.body["message"]

    with pytest.raises(openai.BadRequestError) as err:  # context overflow: 1,100 > 1,024
        client.completions.create(model="tiny", prompt=[65] * 1100)
    assert "context" in err.value.body["message"]

    with pytest.raises(openai.BadRequestError) as err:  # token ids outside the vocabulary
        client.completions.create(model="tiny", prompt=[10**7])
    assert "token ids" in err.value.body["message"]

    big = http.post("/v1/completions", content=json.dumps(
        {"model": "tiny", "prompt": "x" * 70000}).encode(),
        headers={"Content-Type": "application/json"})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"

    anonymous = httpx.post(f"{stack.http}/v1/models")
    assert anonymous.status_code in (401, 405)
    for route in ("/metrics", "/v1/models"):  # with keys set, all but /health need one
        assert httpx.get(f"{stack.http}{route}").status_code == 401, route
    assert httpx.get(f"{stack.http}/health").status_code == 200
    for route in ("/docs", "/openapi.json", "/redoc"):
        assert httpx.get(f"{stack.http}{route}").status_code == 404, route
    unauthorized = httpx.get(f"{stack.http}/v1/models")
    assert unauthorized.status_code == 401
    assert unauthorized.json()["error"]["type"] == "authentication_error"

    ok = client.completions.create(model="tiny", prompt="still here", max_tokens=3)
    assert ok.usage.completion_tokens >= 1
    _wait_idle(stack)  # none of the rejected requests holds a page


# Each row: (HTTP body fields, gRPC call keyword arguments, words the error must contain);
# both front doors must refuse each with 400 / INVALID_ARGUMENT through the one validator.
BAD_VALUES = [
    ({"temperature": float("inf")}, {"temperature": float("inf")}, "temperature"),
    ({"temperature": 2.5}, {"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, {"top_p": 0.0}, "top_p"),
    ({"messages": [{"role": "wizard", "content": "x"}]},
     {"messages": [{"role": "wizard", "content": "x"}]}, "role"),
]


def test_values_that_crashed_the_engine_are_refused_and_streams_survive(client, http, stack):
    """seed >= 2^64 and top_k >= 2^63 used to overflow inside the engine's step thread and take
    every stream down: now a 400 each, while a long stream on the same replicas goes on."""
    stream = client.completions.create(model="tiny", prompt="a story", stream=True,
                                       max_tokens=300, extra_body={"ignore_eos": True})
    first = next(iter(stream))
    for extra in ({"seed": 2**64}, {"seed": -(2**63) - 1}, {"top_k": 2**63}):
        response = http.post("/v1/completions", json={"model": "tiny", "prompt": "x",
                                                      "max_tokens": 2, **extra})
        assert response.status_code == 400, response.text
        assert next(iter(extra)) in response.json()["error"]["message"]
    rest = list(stream)
    assert first.choices[0].text is not None
    assert rest[-1].choices[0].finish_reason == "length"
    assert sum(1 for _ in rest) > 0


def test_http_and_grpc_refuse_the_same_bad_values(http, stack):
    with MSAServeClient(stack.grpc, api_key=API_KEY, timeout_s=60) as grpc_client:
        for http_fields, grpc_kwargs, words in BAD_VALUES:
            body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                    "max_tokens": 2, **http_fields}
            response = http.post("/v1/chat/completions",
                                 content=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
            assert response.status_code == 400, (http_fields, response.text)
            assert words in response.json()["error"]["message"]
            messages = grpc_kwargs.pop("messages", [{"role": "user", "content": "x"}])
            with pytest.raises(grpc.RpcError) as err:
                grpc_client.chat(messages, max_tokens=2, **grpc_kwargs)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, grpc_kwargs
            assert words in err.value.details()


def test_a_prompt_too_long_for_the_context_is_refused_before_tokenizing(http, client):
    """The tiny model's context (1,024 tokens here) holds no text of 60,000 bytes: refused by
    size alone, at once, naming the context; a concurrent request is not held up."""
    started = time.monotonic()
    response = http.post("/v1/completions", json={"model": "tiny", "prompt": "y" * 60000})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert "1024 tokens" in response.json()["error"]["message"]
    chat = _chat(http, [{"role": "user", "content": "z" * 60000}])
    assert chat.status_code == 400 and "context" in chat.json()["error"]["message"]
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).usage
    assert time.monotonic() - started < 10


def test_banner_commands_work_with_api_keys_set(stack, tmp_path):
    """The example commands `msa-serve up` prints send the key when keys are on, and work;
    the client command prints n samples, each valid under a --json-schema."""
    text = banner(Endpoints(stack.http, stack.grpc, "tiny", None), keyed=True)
    lines = text[text.index("curl "):text.index("\n\nCtrl-C")].replace("\\\n", " ")
    curl, client = lines.split("\n  ")
    env = {**os.environ, "KEY": API_KEY,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    answer = subprocess.run(["bash", "-c", f"{curl} --fail -s"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert answer.returncode == 0 and json.loads(answer.stdout)["choices"], answer.stderr
    chat = subprocess.run(["bash", "-c", client + " --max-tokens 3"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0, chat.stderr
    (tmp_path / "order.json").write_text(json.dumps(ORDER))
    chat = subprocess.run(["bash", "-c", f"{client} -n 2 --json-schema {tmp_path}/order.json "
                                         "--max-tokens 80 --seed 1"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0, chat.stderr
    samples = re.split(r"^--- sample \d ---$", chat.stdout, flags=re.M)
    assert samples[0] == "" and len(samples) == 3, chat.stdout
    for sample in samples[1:]:
        jsonschema.validate(json.loads(sample), ORDER)


# -- gRPC -------------------------------------------------------------------------------------
def test_grpc_generate_chat_and_status_codes(stack):
    with MSAServeClient(stack.grpc, api_key=API_KEY, timeout_s=60) as grpc_client:
        assert grpc_client.health()
        assert grpc_client.list_models() == ["tiny"]
        pieces = list(grpc_client.generate("The quick brown fox", max_tokens=12, temperature=0,
                                           ignore_eos=True))
        assert pieces[-1].finish_reason == "length"
        assert pieces[-1].usage.completion_tokens == 12
        assert sum(len(p.token_ids) for p in pieces) == 12
        assert all(p.replica == pieces[0].replica for p in pieces)

        reply = grpc_client.chat([{"role": "user", "content": "hi"}], max_tokens=5,
                                 temperature=0, ignore_eos=True)
        assert reply.message.role == "assistant" and reply.usage.completion_tokens == 5

        for call, code in [
            (lambda: list(grpc_client.generate("x", temperature=-1)), "INVALID_ARGUMENT"),
            (lambda: list(grpc_client.generate("")), "INVALID_ARGUMENT"),
            (lambda: list(grpc_client.generate("x", model="other")), "NOT_FOUND"),
            (lambda: grpc_client.chat([]), "INVALID_ARGUMENT"),
            (lambda: list(grpc_client.generate("x", max_tokens=900, ignore_eos=True,
                                               timeout_s=0.3)), "DEADLINE_EXCEEDED"),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code().name == code, err.value.details()

    with MSAServeClient(stack.grpc, api_key="wrong") as anonymous:
        with pytest.raises(grpc.RpcError) as err:
            list(anonymous.generate("x"))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            anonymous.list_models()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert anonymous.health()  # the one method open to all, as /health
    _wait_idle(stack)  # the request past its deadline released its pages



def test_grpc_n_samples_and_structured_output(stack):
    """gRPC has HTTP's n and response_format: n=3 seeded samples differ and all come back (a
    streamed piece names its sample); json_schema samples all validate, a regex holds; a schema
    that does not compile, one that is not JSON and n=0 are INVALID_ARGUMENT."""
    three = [{"role": "user", "content": "three"}]
    with MSAServeClient(stack.grpc, api_key=API_KEY, timeout_s=120) as grpc_client:
        reply = grpc_client.chat(three, n=3, temperature=1.0, seed=5, max_tokens=6,
                                 ignore_eos=True)
        assert [c.index for c in reply.choices] == [0, 1, 2]
        texts = [c.message.content for c in reply.choices]
        assert len(set(texts)) == 3 and reply.message.content == texts[0]
        assert all(c.finish_reason == "length" for c in reply.choices)
        assert reply.usage.completion_tokens == 18
        pieces = list(grpc_client.generate("Once upon a time", n=2, temperature=1.0, seed=3,
                                           max_tokens=4, ignore_eos=True))
        assert {p.index for p in pieces} == {0, 1}
        assert sum(len(p.token_ids) for p in pieces) == 8
        assert pieces[-1].usage.completion_tokens == 8

        reply = grpc_client.chat([{"role": "user", "content": "order something"}], n=10,
                                 seed=1, max_tokens=80, json_schema=ORDER)
        texts = [c.message.content for c in reply.choices]
        for text in texts:
            jsonschema.validate(json.loads(text), ORDER)
        assert len(set(texts)) > 5
        text = "".join(p.text for p in grpc_client.generate("{", seed=4, max_tokens=200,
                                                             regex="[a-c]{4}!"))
        assert re.fullmatch("[a-c]{4}!", text)

        not_json = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="x")],
                                  sampling=pb.SamplingOptions(json_schema="{not json"))
        for call, words in [
            (lambda: grpc_client.chat(three, json_schema={"type": "object", "required": 5}),
             "constraint does not compile"),
            (lambda: grpc_client.stub.Chat(not_json, metadata=grpc_client.metadata),
             "json_schema is not JSON"),
            (lambda: grpc_client.chat(three, n=0), "n must be"),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert words in err.value.details()

# -- routing ------------------------------------------------------------------------------------
def test_conversation_with_growing_prefix_stays_on_one_replica(http):
    before = _metric(http, "msa_routing_decisions_total", reason="prefix")
    messages = [{"role": "system", "content": SYSTEM}]
    replicas = []
    for turn in range(5):
        messages.append({"role": "user", "content": f"question number {turn}"})
        response = _chat(http, messages, max_tokens=4)
        assert response.status_code == 200, response.text
        replicas.append(response.headers["x-msa-replica"])
        messages.append(response.json()["choices"][0]["message"])
        if turn:
            assert response.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 256
    assert len(set(replicas)) == 1, replicas
    assert _metric(http, "msa_routing_decisions_total", reason="prefix") >= before + 4


def test_client_disconnect_mid_stream_aborts_the_request(http, stack):
    generated_before = sum(f["generated_tokens"] for f in _wait_idle(stack).values())
    body = {"model": "tiny", "prompt": "tell me everything", "stream": True, "max_tokens": 900,
            "ignore_eos": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    loads = _wait_idle(stack, generated_above=generated_before)
    generated = sum(f["generated_tokens"] for f in loads.values()) - generated_before
    assert generated < 900, f"the request was not aborted: {generated} tokens generated"


# -- faults (they break the stack: keep them last) -----------------------------------------------
def test_requests_succeed_with_redis_stopped(http, stack):
    stack.redis.stop()
    before = _metric(http, "msa_routing_decisions_total", reason="redis_unavailable")
    for turn in range(4):
        response = _chat(http, [{"role": "system", "content": SYSTEM},
                                {"role": "user", "content": f"no redis {turn}"}], max_tokens=3)
        assert response.status_code == 200, response.text
    assert _metric(http, "msa_routing_decisions_total", reason="redis_unavailable") >= before + 4
    # The KV gauges stay: each replica's own figures came back with its last answer.
    replica = response.headers["x-msa-replica"]
    gauges = {figure: _metric(http, "msa_replica_load", figure=figure, replica=replica)
              for figure in ("kv_pages_total", "generated_tokens", "kv_pages_in_use", "running")}
    assert gauges["kv_pages_total"] > 0 and gauges["generated_tokens"] >= 3
    assert gauges["kv_pages_in_use"] == 0 and gauges["running"] == 0


def _replica_actor(replica_id: str):
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith("SERVE_REPLICA::") and actor["name"].endswith(replica_id):
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    raise AssertionError(f"no actor for replica {replica_id}")


def _running_model_replicas() -> int:
    app = serve.status().applications["msa-serve"]
    return app.deployments["ModelServer"].replica_states.get("RUNNING", 0)


def test_killed_replica_fails_its_stream_cleanly_and_serve_replaces_it(client):
    stream = client.completions.create(model="tiny", prompt="a long story", stream=True,
                                       **LONG)
    first = next(iter(stream))
    assert first.choices[0].text is not None
    victim = stream.response.headers["x-msa-replica"]
    ray.kill(_replica_actor(victim), no_restart=True)
    with pytest.raises(openai.APIError) as err:
        for _ in stream:
            pass
    assert "replica" in str(err.value.message)

    survivor_answers = [client.completions.create(model="tiny", prompt=f"after {i}",
                                                  max_tokens=3) for i in range(3)]
    assert all(a.usage.completion_tokens >= 1 for a in survivor_answers)

    deadline = time.monotonic() + 120
    while _running_model_replicas() < 2:
        assert time.monotonic() < deadline, "Serve did not replace the killed replica"
        time.sleep(1)


# -- fuzzing both front doors ------------------------------------------------------------------
FIELDS = ("model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature",
          "top_p", "top_k", "min_p", "n", "stop", "seed", "logprobs", "top_logprobs", "stream",
          "stream_options", "ignore_eos", "presence_penalty", "echo", "thinking_mode",
          "chat_template_kwargs", "user")
_scalars = (st.none() | st.booleans() | st.integers(-5, 40) | st.integers(2**31, 2**80)
            | st.integers(-2**80, -2**31) | st.floats(allow_nan=True, allow_infinity=True)
            | st.text(max_size=20) | st.sampled_from(["tiny", "user", "assistant", "wizard"]))
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.sampled_from(["role", "content", "type", "text",
                                                        "image_url", "url", "x"]),
                                       inner, max_size=4), max_leaves=12)
_bodies = st.dictionaries(st.sampled_from(FIELDS), _json, max_size=8) | _json


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_bodies, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_random_http_bodies_get_4xx_or_200_never_5xx(http, body, path):
    # Generation stays short: a body that would be valid generates at most 40 tokens.
    response = http.post(path, content=json.dumps(body).encode(),
                         headers={"Content-Type": "application/json"})
    assert response.status_code == 200 or 400 <= response.status_code < 500, \
        (body, response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert response.json()["error"]["message"]


_grpc_numbers = st.none() | st.floats(allow_nan=True, allow_infinity=True, width=32)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(temperature=_grpc_numbers, top_p=_grpc_numbers,
       top_k=st.none() | st.integers(0, 2**32 - 1),  # the proto's types bound the rest
       max_tokens=st.none() | st.integers(0, 40) | st.integers(1001, 2**32 - 1),
       seed=st.none() | st.integers(-2**63, 2**63 - 1), role=st.sampled_from(["user", "wizard", ""]),
       text=st.text(max_size=30), model=st.sampled_from(["tiny", "", "other"]))
def test_random_grpc_requests_get_ok_or_a_client_status(stack, temperature, top_p, top_k,
                                                        max_tokens, seed, role, text, model):
    client_errors = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                     grpc.StatusCode.OUT_OF_RANGE}
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                    seed=seed)
    with MSAServeClient(stack.grpc, api_key=API_KEY, timeout_s=60) as grpc_client:
        for call in (lambda: list(grpc_client.generate(text or "x", model=model, **sampling)),
                     lambda: grpc_client.chat([{"role": role, "content": text}], model=model,
                                              **sampling)):
            try:
                call()
            except grpc.RpcError as err:
                assert err.code() in client_errors, (sampling, role, err.code(), err.details())


def test_the_stack_serves_after_the_fuzzing(client):
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "still there?"}], temperature=0,
        max_tokens=4, extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 4
