"""A gRPC client for msa-serve (`msa_serve.v1.MSAServe`); `msa-serve client ...` wraps it.

    with MSAServeClient("127.0.0.1:9000") as client:
        for piece in client.generate("Once upon a time", max_tokens=32):
            print(piece.text, end="")
        reply = client.chat([{"role": "user", "content": "Hi"}])
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from deployments.proto import msa_serve_pb2 as pb
from deployments.proto.msa_serve_pb2_grpc import MSAServeStub


def sampling_options(max_tokens: int | None = None, temperature: float | None = None,
                     top_p: float | None = None, top_k: int | None = None,
                     seed: int | None = None, stop: Sequence[str] = (),
                     ignore_eos: bool = False, n: int | None = None,
                     json_object: bool = False, json_schema: dict[str, Any] | None = None,
                     regex: str | None = None, grammar: str | None = None
                     ) -> pb.SamplingOptions:
    """`json_object`, `json_schema` (a schema), `regex` and `grammar` (EBNF) constrain the
    reply, as HTTP's response_format does; give at most one."""
    constraints = {"json_object": json_object or None,
                   "json_schema": None if json_schema is None else json.dumps(json_schema),
                   "regex": regex, "grammar": grammar}
    constraints = {k: v for k, v in constraints.items() if v is not None}
    if len(constraints) > 1:
        raise ValueError(f"give at most one constraint, got {sorted(constraints)}")
    options = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
               "top_k": top_k, "seed": seed, "n": n, **constraints}
    return pb.SamplingOptions(**{k: v for k, v in options.items() if v is not None},
                              stop=list(stop), ignore_eos=ignore_eos)


def chat_message(message: dict[str, Any]) -> pb.ChatMessage:
    content = message.get("content") or ""
    if isinstance(content, str):
        return pb.ChatMessage(role=message["role"], content=content)
    parts = []
    for part in content:
        if "text" in part:
            parts.append(pb.ContentPart(text=part["text"]))
            continue
        kind, source = next(iter(part.items()))
        media = pb.Media(data=source) if isinstance(source, bytes) else pb.Media(url=source)
        parts.append(pb.ContentPart(**{kind: media}))
    return pb.ChatMessage(role=message["role"], parts=parts)


class MSAServeClient:
    def __init__(self, target: str = "127.0.0.1:9000", api_key: str | None = None,
                 timeout_s: float | None = 300.0):
        self.channel = grpc.insecure_channel(target)
        self.stub = MSAServeStub(self.channel)
        self.timeout_s = timeout_s
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def __enter__(self) -> MSAServeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def generate(self, prompt: str | Sequence[int], model: str = "",
                 timeout_s: float | None = None, **sampling) -> Iterator[pb.GenerateResponse]:
        """Streams a raw-prompt completion; raises grpc.RpcError with the server's status."""
        request = pb.GenerateRequest(model=model, sampling=sampling_options(**sampling))
        if isinstance(prompt, str):
            request.text = prompt
        else:
            request.token_ids.ids.extend(prompt)
        yield from self.stub.Generate(request, timeout=timeout_s or self.timeout_s,
                                      metadata=self.metadata)

    def chat(self, messages: Sequence[dict[str, Any]], model: str = "",
             timeout_s: float | None = None, **sampling) -> pb.ChatResponse:
        """messages: {"role", "content"} with content a string or a list of parts
        ({"text": str}, {"image": bytes | url}, {"video": bytes | url})."""
        request = pb.ChatRequest(model=model, sampling=sampling_options(**sampling),
                                 messages=[chat_message(m) for m in messages])
        return self.stub.Chat(request, timeout=timeout_s or self.timeout_s,
                              metadata=self.metadata)

    def list_models(self) -> list[str]:
        reply = self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout_s,
                                     metadata=self.metadata)
        return list(reply.models)

    def health(self) -> bool:
        return self.stub.Health(pb.HealthRequest(), timeout=self.timeout_s,
                                metadata=self.metadata).ok

    def tokenize(self, text: str = "", messages: Sequence[dict[str, Any]] = (),
                 add_special_tokens: bool | None = None, model: str = "") -> list[int]:
        """The server's token ids of a text, or of chat messages as its template renders them."""
        request = pb.TokenizeRequest(model=model, text=text,
                                     messages=[chat_message(m) for m in messages])
        if add_special_tokens is not None:
            request.add_special_tokens = add_special_tokens
        reply = self.stub.Tokenize(request, timeout=self.timeout_s, metadata=self.metadata)
        return list(reply.tokens)

    def detokenize(self, tokens: Sequence[int], model: str = "") -> str:
        return self.stub.Detokenize(pb.DetokenizeRequest(model=model, tokens=list(tokens)),
                                    timeout=self.timeout_s, metadata=self.metadata).text
