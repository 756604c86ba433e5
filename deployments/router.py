"""Replica choice for the model deployment (Ray Serve custom request routers).

They run inside every caller of the model deployment's handle (the ingress replicas, and model
replicas pulling pages from each other). `PrefixAwareRouter` asks Redis which leading prefix
pages each candidate holds, in which tier, and how loaded it is, then sends the request where it
costs least:

    cost = prefill_weight x (prompt blocks - credited cached blocks + queued prefill blocks)
           + decode blocks

the form of NVIDIA Dynamo's KV router. A page on the replica's device counts fully, one in its
host tier `host_credit`, one that another replica holds (and this one can pull) the share of
its recomputation this replica's pulls have been saving (`pull_credit_pct`, which it publishes
with its load: `deployments/page_pulls.PullCosts`), or `peer_credit` until it has published one.
Queued prefill and decode blocks are what the replica last published, plus what this router
sent it since. When the cheapest replica is not the one holding the prefix the request carries
a `PullHint`. When Redis is down or slow it falls back to Serve's power of two choices:
requests never fail because of Redis.

Every router sends an `ExportRequest` (a replica asking a peer for pages) to its target alone.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict, deque
from dataclasses import dataclass

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from deployments import metrics
from deployments.config import RedisSettings, RoutingSettings
from deployments.prefix_index import PrefixIndexLookup, ReplicaView
from deployments.protocol import ExportRequest, GenerateRequest, PullHint
from worker.wire import BLOCK_SIZE

# Requests this router sent a replica stay in its estimate until the replica publishes figures
# counted after them; this long at most, should its figures stop coming.
DISPATCH_MEMORY_S = 10.0


@dataclass
class Choice:
    replica: str
    cost: float
    credited_blocks: float
    pull: PullHint | None


def rank_replicas(prompt_tokens: int, views: dict[str, ReplicaView], costs: RoutingSettings,
                  unpublished_prefill_blocks: dict[str, float]) -> list[Choice]:
    """Every replica with its cost for this request, cheapest first (ties: fewer queued)."""
    prompt_blocks = prompt_tokens / BLOCK_SIZE
    pulls = costs.peer_pulls.mode != "off"
    holder = max(views, key=lambda r: views[r].pages) if views else None
    choices = []
    for replica, view in views.items():
        credited = view.device_pages + costs.host_credit * view.host_pages
        pull = None
        peer_credit = view.load.get("pull_credit_pct", 100 * costs.peer_credit) / 100
        if pulls and peer_credit > 0 and holder != replica and views[holder].pages > view.pages:
            credited += peer_credit * (views[holder].pages - view.pages)
            pull = PullHint(holder, views[holder].pages)
        queued = (view.load.get("prefill_tokens_queued", 0) / BLOCK_SIZE
                  + unpublished_prefill_blocks.get(replica, 0.0))
        cost = (costs.prefill_weight * (prompt_blocks - credited + queued)
                + view.load.get("decode_pages", 0))
        choices.append(Choice(replica, cost, credited, pull))
    return sorted(choices, key=lambda c: (c.cost, views[c.replica].load.get("waiting", 0)))


def export_target(candidates: list[RunningReplica], pending: PendingRequest | None
                  ) -> list[list[RunningReplica]] | None:
    """For a page export, the replica it is for (none while that one is not a candidate: the
    caller's timeout then ends the wait); None for any other request."""
    request = request_argument(pending, ExportRequest)
    if request is None:
        return None
    return [[r for r in candidates if r.replica_id.unique_id == request.target]]


class ModelRouter(FIFOMixin, RequestRouter):
    """What every policy of the model deployment shares: page exports go to their target;
    other requests are the policy's (`choose`)."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if (target := export_target(candidate_replicas, pending_request)) is not None:
            return target
        return await self.choose(candidate_replicas, pending_request)

    async def choose(self, candidate_replicas: list[RunningReplica],
                     pending_request: PendingRequest | None) -> list[list[RunningReplica]]:
        raise NotImplementedError


class PrefixAwareRouter(ModelRouter):
    def initialize_state(self, redis: dict, model_key: str, routing: dict) -> None:
        settings = RedisSettings.model_validate(redis)
        self._index = PrefixIndexLookup(settings, model_key) if settings.url else None
        self._costs = RoutingSettings.model_validate(routing)
        # replica -> (wall time sent, uncached prefill blocks) of requests routed there
        self._sent: dict[str, deque[tuple[float, float]]] = defaultdict(deque)

    async def choose(self, candidate_replicas: list[RunningReplica],
                     pending_request: PendingRequest | None) -> list[list[RunningReplica]]:
        request = request_argument(pending_request, GenerateRequest)
        if request is None or self._index is None:
            return power_of_two(candidate_replicas, "load")
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        views = await self._index.lookup(list(by_id), request.prompt.page_hashes)
        if views is None:
            return power_of_two(candidate_replicas, "redis_unavailable")
        ranked = rank_replicas(len(request.prompt.token_ids), views, self._costs,
                               self._unpublished(views))
        best = ranked[0]
        # The chosen replica reads the hint; a retry of this choice writes it anew.
        request.pull = best.pull
        self._sent[best.replica].append(
            (time.time(), max(0.0, len(request.prompt.token_ids) / BLOCK_SIZE
                              - best.credited_blocks)))
        reason = "pull" if best.pull else "prefix" if best.credited_blocks else "load"
        metrics.ROUTING_DECISIONS.labels(reason=reason).inc()
        return [[by_id[best.replica]], [by_id[c.replica] for c in ranked[1:]]]

    def _unpublished(self, views: dict[str, ReplicaView]) -> dict[str, float]:
        """Prefill blocks sent to each replica after the figures it last published."""
        now = time.time()
        blocks = {}
        for replica, sent in self._sent.items():
            published = views[replica].load.get("at_ms", 0) / 1000 if replica in views else now
            while sent and sent[0][0] < max(published, now - DISPATCH_MEMORY_S):
                sent.popleft()
            blocks[replica] = sum(b for _, b in sent)
        return blocks


class RoundRobinRouter(ModelRouter):
    """Cycles through the replicas whatever the request: the baseline prefix-aware routing beats."""

    def initialize_state(self) -> None:
        self._turn = 0

    async def choose(self, candidate_replicas: list[RunningReplica],
                     pending_request: PendingRequest | None) -> list[list[RunningReplica]]:
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        start = self._turn % len(ordered)
        self._turn += 1
        metrics.ROUTING_DECISIONS.labels(reason="round_robin").inc()
        # The next replica first; the rest only if its queue is full.
        return [[ordered[start]], ordered[start + 1:] + ordered[:start]]


class PowerOfTwoRouter(ModelRouter):
    """Serve's default choice: the shorter queue of two random replicas."""

    async def choose(self, candidate_replicas: list[RunningReplica],
                     pending_request: PendingRequest | None) -> list[list[RunningReplica]]:
        return power_of_two(candidate_replicas, "load")


def power_of_two(replicas: list[RunningReplica], reason: str) -> list[list[RunningReplica]]:
    metrics.ROUTING_DECISIONS.labels(reason=reason).inc()
    # Serve's base router then probes both and picks the shorter queue.
    return [random.sample(replicas, min(2, len(replicas)))]


def request_argument(pending: PendingRequest | None, kind: type):
    if pending is None:
        return None
    for arg in (*pending.args, *pending.kwargs.values()):
        if isinstance(arg, kind):
            return arg
    return None
