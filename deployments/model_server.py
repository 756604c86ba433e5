"""The model deployment: one AsyncLLMEngine per replica, token ids in, output chunks out."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import torch
from ray import serve

from deployments.config import AppConfig
from deployments.page_pulls import PagePuller, PullCosts
from deployments.prefix_index import PrefixIndexPublisher
from deployments.protocol import ExportRequest, GenerateChunk, GenerateRequest
from worker.engine.async_engine import AsyncLLMEngine
from worker.engine.llm_engine import LLMEngine
from worker.wire import PagePayload

logger = logging.getLogger(__name__)


@serve.deployment(name="ModelServer", health_check_period_s=5)
class ModelServer:
    async def __init__(self, config: dict):  # async: Serve runs it on the replica's event loop
        app = AppConfig.model_validate(config)
        if app.model.cpu_threads:
            torch.set_num_threads(app.model.cpu_threads)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.stuck_step_s = app.model.stuck_step_timeout_s
        self.publisher = None
        if app.redis.url and app.model.engine.enable_prefix_caching:
            self.publisher = PrefixIndexPublisher(app.redis, app.model_key, self.replica)
        listener = self.publisher.on_page_event if self.publisher else None
        self.engine = AsyncLLMEngine(LLMEngine(app.model.engine, page_listener=listener))
        if self.publisher is not None:
            publisher = self.publisher
            publisher.start(
                snapshot=lambda: self.engine.call(
                    lambda e: publisher.take_snapshot(e.block_manager.hashes_by_tier())),
                # Stamped on the engine thread: routers count what they sent after it.
                load=lambda: self.engine.call(
                    lambda e: {**e.load_figures(), **self._pull_figures(),
                               "at_ms": int(time.time() * 1000)}))
        self.puller = None
        pulls = app.routing.peer_pulls
        exchange = self.engine.engine.page_exchange
        if exchange is not None and pulls.mode != "off":
            costs = None
            if pulls.mode == "auto":
                costs = await PullCosts.measure(self.engine, exchange.payload_bytes)
            self.puller = PagePuller(self.engine, pulls, costs)
        logger.info("model replica ready", extra={"replica": self.replica,
                                                  "model": self.engine.engine.model_name})

    def _pull_figures(self) -> dict[str, int]:
        return self.puller.figures() if self.puller is not None else {}

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Streams chunks; the first one is yielded as soon as the first token exists."""
        prompt = request.prompt
        if request.pull is not None and self.puller is not None \
                and request.pull.holder != self.replica:
            await self.puller.pull(prompt.page_hashes[:request.pull.pages], request.pull.holder)
        unfinished = request.params.n
        async for out in self.engine.generate(prompt.token_ids, request.params,
                                              request.request_id, tuple(prompt.mm_inputs)):
            reason = out.finish_reason.value if out.finish_reason else None
            unfinished -= out.finished
            if not unfinished and self.publisher is not None:
                # Routers see this request's load gone before the client's next turn comes.
                self.publisher.publish_soon()
            # load_figures only counts (lengths of the engine's queues and page lists): read
            # here rather than through engine.call, which would hold the last chunk for a step.
            yield GenerateChunk(self.replica, out.delta, out.new_token_ids, reason,
                                out.usage.prompt_tokens, out.usage.completion_tokens,
                                out.usage.cached_tokens, out.logprobs, out.index,
                                self.engine.engine.load_figures() if not unfinished else None,
                                out.prompt_logprobs)

    async def export_pages(self, request: ExportRequest) -> list[PagePayload]:
        """The leading pages of request.page_hashes this replica holds, for a peer to pull."""
        return await self.engine.call(
            lambda e: e.page_exchange.export(request.page_hashes) if e.page_exchange else [])

    async def check_health(self) -> None:
        """Serve restarts the replica when its engine loop has died or a step hangs; a long
        step in progress is healthy (the check does not wait for it)."""
        self.engine.check_alive(self.stuck_step_s)

    async def __del__(self):
        if self.publisher is not None:
            await self.publisher.stop()
        self.engine.shutdown()
