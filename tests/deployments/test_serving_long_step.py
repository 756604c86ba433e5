"""A model replica doing one engine step longer than Serve's health-check period stays healthy
and is kept: its health check answers while the step runs (real Ray Serve, the default model,
one prefill chunk of ~4,000 tokens on CPU)."""

from __future__ import annotations

import threading
import time

import httpx
from ray import serve

from deployments.model_server import ModelServer
from tests.deployments.stack import serving

# ~4,000 SmolLM2 tokens, prefilled in one step (max_num_batched_tokens below).
LONG_PROMPT = "The lighthouse keeper walked along the shore and counted the ships. " * 330


def _complete(http: httpx.Client, prompt: str) -> httpx.Response:
    response = http.post("/v1/completions", json={"model": "smollm2", "prompt": prompt,
                                                  "max_tokens": 1, "temperature": 0})
    assert response.status_code == 200, response.text
    return response


def test_a_step_longer_than_the_health_period_keeps_the_replica():
    app = {
        "model": {"engine": {"device": "cpu", "dtype": "float32", "kv_cache_memory": "256MiB",
                             "max_num_batched_tokens": 4096, "served_model_name": "smollm2",
                             "enable_prefix_caching": False},
                  "num_replicas": 1, "num_cpus": 1, "cpu_threads": 1},
        "preprocess": {"num_replicas": 1, "autoscaling": None, "num_cpus": 0.25},
        "ingress": {"num_cpus": 0.25},
        "redis": {"url": None},
    }
    with serving(app, num_cpus=3) as stack, httpx.Client(base_url=stack.http,
                                                         timeout=300) as http:
        replica = _complete(http, "hello").headers["x-msa-replica"]
        model_server = serve.get_deployment_handle("ModelServer", "msa-serve")
        long_reply: dict[str, object] = {}

        def long_request():
            started = time.monotonic()
            response = _complete(http, LONG_PROMPT)
            long_reply.update(response=response, seconds=time.monotonic() - started)

        worker = threading.Thread(target=long_request)
        worker.start()
        time.sleep(1.0)  # the prompt reaches the engine and its one prefill step starts
        health_answers = []
        while worker.is_alive():
            started = time.monotonic()
            model_server.check_health.remote().result(timeout_s=30)
            health_answers.append(time.monotonic() - started)
            time.sleep(0.5)
        worker.join()

        period = ModelServer._deployment_config.health_check_period_s
        response = long_reply["response"]
        assert response.json()["usage"]["prompt_tokens"] > 3500
        assert long_reply["seconds"] > period, (
            f"the long step took {long_reply['seconds']:.1f} s, not longer than the "
            f"{period:g} s health period: the test proves nothing on this machine")
        assert len(health_answers) >= 3 and max(health_answers) < 1.0, health_answers
        assert response.headers["x-msa-replica"] == replica
        assert _complete(http, "hello again").headers["x-msa-replica"] == replica
        status = serve.status().applications["msa-serve"].deployments["ModelServer"]
        assert status.status == "HEALTHY" and status.replica_states == {"RUNNING": 1}
