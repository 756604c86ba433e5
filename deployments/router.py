"""Prefix-aware replica choice for the model deployment (a Ray Serve custom request router).

It runs inside every caller of the model deployment's handle (the ingress replicas). For each
request it asks Redis how many leading prefix pages each candidate replica already holds and
scores `matched tokens - load_penalty_tokens * ongoing requests`. The best replica with a hit is
tried first, the others after it (least loaded first). With no hit anywhere, or when Redis is down
or slower than `lookup_timeout_ms`, it falls back to Serve's power of two choices: requests never
fail because of Redis.
"""

from __future__ import annotations

import random

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from deployments import metrics
from deployments.config import RedisSettings
from deployments.prefix_index import PrefixIndexLookup
from deployments.protocol import GenerateRequest
from worker.wire import BLOCK_SIZE


class PrefixAwareRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, redis: dict, model_key: str, load_penalty_tokens: int) -> None:
        settings = RedisSettings.model_validate(redis)
        self._index = PrefixIndexLookup(settings, model_key) if settings.url else None
        self._load_penalty_tokens = load_penalty_tokens

    def _load(self, replica: RunningReplica) -> int:
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_load = sorted(candidate_replicas, key=self._load)
        request = _generate_request(pending_request)
        if request is None or self._index is None:
            return self._power_of_two(candidate_replicas, "load")
        ids = [r.replica_id.unique_id for r in candidate_replicas]
        matched = await self._index.matched_pages(ids, request.prompt.page_hashes)
        if matched is None:
            return self._power_of_two(candidate_replicas, "redis_unavailable")

        def score(replica: RunningReplica) -> int:
            tokens = matched[replica.replica_id.unique_id] * BLOCK_SIZE
            return tokens - self._load_penalty_tokens * self._load(replica)

        best = max(by_load, key=score)  # ties go to the least loaded (max keeps the first)
        if matched[best.replica_id.unique_id] == 0:
            return self._power_of_two(candidate_replicas, "load")
        metrics.ROUTING_DECISIONS.labels(reason="prefix").inc()
        return [[best], [r for r in by_load if r is not best]]

    @staticmethod
    def _power_of_two(replicas: list[RunningReplica], reason: str) -> list[list[RunningReplica]]:
        metrics.ROUTING_DECISIONS.labels(reason=reason).inc()
        # Serve's base router then probes both and picks the shorter queue.
        return [random.sample(replicas, min(2, len(replicas)))]


class RoundRobinRouter(FIFOMixin, RequestRouter):
    """Cycles through the replicas whatever the request: the baseline prefix-aware routing beats."""

    def initialize_state(self) -> None:
        self._turn = 0

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        start = self._turn % len(ordered)
        self._turn += 1
        metrics.ROUTING_DECISIONS.labels(reason="round_robin").inc()
        # The next replica first; the rest only if its queue is full.
        return [[ordered[start]], ordered[start + 1:] + ordered[:start]]


def _generate_request(pending: PendingRequest | None) -> GenerateRequest | None:
    if pending is None:
        return None
    for arg in (*pending.args, *pending.kwargs.values()):
        if isinstance(arg, GenerateRequest):
            return arg
    return None
