"""The OpenAI-compatible wire format: request schemas, response and stream-chunk bodies, errors.

Pure functions and pydantic models; the ingress deployment wires them to the model.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from deployments.protocol import GenerateChunk, Usage
from deployments.tool_calls import ToolCall, ToolCallExtractor, partial_suffix
from worker.errors import InvalidRequestError
from worker.tokenizer import Tokenizer
from worker.wire import MAX_CHOICES, MAX_LOGPROBS, GuidedDecoding, SamplingParams, TokenLogprob

MAX_PROMPTS = 64  # in one completions request: each is its own engine request


class ResponseFormat(BaseModel):
    """OpenAI's response_format, plus `regex` and `grammar` (EBNF) as extensions."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema", "regex", "grammar"]
    json_schema: dict[str, Any] | None = None  # {"name": ..., "schema": {...}, "strict": ...}
    regex: str | None = None
    grammar: str | None = None

    @model_validator(mode="after")
    def _has_its_specification(self):
        needed = {"json_schema": self.json_schema, "regex": self.regex, "grammar": self.grammar}
        if self.type in needed and needed[self.type] is None:
            raise ValueError(f"response_format of type {self.type!r} needs its {self.type!r} "
                             f"field")
        return self

    def guided(self) -> GuidedDecoding | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return GuidedDecoding("json")
        if self.type == "json_schema":
            schema = self.json_schema.get("schema")
            if schema is None:
                return GuidedDecoding("json")
            return GuidedDecoding("json_schema", json.dumps(schema))
        if self.type == "regex":
            return GuidedDecoding("regex", self.regex)
        return GuidedDecoding("grammar", self.grammar)


class _Request(BaseModel):
    # Unknown fields are ignored, as OpenAI's SDKs send new ones over time; known ones are typed.
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="extension: 0 = off")
    min_p: float = Field(0.0, ge=0, le=1)
    ignore_eos: bool = Field(False, description="extension: keep generating past EOS")
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=0, le=0, description="not supported: must be 0")
    frequency_penalty: float = Field(0.0, ge=0, le=0, description="not supported: must be 0")
    user: str | None = None
    response_format: ResponseFormat | None = None
    prompt_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS,
        description="extension (vLLM's): log-probabilities of the prompt's tokens, with this "
                    "many alternatives each")

    @property
    def include_usage_in_stream(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    @property
    def usage_in_every_chunk(self) -> bool:
        """`stream_options.continuous_usage_stats` (vLLM's extension, with include_usage):
        the usage so far in every chunk, as aiperf's per-chunk usage and guidellm read it."""
        return self.include_usage_in_stream and bool(
            (self.stream_options or {}).get("continuous_usage_stats"))

    @property
    def num_samples(self) -> int:
        """Samples the engine generates: n (completions' best_of may ask for more)."""
        return self.n

    @property
    def scored_prompt_logprobs(self) -> int | None:
        """The engine's prompt_logprobs: alternatives per prompt token, None for none."""
        return self.prompt_logprobs

    def sampling_params(self, default_max_tokens: int, max_tokens_limit: int,
                        logprobs: int | None) -> SamplingParams:
        max_tokens = default_max_tokens if self.max_tokens is None else self.max_tokens
        if max_tokens > max_tokens_limit:
            raise InvalidRequestError(f"max_tokens is {max_tokens}; this server allows at most "
                                      f"{max_tokens_limit}")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                              seed=self.seed, stop=stop, ignore_eos=self.ignore_eos,
                              n=self.num_samples, logprobs=logprobs,
                              prompt_logprobs=self.scored_prompt_logprobs,
                              guided=self.response_format.guided() if self.response_format
                              else None)


class ToolCallFunction(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallMessage(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallMessage] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool result: which call it answers

    def template_dict(self) -> dict[str, Any]:
        """As chat templates read it: a call's arguments as an object, not JSON text."""
        message = self.model_dump(exclude_none=True)
        for call in message.get("tool_calls", ()):
            try:
                arguments = json.loads(call["function"]["arguments"])
            except json.JSONDecodeError:
                raise InvalidRequestError(f"tool call {call['id']!r}: arguments must be JSON "
                                          f"text") from None
            if not isinstance(arguments, dict):
                raise InvalidRequestError(f"tool call {call['id']!r}: arguments must be a "
                                          f"JSON object")
            call["function"]["arguments"] = arguments
        return message


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object",
                                                                "properties": {}})
    strict: bool | None = None


class ToolDefinition(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: dict[Literal["name"], str]


def validate_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages from any front door, checked by the one ChatMessage schema."""
    if not messages:
        raise InvalidRequestError("messages must not be empty")
    try:
        return [ChatMessage.model_validate(m).template_dict() for m in messages]
    except ValidationError as exc:
        raise InvalidRequestError(f"invalid message: {_problems(exc)}") from None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    thinking_mode: str | None = Field(None, max_length=64,
                                      description="extension: passed to the chat template")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="extension: variables for the chat template (as vLLM and SGLang)")
    tools: list[ToolDefinition] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self):
        choice = self.tool_choice
        if choice == "required" or isinstance(choice, NamedToolChoice):
            if not self.tools:
                raise ValueError("tool_choice needs tools")
        if isinstance(choice, NamedToolChoice):
            names = [tool.function.name for tool in self.tools]
            if choice.function["name"] not in names:
                raise ValueError(f"tool_choice names {choice.function['name']!r}, which is not "
                                 f"among the tools {names}")
        if self.tools and self.response_format and self.response_format.type != "text" \
                and choice != "none":
            raise ValueError("response_format cannot be combined with tools; set "
                             "tool_choice='none' or drop one")
        return self

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def tool_constraint(self, tool_format: str, reasoning_open: bool) -> GuidedDecoding | None:
        """For tool_choice 'required' or a named function: the output is forced into the
        model's tool-call format (compiled by the engine with xgrammar)."""
        choice = self.tool_choice
        if not (choice == "required" or isinstance(choice, NamedToolChoice)):
            return None
        spec = {"format": tool_format, "tools": self.tool_dicts,
                "tool_choice": choice if choice == "required" else choice.model_dump(),
                "reasoning": "enabled" if reasoning_open else "disabled",
                "parallel_tool_calls": self.parallel_tool_calls}
        return GuidedDecoding("tool_calls", json.dumps(spec))

    @property
    def tool_dicts(self) -> list[dict[str, Any]]:
        return [tool.model_dump(exclude_none=True) for tool in self.tools or ()]

    @property
    def tool_schemas(self) -> dict[str, dict[str, Any]]:
        return {tool.function.name: tool.function.parameters for tool in self.tools or ()}

    @property
    def template_kwargs(self) -> dict[str, Any]:
        kwargs = dict(self.chat_template_kwargs or {})
        if self.thinking_mode is not None:
            kwargs["thinking_mode"] = self.thinking_mode
        if self.uses_tools:
            kwargs["tools"] = self.tool_dicts
        return kwargs

    @model_validator(mode="after")
    def _newer_max_tokens_name(self):
        self.max_tokens = self.max_completion_tokens or self.max_tokens
        return self

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Request):
    # One prompt or a batch (OpenAI's API): text, token ids, or a list of either.
    prompt: str | list[int] | list[str] | list[list[int]] = Field(min_length=1)
    # OpenAI's default for completions; 0 only scores the prompt (with echo).
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = Field(False, description="the prompt comes back before each completion "
                                          "(with its tokens' logprobs when logprobs is set)")
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)

    @property
    def scored_prompt_logprobs(self) -> int | None:
        """Echo with logprobs scores the prompt's tokens as the completion's; max_tokens 0
        asks for the score alone."""
        wanted = [n for n in (self.prompt_logprobs,
                              self.logprobs if self.echo else None) if n is not None]
        if self.max_tokens == 0 and not wanted:
            wanted = [0]
        return max(wanted) if wanted else None

    @property
    def prompts(self) -> list[str | list[int]]:
        """The batch: one engine request per prompt, its choices numbered after the previous
        prompt's."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    @property
    def num_samples(self) -> int:
        return max(self.n, self.best_of or 1)

    @property
    def picks_best(self) -> bool:
        """best_of > n: more samples than choices, the likeliest n returned."""
        return self.num_samples > self.n

    @model_validator(mode="after")
    def _valid_batch(self):
        prompts = self.prompts
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"{len(prompts)} prompts in one request; at most {MAX_PROMPTS}")
        if any(len(prompt) == 0 for prompt in prompts if isinstance(prompt, list)):
            raise ValueError("a token-id prompt is empty")
        if self.max_tokens == 0 and not (self.echo or self.prompt_logprobs is not None):
            raise ValueError("max_tokens 0 generates nothing: it only scores a prompt, with "
                             "echo or prompt_logprobs")
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be at least n ({self.n})")
        if self.picks_best and self.stream:
            raise ValueError("best_of > n cannot be streamed: the best samples are known only "
                             "at the end")
        return self


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a text prompt, or chat messages rendered by the chat template."""

    model_config = ConfigDict(extra="ignore")

    model: str = ""
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    # As vLLM: special tokens (a BOS) are added to a text prompt, not to rendered messages,
    # whose template writes its own.
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either prompt (text) or messages (chat), not both")
        return self

    def token_ids(self, tokenizer: Tokenizer) -> list[int]:
        if self.prompt is not None:
            return tokenizer.encode(self.prompt, add_special_tokens=self.add_special_tokens
                                    is not False)
        text = tokenizer.apply_chat_template([m.template_dict() for m in self.messages],
                                             self.add_generation_prompt,
                                             self.chat_template_kwargs)
        return tokenizer.encode(text, add_special_tokens=bool(self.add_special_tokens))


class DetokenizeRequest(BaseModel):
    """vLLM's /detokenize: token ids back to text (special tokens kept, as vLLM does)."""

    model_config = ConfigDict(extra="ignore")

    model: str = ""
    tokens: list[int]

    def text(self, tokenizer: Tokenizer) -> str:
        unknown = [i for i in self.tokens if not 0 <= i < tokenizer.vocab_size]
        if unknown:
            raise InvalidRequestError(f"tokens {unknown[:5]} are not in the vocabulary "
                                      f"(ids 0 to {tokenizer.vocab_size - 1})")
        return tokenizer.decode(self.tokens, skip_special_tokens=False)


def parse_request(model: type[BaseModel], body: bytes | dict[str, Any]) -> Any:
    """Validates a JSON body (or the fields of a gRPC message); any problem becomes one
    InvalidRequestError naming the fields."""
    try:
        if isinstance(body, dict):
            return model.model_validate(body)
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidRequestError(f"invalid request: {_problems(exc)}") from None


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
                     for e in exc.errors(include_url=False))


# -- responses ------------------------------------------------------------------------------------
def usage_body(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def finish_reason(engine_reason: str | None) -> str | None:
    if engine_reason is None:
        return None
    return "length" if engine_reason == "length" else "stop"


def chat_logprobs(logprobs: list[TokenLogprob], tokenizer: Tokenizer) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        token = tokenizer.decode([token_id], skip_special_tokens=False)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**entry(lp.token_id, lp.logprob),
                         "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in logprobs]}


def completion_logprobs(logprobs: list[TokenLogprob], tokenizer: Tokenizer,
                        first_offset: int = 0, unscored_first: int | None = None
                        ) -> dict[str, Any]:
    """text_offset: where each token starts in the completion's text (characters), counting
    from `first_offset` (what earlier stream chunks carried). `unscored_first`: a token before
    them with no log-probability (an echoed prompt's first token: nothing precedes it)."""
    ids = [lp.token_id for lp in logprobs]
    token_logprobs: list[float | None] = [lp.logprob for lp in logprobs]
    top: list[dict[str, float] | None] = [
        {tokenizer.decode([t], skip_special_tokens=False): v for t, v in lp.top}
        for lp in logprobs]
    if unscored_first is not None:
        ids, token_logprobs, top = [unscored_first] + ids, [None] + token_logprobs, [None] + top
    tokens = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    offsets = list(itertools.accumulate(map(len, tokens), initial=first_offset))[:-1]
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
            "text_offset": offsets}


def prompt_logprobs_body(scored: list[TokenLogprob] | None,
                         tokenizer: Tokenizer) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs`: per prompt token (the first has none), the token and its
    alternatives by id, each with its logprob, rank and text."""
    def entry(token_id: int, logprob: float, rank: int) -> dict[str, Any]:
        return {"logprob": logprob, "rank": rank,
                "decoded_token": tokenizer.decode([token_id], skip_special_tokens=False)}

    body: list[dict[str, Any] | None] = [None]
    for lp in scored or []:
        tokens = {str(lp.token_id): entry(lp.token_id, lp.logprob, lp.rank)}
        for rank, (token_id, logprob) in enumerate(lp.top, 1):
            tokens.setdefault(str(token_id), entry(token_id, logprob, rank))
        body.append(tokens)
    return body


class ReasoningSplitter:
    """Splits a model's output into reasoning and answer at its markers (M3: `<mm:think>` ...
    `</mm:think>`), fed whole or delta by delta. A marker split across deltas is held back
    until it is whole, so no client ever sees part of one."""

    def __init__(self, markers: tuple[str, str], opens_reasoning: bool):
        self.start, self.end = markers
        self.in_reasoning = opens_reasoning
        self.seen_any = opens_reasoning  # a start marker is only read at the very beginning
        self.after_end = False  # the newlines between the end marker and the answer go
        self.pending = ""

    def feed(self, delta: str) -> tuple[str, str]:
        """(reasoning, content) text this delta completes."""
        text = self.pending + delta
        self.pending = ""
        reasoning, content = [], []
        while text:
            if not self.seen_any:
                if self.start.startswith(text):  # maybe the start marker, not whole yet
                    self.pending = text
                    break
                self.seen_any = True
                if text.startswith(self.start):
                    self.in_reasoning = True
                    text = text[len(self.start):]
                continue
            if not self.in_reasoning:
                if self.after_end:
                    text = text.lstrip("\n")
                    self.after_end = not text
                content.append(text)
                break
            at = text.find(self.end)
            if at >= 0:
                reasoning.append(text[:at])
                self.in_reasoning = False
                self.after_end = True
                text = text[at + len(self.end):]
                continue
            keep = partial_suffix(text, self.end)
            reasoning.append(text[:len(text) - keep])
            self.pending = text[len(text) - keep:]
            break
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """What was held back when the output ends (a marker that never completed is text)."""
        held, self.pending = self.pending, ""
        return (held, "") if self.in_reasoning else ("", held)

    def take(self, delta: str, last: bool) -> tuple[str, str]:
        """feed(delta), and on the output's last piece what finish() releases too."""
        reasoning, content = self.feed(delta)
        if last:
            held_reasoning, held_content = self.finish()
            reasoning, content = reasoning + held_reasoning, content + held_content
        return reasoning, content


@dataclasses.dataclass
class SampleOutput:
    """One sample's whole output, gathered from its chunks (for non-streaming responses)."""

    index: int
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob]
    prompt: int = 0  # which prompt of the request (completions take a batch)
    prompt_logprobs: list[TokenLogprob] | None = None

    @property
    def cumulative_logprob(self) -> float:
        return sum(lp.logprob for lp in self.logprobs)


def best_samples(samples: list[SampleOutput], n: int,
                 first_index: int = 0) -> list[SampleOutput]:
    """best_of: the n samples of highest cumulative log-probability, renumbered from
    `first_index` (a batch's later prompts number their choices after the earlier ones')."""
    best = sorted(samples, key=lambda sample: sample.cumulative_logprob, reverse=True)[:n]
    return [dataclasses.replace(s, index=first_index + index) for index, s in enumerate(best)]


@dataclasses.dataclass
class _ChoiceState:
    """What a response remembers of one choice between its stream chunks."""

    reasoning: ReasoningSplitter | None
    tools: ToolCallExtractor | None
    text_offset: int = 0  # characters of completion tokens already sent (text_offset)
    started: bool = False  # its first chunk (which carries the role) went out


class ResponseWriter:
    """Builds one request's response bodies in the chat or the completions shape, one choice
    per sample; with reasoning markers, chat reasoning comes back apart as
    `reasoning_content`.

    `echo`: the token ids of the request's prompts (completions take a batch), their choices
    numbered `samples_per_prompt` apiece, each prompt put before its choices' text (and its
    tokens before their logprobs); `with_prompt_logprobs` adds vLLM's `prompt_logprobs`."""

    def __init__(self, kind: Literal["chat", "completion"], request_id: str, model: str,
                 tokenizer: Tokenizer, with_logprobs: bool,
                 reasoning_markers: tuple[str, str] | None = None,
                 opens_reasoning: bool = False,
                 tool_schemas: dict[str, dict[str, Any]] | None = None,
                 echo: list[list[int]] | None = None, samples_per_prompt: int = 1,
                 with_prompt_logprobs: bool = False):
        self.kind = kind
        self.id = request_id
        self.model = model
        self.created = int(time.time())
        self.tokenizer = tokenizer
        self.with_logprobs = with_logprobs
        self.reasoning_markers = reasoning_markers
        self.opens_reasoning = opens_reasoning
        self.tool_schemas = tool_schemas  # None: tool calls are not looked for
        self.echo = echo
        self.samples_per_prompt = samples_per_prompt
        self.with_prompt_logprobs = with_prompt_logprobs
        self._choices: dict[int, _ChoiceState] = {}

    def _choice(self, index: int) -> _ChoiceState:
        state = self._choices.get(index)
        if state is None:
            markers = self.reasoning_markers
            reasoning = ReasoningSplitter(markers, self.opens_reasoning) if markers else None
            tools = (ToolCallExtractor(self.tool_schemas) if self.tool_schemas is not None
                     else None)
            state = self._choices[index] = _ChoiceState(reasoning, tools)
        return state

    @staticmethod
    def _split(state: _ChoiceState, text: str, last: bool) -> tuple[str, str, list[ToolCall]]:
        """(reasoning, content, new tool calls) of a piece of one choice's output."""
        reasoning, content = "", text
        if state.reasoning is not None:
            reasoning, content = state.reasoning.take(text, last)
        calls: list[ToolCall] = []
        if state.tools is not None:
            content, calls = state.tools.feed(content)
            if last:
                content += state.tools.finish()
        return reasoning, content, calls

    @staticmethod
    def _finish_reason(state: _ChoiceState, engine_reason: str | None) -> str | None:
        if engine_reason is not None and state.tools is not None and state.tools.calls:
            return "tool_calls"
        return finish_reason(engine_reason)

    def _envelope(self, object_name: str, choices: list[dict], **extra) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created,
                "model": self.model, "choices": choices, **extra}

    def _logprobs(self, state: _ChoiceState, logprobs: list[TokenLogprob],
                  unscored_first: int | None = None) -> dict | None:
        if not self.with_logprobs:
            return None
        if self.kind == "chat":
            return chat_logprobs(logprobs, self.tokenizer)
        body = completion_logprobs(logprobs, self.tokenizer, state.text_offset, unscored_first)
        state.text_offset += sum(len(token) for token in body["tokens"])
        return body

    def _opening(self, state: _ChoiceState, prompt: int, scored: list[TokenLogprob] | None,
                 text: str, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        """A completion choice's text and logprobs, echo and vLLM's prompt_logprobs included."""
        if self.echo is None:
            choice = {"text": text, "logprobs": self._logprobs(state, logprobs)}
        else:  # the prompt's text and tokens first, its first token unscored
            ids = self.echo[prompt]
            choice = {"text": self.tokenizer.decode(ids, skip_special_tokens=False) + text,
                      "logprobs": self._logprobs(state, (scored or []) + logprobs, ids[0])}
        if self.with_prompt_logprobs:
            choice["prompt_logprobs"] = prompt_logprobs_body(scored, self.tokenizer)
        return choice

    def whole(self, samples: list[SampleOutput], usage: Usage) -> dict[str, Any]:
        choices = []
        extra: dict[str, Any] = {}
        for sample in samples:
            state = self._choice(sample.index)
            choice: dict[str, Any] = {"index": sample.index}
            if self.kind == "completion":
                choice.update(self._opening(state, sample.prompt, sample.prompt_logprobs,
                                            sample.text, sample.logprobs))
            else:
                choice["logprobs"] = self._logprobs(state, sample.logprobs)
                if self.with_prompt_logprobs and "prompt_logprobs" not in extra:
                    extra["prompt_logprobs"] = prompt_logprobs_body(sample.prompt_logprobs,
                                                                    self.tokenizer)
                reasoning, content, calls = self._split(state, sample.text, last=True)
                message: dict[str, Any] = {"role": "assistant",
                                           "content": content if content or not calls else None}
                if state.reasoning is not None:
                    message["reasoning_content"] = reasoning or None
                if calls:
                    message["tool_calls"] = [call.body() for call in calls]
                choice["message"] = message
            choice["finish_reason"] = self._finish_reason(state, sample.finish_reason)
            choices.append(choice)
        name = "chat.completion" if self.kind == "chat" else "text_completion"
        return self._envelope(name, choices, usage=usage_body(usage), **extra)

    def stream_chunk(self, chunk: GenerateChunk, usage: Usage | None = None) -> dict[str, Any]:
        """One chunk's body; `usage` (the request's so far) goes in it when given."""
        extra = {"usage": usage_body(usage)} if usage is not None else {}
        state = self._choice(chunk.index)
        choice: dict[str, Any] = {"index": chunk.index}
        if self.kind == "completion":
            if state.started:
                choice.update(text=chunk.delta, logprobs=self._logprobs(state, chunk.logprobs))
            else:  # the choice's first chunk opens with the echoed prompt
                choice.update(self._opening(state, chunk.index // self.samples_per_prompt,
                                            chunk.prompt_logprobs, chunk.delta,
                                            chunk.logprobs))
            state.started = True
            choice["finish_reason"] = finish_reason(chunk.finish_reason)
            return self._envelope("text_completion", [choice], **extra)
        choice["logprobs"] = self._logprobs(state, chunk.logprobs)
        if self.with_prompt_logprobs and not state.started:
            extra["prompt_logprobs"] = prompt_logprobs_body(chunk.prompt_logprobs, self.tokenizer)
        reasoning, content, calls = self._split(state, chunk.delta,
                                                last=chunk.finish_reason is not None)
        delta: dict[str, Any] = {"content": content}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if calls:  # numbered across the choice's stream
            first_index = len(state.tools.calls) - len(calls)
            delta["tool_calls"] = [call.body(first_index + i)
                                   for i, call in enumerate(calls)]
        choice["finish_reason"] = self._finish_reason(state, chunk.finish_reason)
        if not state.started:
            delta["role"] = "assistant"
        state.started = True
        choice["delta"] = delta
        return self._envelope("chat.completion.chunk", [choice], **extra)

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        name = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return self._envelope(name, [], usage=usage_body(usage))


def error_body(message: str, error_type: str, code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
