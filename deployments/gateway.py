"""What both front doors (OpenAI HTTP and gRPC) share: preprocess, route, stream, classify errors.

`ModelGateway.start` returns only once the first chunk exists, so a request that is rejected
(context overflow, bad token ids, no replica) fails with a status code, never mid-stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from deployments import metrics
from deployments.protocol import GenerateChunk, GenerateRequest, PreparedPrompt, Usage
from preprocess import MediaError
from worker.errors import EngineDeadError, InvalidRequestError, MSAServeError
from worker.wire import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class ApiError(Exception):
    """An error as a client sees it: HTTP status, gRPC code, OpenAI error type and message."""

    status: int
    grpc_code: grpc.StatusCode
    error_type: str
    message: str
    code: str | None = None

    def __str__(self) -> str:
        return self.message


def invalid(message: str, code: str | None = None) -> ApiError:
    return ApiError(400, grpc.StatusCode.INVALID_ARGUMENT, "invalid_request_error", message, code)


def classify(exc: BaseException) -> ApiError:
    """Maps anything raised while serving a request to what the client is told."""
    if isinstance(exc, RayTaskError) and exc.cause is not None:
        exc = exc.cause
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, (InvalidRequestError, MediaError)):
        return invalid(str(exc))
    if isinstance(exc, (EngineDeadError, RayActorError, DeploymentUnavailableError,
                        BackPressureError)):
        return ApiError(503, grpc.StatusCode.UNAVAILABLE, "service_unavailable",
                        f"the model replica serving this request failed or is overloaded; "
                        f"retry ({type(exc).__name__})")
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return ApiError(504, grpc.StatusCode.DEADLINE_EXCEEDED, "timeout",
                        "the request timed out")
    if isinstance(exc, MSAServeError):
        return ApiError(500, grpc.StatusCode.INTERNAL, "server_error", str(exc))
    logger.exception("unexpected error while serving a request", exc_info=exc)
    return ApiError(500, grpc.StatusCode.INTERNAL, "server_error",
                    f"internal error ({type(exc).__name__}); see the server log")


class ChunkStream:
    """A request's chunks (the first one already received; with n > 1 its samples'
    interleaved), with TTFT/TPOT/usage metrics."""

    def __init__(self, api: str, first: GenerateChunk, rest: DeploymentResponseGenerator,
                 arrived: float, num_samples: int):
        self.api = api
        self.first = first
        self.replica = first.replica
        self.last: dict[int, GenerateChunk] = {first.index: first}  # each sample's latest
        self._rest = rest
        self._first_at = time.perf_counter()
        self._unfinished = num_samples - (first.finish_reason is not None)
        metrics.TTFT.labels(api=api).observe(self._first_at - arrived)

    @property
    def usage(self) -> Usage:
        return Usage.of(list(self.last.values()))

    def cancel(self) -> None:
        """Stops the request's work on its replica (a stream never iterated)."""
        self._rest.cancel()

    async def __aiter__(self) -> AsyncIterator[GenerateChunk]:
        chunk = self.first
        try:
            yield chunk
            while self._unfinished:
                chunk = await self._rest.__anext__()
                self.last[chunk.index] = chunk
                self._unfinished -= chunk.finish_reason is not None
                yield chunk
        finally:
            if self._unfinished:  # the client left or the replica failed: stop the work there
                self._rest.cancel()
        usage = self.usage
        metrics.record_usage(usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens)
        if chunk.replica_load is not None:
            metrics.set_replica_load(self.replica, chunk.replica_load)
        tokens = max(last.completion_tokens for last in self.last.values())
        if tokens > 1:
            metrics.TPOT.labels(api=self.api).observe(
                (time.perf_counter() - self._first_at) / (tokens - 1))


class PromptStreams:
    """A completions batch's streams as one (a single prompt's stream passes through): prompt
    i's sample j is choice i x `stride` + j, chunks come in arrival order, usage is summed."""

    def __init__(self, streams: list[ChunkStream], stride: int):
        self.streams, self.stride = streams, stride

    @property
    def replica(self) -> str:
        return ",".join(dict.fromkeys(stream.replica for stream in self.streams))

    @property
    def usage(self) -> Usage:
        parts = [stream.usage for stream in self.streams]
        return Usage(sum(u.prompt_tokens for u in parts), sum(u.completion_tokens for u in parts),
                     sum(u.cached_tokens for u in parts))

    @property
    def last(self) -> dict[int, GenerateChunk]:
        return {i * self.stride + index: chunk for i, stream in enumerate(self.streams)
                for index, chunk in stream.last.items()}

    async def __aiter__(self) -> AsyncIterator[GenerateChunk]:
        if len(self.streams) == 1:
            async for chunk in self.streams[0]:
                yield chunk
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream: ChunkStream) -> None:
            try:
                async for chunk in stream:
                    queue.put_nowait(dataclasses.replace(chunk,
                                                         index=i * self.stride + chunk.index))
                queue.put_nowait(None)
            except Exception as exc:  # the request fails as a whole, with this error
                queue.put_nowait(exc)

        tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(self.streams)]
        try:
            finished = 0
            while finished < len(tasks):
                item = await queue.get()
                if item is None:
                    finished += 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:  # the client left or one prompt failed: the others' work stops too
            for task in tasks:
                task.cancel()


def text_bytes(messages: list[dict[str, Any]] | None, prompt: str | list[int] | None) -> int:
    """UTF-8 bytes of a request's text (message contents and text parts, or a text prompt)."""
    if isinstance(prompt, str):
        return len(prompt.encode())
    total = 0
    for message in messages or ():
        content = message.get("content")
        parts = [content] if isinstance(content, str) else [
            part.get("text") for part in content or () if isinstance(part, dict)]
        total += sum(len(text.encode()) for text in parts if isinstance(text, str))
    return total


@dataclass(frozen=True)
class PromptLimit:
    """The model's context, and the text size beyond which no prompt can fit it."""

    context_tokens: int
    max_text_bytes: int

    def check(self, messages: list[dict[str, Any]] | None, prompt: str | list[int] | None):
        size = text_bytes(messages, prompt)
        if size > self.max_text_bytes:
            raise invalid(
                f"the prompt's text is {size} bytes; this model's context is "
                f"{self.context_tokens} tokens, which no text over {self.max_text_bytes} bytes "
                f"fits: shorten the prompt", "context_length_exceeded")
        if isinstance(prompt, list) and len(prompt) >= self.context_tokens:
            raise invalid(f"the prompt has {len(prompt)} tokens; this model's context is "
                          f"{self.context_tokens} tokens", "context_length_exceeded")


class ModelGateway:
    def __init__(self, preprocessor: DeploymentHandle, model: DeploymentHandle, salt: str,
                 limit: PromptLimit):
        self._preprocessor = preprocessor
        self._model = model.options(stream=True)
        self._salt = salt  # the model's fingerprint, for hashing token-id prompts here
        self._limit = limit

    async def prepare(self, messages: list[dict[str, Any]] | None = None,
                      prompt: str | list[int] | None = None,
                      template_kwargs: dict[str, Any] | None = None) -> PreparedPrompt:
        """Text goes through the preprocess tier; token ids skip that hop. Prompts that cannot
        fit the context are refused here, before anything tokenizes them."""
        self._limit.check(messages, prompt)
        try:
            if messages is not None:
                return await self._preprocessor.prepare_chat.remote(messages, template_kwargs)
            if isinstance(prompt, str):
                return await self._preprocessor.prepare_text.remote(prompt)
            return PreparedPrompt.from_token_ids(list(prompt), self._salt)
        except Exception as exc:
            raise classify(exc) from None

    async def start(self, api: str, prompt: PreparedPrompt, params: SamplingParams,
                    arrived: float) -> ChunkStream:
        request = GenerateRequest(uuid.uuid4().hex, prompt, params)
        responses = self._model.generate.remote(request)
        try:
            first = await responses.__anext__()
        except BaseException as exc:
            responses.cancel()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise classify(exc) from None
        return ChunkStream(api, first, responses, arrived, params.n)
