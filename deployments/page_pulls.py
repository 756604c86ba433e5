"""A model replica pulling a request's prefix pages from the peer replica that holds them.

The router marks a request it sends away from the replica holding its prefix (`PullHint`). The
chosen replica then asks the holder for the pages it lacks (`ExportRequest`, through the model
deployment's own handle, which every router sends to its target alone) and imports them into
its host tier, from where the request's prefix hit copies them to the device. Pulling happens
only when it is measured to cost less than recomputing (mode auto), and any failure (the holder
gone, slow past `timeout_s`, a page refused) leaves the request to recompute what is missing:
the client never sees a pull fail.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import ray
from ray import serve

from deployments.config import PeerPulls
from deployments.protocol import ExportRequest
from worker.engine.async_engine import AsyncLLMEngine
from worker.wire import BLOCK_SIZE

logger = logging.getLogger(__name__)


class PullCosts:
    """Seconds per page, pulled against recomputed. Recomputing is measured at start (a timed
    prefill); pulling is first estimated by a page's round trip through Ray's object store and
    then follows the pulls made (a moving average). A failed pull counts the time it wasted and
    the recomputation that followed, so pulls from a slow or dying peer stop; with no pulls to
    observe, the estimate drifts back to the first one (half of the way every
    RECOVERY_HALF_LIFE_S), so they are tried again later.

    `credit` is the share of a page's recomputation a pull saves: what the replica publishes
    for routers to credit a peer's pages with (`deployments/router.py`)."""

    SMOOTHING = 0.3
    RECOVERY_HALF_LIFE_S = 60.0

    def __init__(self, recompute_s_per_page: float, pull_s_per_page: float,
                 clock=time.monotonic):
        self.recompute_s_per_page = recompute_s_per_page
        self.first_pull_s_per_page = pull_s_per_page
        self._observed = pull_s_per_page
        self._clock = clock
        self._observed_at = clock()

    @classmethod
    async def measure(cls, engine: AsyncLLMEngine, page_bytes: int) -> PullCosts:
        per_token = await engine.call(lambda e: e.measure_prefill_cost())
        page = np.ones(page_bytes, dtype=np.uint8)
        trips = []
        for _ in range(3):
            started = time.perf_counter()
            ray.get(ray.put(page))
            trips.append(time.perf_counter() - started)
        costs = cls(per_token * BLOCK_SIZE, min(trips))
        logger.info("peer pulls: recompute %.2f ms/page, pull %.2f ms/page (first estimate)",
                    costs.recompute_s_per_page * 1e3, costs.pull_s_per_page * 1e3)
        return costs

    @property
    def pull_s_per_page(self) -> float:
        idle = self._clock() - self._observed_at
        weight = 0.5 ** (idle / self.RECOVERY_HALF_LIFE_S)
        return self.first_pull_s_per_page + weight * (self._observed
                                                      - self.first_pull_s_per_page)

    @property
    def pull_is_cheaper(self) -> bool:
        return self.pull_s_per_page < self.recompute_s_per_page

    @property
    def credit(self) -> float:
        return max(0.0, 1.0 - self.pull_s_per_page / self.recompute_s_per_page)

    def observe(self, pages: int, seconds: float) -> None:
        if pages:
            current = self.pull_s_per_page
            self._observed = current + self.SMOOTHING * (seconds / pages - current)
            self._observed_at = self._clock()

    def observe_failure(self, pages: int, seconds: float) -> None:
        """A pull of `pages` that failed after `seconds`: they are recomputed on top."""
        self.observe(pages, seconds + pages * self.recompute_s_per_page)


class PagePuller:
    def __init__(self, engine: AsyncLLMEngine, settings: PeerPulls, costs: PullCosts | None):
        self.engine = engine
        self.settings = settings
        self.costs = costs  # None with mode "always"
        self._peers = None  # the model deployment's handle, made at the first pull

    def figures(self) -> dict[str, int]:
        """What this replica publishes beside its load for routers: the share of a page's
        recomputation its pulls save, in percent (none where pulls are not measured)."""
        if self.costs is None:
            return {}
        return {"pull_credit_pct": round(100 * self.costs.credit)}

    async def pull(self, page_hashes: list[str], holder: str) -> int:
        """Pulls the pages of the chain this replica lacks from `holder`: how many it took."""
        held = await self.engine.call(
            lambda e: e.block_manager.num_leading_cached(page_hashes))
        wanted = page_hashes[held:]
        if not wanted or (self.costs is not None and not self.costs.pull_is_cheaper):
            return 0
        started = time.perf_counter()
        try:
            payloads = await asyncio.wait_for(self._export(ExportRequest(holder, wanted)),
                                              self.settings.timeout_s)
            result = await self.engine.call(lambda e: e.page_exchange.import_(wanted, payloads))
        except Exception as exc:  # any failure: the request recomputes instead
            logger.warning("pulling %d pages from replica %s failed (%r); recomputing them",
                           len(wanted), holder, exc)
            if self.costs is not None:
                self.costs.observe_failure(len(wanted), time.perf_counter() - started)
            return 0
        if self.costs is not None:
            self.costs.observe(len(payloads), time.perf_counter() - started)
        if result.refused:
            logger.warning("refused %d pages from replica %s: their bytes do not match their "
                           "digest; recomputing them", result.refused, holder)
        return result.accepted

    async def _export(self, request: ExportRequest):
        if self._peers is None:
            context = serve.get_replica_context()
            self._peers = serve.get_deployment_handle(context.deployment, context.app_name)
        return await self._peers.export_pages.remote(request)
