"""The ingress deployment: the OpenAI-compatible HTTP API and the gRPC service, on Ray Serve.

HTTP routes are a FastAPI app (`/v1/chat/completions`, `/v1/completions`, `/v1/models`,
vLLM's `/tokenize`, `/detokenize` and `/tokenizer_info`, `/health`, `/metrics`); the gRPC
methods (`msa_serve.v1.MSAServe`) are methods of the same class, reached through Serve's gRPC
proxy. Both go through one `ModelGateway`.

No `from __future__ import annotations` here: FastAPI reads the route signatures at run time, and
Serve pickles the class when it is decorated, so every helper it uses is defined above it.
"""

import asyncio
import dataclasses
import hmac
import json
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments import metrics
from deployments.config import AppConfig
from deployments.gateway import (
    ApiError,
    ChunkStream,
    ModelGateway,
    PromptLimit,
    PromptStreams,
    classify,
    invalid,
)
from deployments.openai_api import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ResponseFormat,
    ResponseWriter,
    SampleOutput,
    TokenizeRequest,
    best_samples,
    error_body,
    parse_request,
    validate_messages,
)
from deployments.prefix_index import PrefixIndexLookup
from deployments.proto import msa_serve_pb2 as pb
from deployments.protocol import Usage
from deployments.tool_calls import tool_call_format
from preprocess.sources import data_url
from worker.checkpoint import inspect_model
from worker.wire import GuidedDecoding, SamplingParams

logger = logging.getLogger(__name__)

def _grpc_finish(reason: str | None) -> str:
    return {"length": "length", None: ""}.get(reason, "stop")


def _grpc_usage(usage: Usage) -> pb.Usage:
    return pb.Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                    cached_tokens=usage.cached_tokens)


def _grpc_constraint(options: pb.SamplingOptions) -> GuidedDecoding | None:
    """SamplingOptions' structured output, read as HTTP's response_format."""
    kind = options.WhichOneof("constraint")
    if kind is None or (kind == "json_object" and not options.json_object):
        return None
    if kind == "json_schema":
        try:
            fields = {"json_schema": {"schema": json.loads(options.json_schema)}}
        except ValueError as exc:
            raise invalid(f"json_schema is not JSON text: {exc}") from None
    else:
        fields = {} if kind == "json_object" else {kind: getattr(options, kind)}
    return ResponseFormat(type=kind, **fields).guided()


def _grpc_message(message: pb.ChatMessage) -> dict[str, Any]:
    """A gRPC chat message as the OpenAI-style dict the preprocess tier reads."""
    if not message.parts:
        return {"role": message.role, "content": message.content}
    return {"role": message.role, "content": [_grpc_part(p) for p in message.parts]}


def _grpc_part(part: pb.ContentPart) -> dict[str, Any]:
    kind = part.WhichOneof("part")
    if kind is None:
        raise invalid("a content part must set text, image or video")
    if kind == "text":
        return {"type": "text", "text": part.text}
    media = getattr(part, kind)
    if media.WhichOneof("source") == "data":
        url = data_url(media.data, media.mime_type or "application/octet-stream")
    else:
        url = media.url
    return {"type": f"{kind}_url", f"{kind}_url": {"url": url}}


def _grpc_error(exc: BaseException, grpc_context, api_name: str) -> BaseException:
    """Sets the status on Serve's gRPC context; Serve sends it when the method raises."""
    if isinstance(exc, asyncio.CancelledError):
        return exc
    error = classify(exc)
    if grpc_context is not None:
        grpc_context.set_code(error.grpc_code)
        grpc_context.set_details(error.message)
    metrics.REQUESTS.labels(api=api_name, status=error.grpc_code.name).inc()
    return error


async def _sse(writer: ResponseWriter, stream: ChunkStream | PromptStreams, include_usage: bool,
               usage_in_every_chunk: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's shape; a failure mid-stream becomes an error event."""
    try:
        async for chunk in stream:
            yield _event(writer.stream_chunk(chunk, stream.usage if usage_in_every_chunk
                                             else None))
        if include_usage:
            yield _event(writer.usage_chunk(stream.usage))
    except Exception as exc:
        error = classify(exc)
        yield _event(error_body(error.message, error.error_type, error.code))
    yield "data: [DONE]\n\n"


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


# No interactive docs or schema routes: they would answer without an API key, and the API is
# OpenAI's, documented in the README.
api = FastAPI(title="msa-serve", description="OpenAI-compatible API for MSA models",
              docs_url=None, redoc_url=None, openapi_url=None)
ROUTES = ("POST /v1/chat/completions, POST /v1/completions, GET /v1/models, POST /tokenize, "
          "POST /detokenize, GET /tokenizer_info, GET /health, GET /metrics")


@api.exception_handler(StarletteHTTPException)
async def _route_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes and methods answer in OpenAI's error shape, as every other error does."""
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}; this server answers {ROUTES}"
        body = error_body(message, "invalid_request_error", "not_found")
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}; routes: {ROUTES}"
        body = error_body(message, "invalid_request_error", "method_not_allowed")
    else:
        body = error_body(str(exc.detail), "invalid_request_error")
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, preprocessor: DeploymentHandle, model: DeploymentHandle, config: dict):
        self.config = AppConfig.model_validate(config)
        info = inspect_model(self.config.model.engine.model,
                             self.config.model.engine.served_model_name)
        self.model_name = info.name
        self.tokenizer = info.tokenizer
        self.reasoning_markers = info.reasoning_markers
        self.tool_format = tool_call_format(self.tokenizer.chat_template)
        self.api_keys = self.config.resolved_api_keys()
        engine = self.config.model.engine
        self.context = min(engine.max_model_len or info.config.max_position_embeddings,
                           info.config.max_position_embeddings)
        limit = PromptLimit(self.context, self.tokenizer.max_prompt_bytes(self.context))
        self.max_body_bytes = self.config.limits.body_bytes(limit.max_text_bytes,
                                                            info.config.vision is not None)
        self.gateway = ModelGateway(preprocessor, model, info.fingerprint, limit)
        redis = self.config.redis
        self.loads = PrefixIndexLookup(redis, self.config.model_key) if redis.url else None

    # -- shared checks --------------------------------------------------------------------------
    def _authorize(self, authorization: str | None) -> None:
        if not self.api_keys:
            return
        scheme, _, token = (authorization or "").partition(" ")
        # Constant-time comparisons: response timing must not reveal a key's prefix.
        known = any(hmac.compare_digest(token.strip().encode(), key.encode())
                    for key in self.api_keys)
        if scheme.lower() != "bearer" or not known:
            raise ApiError(401, grpc.StatusCode.UNAUTHENTICATED, "authentication_error",
                           "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           "invalid_api_key")

    def _grpc_authorize(self, grpc_context) -> None:
        metadata = dict(grpc_context.invocation_metadata()) if grpc_context else {}
        self._authorize(metadata.get("authorization"))

    def _check_model(self, model: str) -> None:
        if model and model != self.model_name:
            raise ApiError(404, grpc.StatusCode.NOT_FOUND, "invalid_request_error",
                           f"the model {model!r} does not exist; this server serves "
                           f"{self.model_name!r}", "model_not_found")

    def _sampling(self, request, logprobs: int | None) -> SamplingParams:
        limits = self.config.limits
        return request.sampling_params(limits.default_max_tokens, limits.max_tokens, logprobs)

    async def _read_body(self, request: Request) -> bytes:
        limit = self.max_body_bytes
        too_large = ApiError(413, grpc.StatusCode.RESOURCE_EXHAUSTED, "invalid_request_error",
                             f"the request body exceeds {limit} bytes (limits.max_body_bytes)",
                             "request_too_large")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise too_large
        return bytes(body)

    # -- HTTP -------------------------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/metrics")
    async def metrics_endpoint(self, request: Request) -> Response:
        # Replica ids, traffic and KV load: behind the API key like everything but /health.
        return await self._http("metrics", request, self._metrics_body)

    async def _metrics_body(self, request: Request) -> Response:
        # Redis lists every live replica; while it is unreachable the figures the replicas
        # sent with their last answers stay.
        loads = await self.loads.replica_loads() if self.loads is not None else None
        if loads is not None:
            metrics.set_replica_loads(loads)
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> Response:
        return await self._http("models", request, self._models_body)

    async def _models_body(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": 0, "owned_by": "msa-serve"}]})

    # vLLM's tokenizer routes: lm-eval and other tools take the model's tokenizer from them.
    @api.post("/tokenize")
    async def tokenize(self, request: Request) -> Response:
        return await self._http("tokenize", request, self._tokenize)

    async def _tokenize(self, request: Request) -> Response:
        body = parse_request(TokenizeRequest, await self._read_body(request))
        self._check_model(body.model)
        ids = await asyncio.to_thread(body.token_ids, self.tokenizer)  # off the event loop
        result: dict[str, Any] = {"count": len(ids), "max_model_len": self.context,
                                  "tokens": ids}
        if body.return_token_strs:
            result["token_strs"] = [self.tokenizer.backend.id_to_token(i) for i in ids]
        return JSONResponse(result)

    @api.post("/detokenize")
    async def detokenize(self, request: Request) -> Response:
        return await self._http("detokenize", request, self._detokenize)

    async def _detokenize(self, request: Request) -> Response:
        body = parse_request(DetokenizeRequest, await self._read_body(request))
        self._check_model(body.model)
        return JSONResponse({"prompt": await asyncio.to_thread(body.text, self.tokenizer)})

    @api.get("/tokenizer_info")
    async def tokenizer_info(self, request: Request) -> Response:
        return await self._http("tokenizer_info", request, self._tokenizer_info)

    async def _tokenizer_info(self, request: Request) -> Response:
        return JSONResponse(self.tokenizer.hf_config(self.context))

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._http("chat", request, self._chat)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._http("completion", request, self._completion)

    async def _http(self, api_name: str, request: Request, handler) -> Response:
        try:
            self._authorize(request.headers.get("authorization"))
            response = await handler(request)
        except Exception as exc:
            error = classify(exc)
            metrics.REQUESTS.labels(api=api_name, status=str(error.status)).inc()
            return JSONResponse(error_body(error.message, error.error_type, error.code),
                                status_code=error.status)
        metrics.REQUESTS.labels(api=api_name, status=str(response.status_code)).inc()
        return response

    async def _chat(self, request: Request) -> Response:
        arrived = time.perf_counter()
        body = parse_request(ChatCompletionRequest, await self._read_body(request))
        self._check_model(body.model)
        params = self._sampling(body, body.num_logprobs)
        if body.uses_tools and self.tool_format is None:
            raise invalid(f"{self.model_name}'s chat template has no tool-call format this "
                          f"server can parse; send the request without tools",
                          "tools_not_supported")
        messages = [m.template_dict() for m in body.messages]
        prompt = await self.gateway.prepare(messages=messages,
                                            template_kwargs=body.template_kwargs)
        if body.uses_tools:
            params = dataclasses.replace(params, guided=body.tool_constraint(
                self.tool_format, prompt.opens_reasoning))
        stream = await self.gateway.start("chat", prompt, params, arrived)
        writer = ResponseWriter("chat", f"chatcmpl-{uuid.uuid4().hex}", self.model_name,
                                self.tokenizer, body.logprobs, self.reasoning_markers,
                                prompt.opens_reasoning,
                                body.tool_schemas if body.uses_tools else None,
                                with_prompt_logprobs=body.prompt_logprobs is not None)
        return await self._respond(writer, stream, body)

    async def _completion(self, request: Request) -> Response:
        arrived = time.perf_counter()
        body = parse_request(CompletionRequest, await self._read_body(request))
        self._check_model(body.model)
        # best_of ranks samples by their log-probability: the engine reports it then.
        logprobs = 0 if body.picks_best and body.logprobs is None else body.logprobs
        params = self._sampling(body, logprobs)
        # Every prompt of a batch is checked before any starts.
        prompts = [await self.gateway.prepare(prompt=prompt) for prompt in body.prompts]
        streams: list[ChunkStream] = []
        try:
            for prompt in prompts:
                streams.append(await self.gateway.start("completion", prompt, params, arrived))
        except BaseException:
            for stream in streams:
                stream.cancel()
            raise
        writer = ResponseWriter("completion", f"cmpl-{uuid.uuid4().hex}",
                                self.model_name, self.tokenizer, body.logprobs is not None,
                                echo=[prompt.token_ids for prompt in prompts] if body.echo
                                else None, samples_per_prompt=body.num_samples,
                                with_prompt_logprobs=body.prompt_logprobs is not None)
        return await self._respond(writer, PromptStreams(streams, body.num_samples), body)

    async def _respond(self, writer: ResponseWriter, stream: ChunkStream | PromptStreams,
                       body) -> Response:
        headers = {"x-msa-replica": stream.replica}
        if body.stream:
            return StreamingResponse(_sse(writer, stream, body.include_usage_in_stream,
                                          body.usage_in_every_chunk),
                                     headers=headers, media_type="text/event-stream")
        texts: dict[int, list[str]] = {}
        logprobs: dict[int, list] = {}
        prompt_logprobs: dict[int, list] = {}
        async for chunk in stream:
            texts.setdefault(chunk.index, []).append(chunk.delta)
            logprobs.setdefault(chunk.index, []).extend(chunk.logprobs)
            if chunk.prompt_logprobs is not None:
                prompt_logprobs[chunk.index] = chunk.prompt_logprobs
        samples = [SampleOutput(index, "".join(texts[index]),
                                stream.last[index].finish_reason, logprobs[index],
                                index // body.num_samples, prompt_logprobs.get(index))
                   for index in sorted(texts)]
        if body.num_samples > body.n:  # the likeliest n of each prompt's samples
            stride = body.num_samples
            samples = [best for start in range(0, len(samples), stride)
                       for best in best_samples(samples[start:start + stride], body.n,
                                                start // stride * body.n)]
        return JSONResponse(writer.whole(samples, stream.usage), headers=headers)

    # -- gRPC (method names are the RPC names of msa_serve.v1.MSAServe) --------------------------
    async def Generate(self, request: pb.GenerateRequest,
                       grpc_context=None) -> AsyncIterator[pb.GenerateResponse]:
        try:
            stream = await self._grpc_start(request, grpc_context, messages=None)
            async for chunk in stream:
                yield pb.GenerateResponse(text=chunk.delta, token_ids=chunk.token_ids,
                                          finish_reason=_grpc_finish(chunk.finish_reason),
                                          usage=_grpc_usage(stream.usage), replica=chunk.replica,
                                          index=chunk.index)
        except Exception as exc:
            raise _grpc_error(exc, grpc_context, "grpc_generate") from None

    async def Chat(self, request: pb.ChatRequest, grpc_context=None) -> pb.ChatResponse:
        try:
            messages = validate_messages([_grpc_message(m) for m in request.messages])
            stream = await self._grpc_start(request, grpc_context, messages=messages)
            texts: dict[int, list[str]] = defaultdict(list)
            async for chunk in stream:
                texts[chunk.index].append(chunk.delta)
        except Exception as exc:
            raise _grpc_error(exc, grpc_context, "grpc_chat") from None
        choices = [pb.ChatChoice(index=index, finish_reason=_grpc_finish(last.finish_reason),
                                 message=pb.ChatMessage(role="assistant",
                                                        content="".join(texts[index])))
                   for index, last in sorted(stream.last.items())]
        return pb.ChatResponse(message=choices[0].message, finish_reason=choices[0].finish_reason,
                               usage=_grpc_usage(stream.usage), replica=stream.replica,
                               choices=choices)

    async def ListModels(self, request: pb.ListModelsRequest,
                         grpc_context=None) -> pb.ListModelsResponse:
        try:
            self._grpc_authorize(grpc_context)
        except Exception as exc:
            raise _grpc_error(exc, grpc_context, "grpc_list_models") from None
        return pb.ListModelsResponse(models=[self.model_name])

    async def Health(self, request: pb.HealthRequest, grpc_context=None) -> pb.HealthResponse:
        return pb.HealthResponse(ok=True, status="ok")

    async def Tokenize(self, request: pb.TokenizeRequest,
                       grpc_context=None) -> pb.TokenizeResponse:
        try:
            self._grpc_authorize(grpc_context)
            fields: dict[str, Any] = {"model": request.model}
            if request.text:
                fields["prompt"] = request.text
            if request.messages:
                fields["messages"] = [_grpc_message(m) for m in request.messages]
            if request.HasField("add_special_tokens"):
                fields["add_special_tokens"] = request.add_special_tokens
            body = parse_request(TokenizeRequest, fields)
            self._check_model(body.model)
            ids = await asyncio.to_thread(body.token_ids, self.tokenizer)
        except Exception as exc:
            raise _grpc_error(exc, grpc_context, "grpc_tokenize") from None
        return pb.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=self.context)

    async def Detokenize(self, request: pb.DetokenizeRequest,
                         grpc_context=None) -> pb.DetokenizeResponse:
        try:
            self._grpc_authorize(grpc_context)
            body = DetokenizeRequest(model=request.model, tokens=list(request.tokens))
            self._check_model(body.model)
            text = await asyncio.to_thread(body.text, self.tokenizer)
        except Exception as exc:
            raise _grpc_error(exc, grpc_context, "grpc_detokenize") from None
        return pb.DetokenizeResponse(text=text)

    async def _grpc_start(self, request, grpc_context,
                          messages: list[dict[str, str]] | None) -> ChunkStream:
        arrived = time.perf_counter()
        self._grpc_authorize(grpc_context)
        self._check_model(request.model)
        params = self._grpc_sampling(request.sampling)
        if messages is not None:
            prompt = await self.gateway.prepare(messages=messages)
        elif request.WhichOneof("prompt") == "token_ids":
            prompt = await self.gateway.prepare(prompt=list(request.token_ids.ids))
        elif request.text:
            prompt = await self.gateway.prepare(prompt=request.text)
        else:
            raise invalid("the prompt is empty: set text or token_ids")
        api_name = "grpc_chat" if messages is not None else "grpc_generate"
        stream = await self.gateway.start(api_name, prompt, params, arrived)
        metrics.REQUESTS.labels(api=api_name, status="OK").inc()
        return stream

    def _grpc_sampling(self, options: pb.SamplingOptions) -> SamplingParams:
        limits = self.config.limits
        max_tokens = (options.max_tokens if options.HasField("max_tokens")
                      else limits.default_max_tokens)
        if max_tokens > limits.max_tokens:
            raise invalid(f"max_tokens is {max_tokens}; this server allows at most "
                          f"{limits.max_tokens}")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=options.temperature if options.HasField("temperature") else 1.0,
            top_p=options.top_p if options.HasField("top_p") else 1.0,
            top_k=options.top_k, seed=options.seed if options.HasField("seed") else None,
            stop=list(options.stop), ignore_eos=options.ignore_eos,
            n=options.n if options.HasField("n") else 1, guided=_grpc_constraint(options))
