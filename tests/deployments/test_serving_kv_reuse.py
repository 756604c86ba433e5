"""Cross-replica KV reuse on the real stack (Ray Serve, Redis, two CPU replicas of the tiny MSA
model with host tiers): a request the router sends away from a busy holder of its prefix pulls
the holder's pages, and a holder that dies leaves the request to recompute, with no error."""

from __future__ import annotations

import contextlib
import random
import time

import httpx
import pytest
import ray

from tests.deployments.stack import serving
from tests.deployments.test_serving import _replica_actor
from worker.config import EngineConfig
from worker.engine.llm_engine import LLMEngine
from worker.wire import BLOCK_SIZE, SamplingParams

PAGES = 4
ANSWER = 8


@pytest.fixture(scope="module")
def stack(tiny_model_dir):
    app = {
        "model": {"engine": {"model": str(tiny_model_dir), "device": "cpu", "dtype": "float32",
                             "kv_cache_memory": "16MiB", "kv_host_memory": "4MiB",
                             "max_num_batched_tokens": 512, "served_model_name": "tiny"},
                  "num_replicas": 2, "num_cpus": 0.5, "cpu_threads": 1},
        "preprocess": {"num_replicas": 1, "autoscaling": None, "num_cpus": 0.25},
        "ingress": {"num_cpus": 0.25},
        "redis": {"lookup_timeout_ms": 500, "heartbeat_s": 0.3, "ttl_s": 5,
                  "flush_interval_ms": 20},
        "routing": {"peer_pulls": {"mode": "always", "timeout_s": 3}},
    }
    with serving(app, num_cpus=4) as endpoints:
        yield endpoints


@pytest.fixture(scope="module")
def http(stack):
    with httpx.Client(base_url=stack.http, timeout=120) as session:
        yield session


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """The same model in this process, prefix caching off: every answer recomputed."""
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), device="cpu", dtype="float32",
                                    kv_cache_memory="16MiB", enable_prefix_caching=False))

    def answer(prompt: list[int]) -> str:
        params = SamplingParams(temperature=0, max_tokens=ANSWER, ignore_eos=True)
        return engine.generate([prompt], params, use_tqdm=False)[0].text

    return answer


def complete(http, prompt, max_tokens=ANSWER) -> httpx.Response:
    response = http.post("/v1/completions", json={
        "model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True})
    assert response.status_code == 200, response.text
    return response


def text(response: httpx.Response) -> str:
    return response.json()["choices"][0]["text"]


def session_prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 250) for _ in range(PAGES * BLOCK_SIZE + 10)]


def loads(stack) -> dict[str, dict[str, int]]:
    import redis

    client = redis.Redis.from_url(stack.redis.url, decode_responses=True)
    return {k.rsplit(":", 1)[-1]: {f: int(v) for f, v in client.hgetall(k).items()}
            for k in client.keys("msa:tiny:load:*")}


@contextlib.contextmanager
def busy(http, stack, session: list[int], holder: str):
    """A long answer on the session's holder, streaming while the block runs (it yields the
    stream's line iterator: dropping it would close the stream), entered once the holder has
    published the decode load."""
    with http.stream("POST", "/v1/completions", json={
            "model": "tiny", "prompt": session + [7], "max_tokens": 2000, "ignore_eos": True,
            "stream": True}) as response:
        yield from _once_busy(stack, response, holder)


def _once_busy(stack, response, holder):
    assert response.headers["x-msa-replica"] == holder, "the holder's prefix drew the stream"
    lines = response.iter_lines()
    assert next(lines).startswith("data:")
    deadline = time.monotonic() + 10
    while loads(stack)[holder].get("decode_pages", 0) == 0:
        assert time.monotonic() < deadline, f"no decode load published: {loads(stack)}"
        time.sleep(0.05)
    yield lines


def test_a_request_sent_past_a_busy_holder_pulls_its_pages(http, stack, reference):
    session = session_prompt(1)
    holder = complete(http, session).headers["x-msa-replica"]
    time.sleep(0.3)  # its pages reach Redis
    with busy(http, stack, session, holder):
        question = session + [11, 12, 13]
        response = complete(http, question)
        puller = response.headers["x-msa-replica"]
        assert puller != holder
        assert response.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == \
            PAGES * BLOCK_SIZE, "the pulled pages served the prefix"
        assert text(response) == reference(question)
        assert loads(stack)[puller]["kv_pages_pulled"] >= PAGES


def test_a_holder_killed_before_the_pull_leaves_the_request_to_recompute(http, stack,
                                                                          reference):
    session = session_prompt(2)
    holder = complete(http, session).headers["x-msa-replica"]
    time.sleep(0.3)
    with busy(http, stack, session, holder) as stream:
        puller = next(r for r in loads(stack) if r != holder)
        pulled_before = loads(stack)[puller]["kv_pages_pulled"]
        ray.kill(_replica_actor(holder), no_restart=True)
        question = session + [21, 22]
        response = complete(http, question)
        assert response.headers["x-msa-replica"] == puller
        assert text(response) == reference(question)
        assert loads(stack)[puller]["kv_pages_pulled"] == pulled_before
        # The holder's own stream ends with an error event, as any killed replica's.
        assert any('"error"' in line for line in stream)
