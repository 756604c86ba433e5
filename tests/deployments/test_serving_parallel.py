"""Replicas that span two ranks each (tensor parallel over gloo, the tiny MiniMax-M3) served by
the whole stack: a rank killed mid-request fails that request cleanly, Serve replaces the whole
replica, and the other replica keeps answering."""

from __future__ import annotations

import time

import openai
import pytest
import ray
from ray import serve

from tests.deployments.stack import openai_client, serving
from worker.engine.rank_workers import rank_worker_name
from worker.tiny_model import make_m3_checkpoint


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    model_dir = make_m3_checkpoint(tmp_path_factory.mktemp("tp-m3-served"), seed=3)
    app = {
        "model": {"engine": {"model": str(model_dir), "device": "cpu", "dtype": "float32",
                             "kv_cache_memory": "8MiB", "max_num_batched_tokens": 256,
                             "served_model_name": "tiny-m3", "tensor_parallel_size": 2},
                  "num_replicas": 2, "num_cpus": 0.5, "cpu_threads": 1},
        "preprocess": {"num_replicas": 1, "autoscaling": None, "num_cpus": 0.25},
        "ingress": {"num_cpus": 0.25},
        "redis": {"url": None},
    }
    with serving(app, num_cpus=4) as endpoints:
        yield openai_client(endpoints)


def _replica_actor_id(replica_id: str) -> str:
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith("SERVE_REPLICA::") and actor["name"].endswith(replica_id):
            handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
            return handle._actor_id.hex()
    raise AssertionError(f"no actor for replica {replica_id}")


def _rank_worker(owner_actor_id: str):
    name = rank_worker_name(owner_actor_id, 1)
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"] == name:
            return ray.get_actor(name, namespace=actor["namespace"])
    raise AssertionError(f"no rank-1 worker named {name}")


def _running_model_replicas() -> int:
    app = serve.status().applications["msa-serve"]
    return app.deployments["ModelServer"].replica_states.get("RUNNING", 0)


def test_a_killed_rank_fails_its_request_and_serve_replaces_the_replica(client):
    answer = client.completions.create(model="tiny-m3", prompt="hello", max_tokens=4,
                                       temperature=0)
    assert answer.usage.completion_tokens == 4
    stream = client.completions.create(model="tiny-m3", prompt="a long story", stream=True,
                                       max_tokens=2000, extra_body={"ignore_eos": True})
    next(iter(stream))
    victim = stream.response.headers["x-msa-replica"]
    (other,) = _replica_ids() - {victim}
    ray.kill(_rank_worker(_replica_actor_id(victim)), no_restart=True)
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass

    deadline = time.monotonic() + 180
    while _running_model_replicas() < 2 or victim in _replica_ids():
        assert time.monotonic() < deadline, "Serve did not replace the replica of the dead rank"
        time.sleep(1)
    assert other in _replica_ids()  # the other replica was never touched
    answers = [client.completions.create(model="tiny-m3", prompt=f"after {i}", max_tokens=3)
               for i in range(4)]
    assert all(a.usage.completion_tokens == 3 for a in answers)


def _replica_ids() -> set[str]:
    return {a["name"].rsplit("#", 1)[-1] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::") and "ModelServer" in a["name"]}
