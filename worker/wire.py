"""What crosses the tiers: constants and wire types shared by the CPU tiers (ingress, router,
preprocess) and the model replicas. Torch-free by design: the CPU tiers import this module and
never torch (tests/test_wire.py checks it)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from worker.errors import InvalidRequestError

if TYPE_CHECKING:
    import torch

# Tokens per KV page, which is one MSA block (`kernels.BLOCK_SIZE`, the spec's block; a test
# checks that the two agree, since kernels cannot be imported without torch).
BLOCK_SIZE = 128

@dataclass(frozen=True)
class MultimodalSpan:
    """An item's placeholder tokens [offset, offset + length) and its content hash."""

    offset: int
    length: int
    content_hash: str



MAX_LOGPROBS = 20
MAX_TEMPERATURE = 2.0  # OpenAI's bound; HTTP, gRPC and offline callers share it
# torch.Generator.manual_seed takes any integer in [-2^63, 2^64); beyond that it overflows.
SEED_RANGE = (-(2**63), 2**64 - 1)
MAX_TOP_K = 2**31 - 1  # larger values mean "off" as much as 0 does; the sampler clamps to vocab
MAX_CHOICES = 16  # n (and best_of): parallel samples of one prompt
MAX_GUIDE_CHARS = 65536  # a schema, regex or grammar: compiling costs grow with its size


@dataclass(frozen=True)
class GuidedDecoding:
    """A constraint on a request's output, enforced token by token (the engine compiles it
    with xgrammar): any JSON object, a JSON schema, a regex, an EBNF grammar, or tool calls
    in the model's format (forced by tool_choice)."""

    kind: Literal["json", "json_schema", "regex", "grammar", "tool_calls"]
    # The schema as JSON text, the regex, the grammar, or for tool_calls a JSON object:
    # {"format", "tools", "tool_choice", "reasoning", "parallel_tool_calls"}.
    spec: str = ""

    def __post_init__(self):
        if self.kind not in ("json", "json_schema", "regex", "grammar", "tool_calls"):
            raise InvalidRequestError(f"unknown constraint kind {self.kind!r}")
        if self.kind != "json" and not self.spec:
            raise InvalidRequestError(f"a {self.kind} constraint needs its specification")
        if len(self.spec) > MAX_GUIDE_CHARS:
            raise InvalidRequestError(f"the {self.kind} specification is {len(self.spec)} "
                                      f"characters; at most {MAX_GUIDE_CHARS} are accepted")


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1  # parallel samples of the prompt, sharing its KV pages
    logprobs: int | None = None  # top-N alternatives per token (0 = only the sampled one)
    # Log-probabilities of the prompt's own tokens (each given the ones before it), with top-N
    # alternatives: what scoring (echo, lm-eval's log-likelihoods) reads. Such a prompt is
    # computed in full, not taken from the prefix cache. With max_tokens 0 nothing is generated.
    prompt_logprobs: int | None = None
    guided: GuidedDecoding | None = None  # structured output: the text must match this

    def __post_init__(self):
        """The one validator of sampling fields: every front door builds a SamplingParams, so
        a value that passes here is safe for the engine (no overflow, no NaN, no inf)."""

        def integer_in(value, low: int, high: int) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

        def number_in(value, low: float, high: float) -> bool:
            return (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and math.isfinite(value) and low <= value <= high)

        checks = [
            (integer_in(self.max_tokens, 1, 2**31 - 1)
             or (self.max_tokens == 0 and self.prompt_logprobs is not None),
             lambda: f"max_tokens must be an integer >= 1 (0 only to score a prompt, with "
                     f"prompt_logprobs or echo), got {self.max_tokens!r}"),
            (number_in(self.temperature, 0, MAX_TEMPERATURE),
             lambda: f"temperature must be a number in [0, {MAX_TEMPERATURE:g}], "
                     f"got {self.temperature!r}"),
            (number_in(self.top_p, 0, 1) and self.top_p > 0,
             lambda: f"top_p must be in (0, 1], got {self.top_p!r}"),
            (integer_in(self.top_k, 0, MAX_TOP_K),
             lambda: f"top_k must be an integer in [0, {MAX_TOP_K}] (0 disables it), "
                     f"got {self.top_k!r}"),
            (number_in(self.min_p, 0, 1), lambda: f"min_p must be in [0, 1], got {self.min_p!r}"),
            (self.seed is None or integer_in(self.seed, *SEED_RANGE),
             lambda: f"seed must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], "
                     f"got {self.seed!r}"),
            (integer_in(self.n, 1, MAX_CHOICES),
             lambda: f"n must be an integer in [1, {MAX_CHOICES}], got {self.n!r}"),
            (self.logprobs is None or integer_in(self.logprobs, 0, MAX_LOGPROBS),
             lambda: f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs!r}"),
            (self.prompt_logprobs is None or integer_in(self.prompt_logprobs, 0, MAX_LOGPROBS),
             lambda: f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], "
                     f"got {self.prompt_logprobs!r}"),
            (all(isinstance(s, str) and s for s in self.stop),
             lambda: "stop strings must be non-empty"),
            (all(integer_in(t, 0, 2**31 - 1) for t in self.stop_token_ids),
             lambda: "stop_token_ids must be non-negative integers"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message())
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first
    rank: int = 1  # of the token among the vocabulary by probability (1 = the likeliest)


@dataclass
class MultimodalInput:
    """One vision-tower input of a prompt (an image, a video, or one segment of a video) and
    where its embedding rows go: one span, or several filled in order (MiniMax-M3 puts each
    video frame's tokens between markers of their own, after its timestamp)."""

    spans: tuple[MultimodalSpan, ...]
    pixel_values: np.ndarray | torch.Tensor  # [t * h * w patches, patch_dim]
    grid_thw: tuple[int, int, int]

    @property
    def content_hash(self) -> str:
        return self.spans[0].content_hash

    @property
    def num_tokens(self) -> int:
        return sum(span.length for span in self.spans)


# Where a replica holds a page: in the device KV cache, or in its host-memory tier (a hit there
# is copied back instead of recomputed).
PageTier = Literal["device", "host"]


@dataclass(frozen=True)
class PageEvent:
    """Published so that routers know which replica holds which prefix pages, and where."""

    kind: Literal["stored", "removed"]
    hashes: tuple[str, ...]
    tier: PageTier = "device"


@dataclass(frozen=True)
class PagePayload:
    """One prefix page's K, V and index keys of every layer (of every rank, in rank order,
    under tensor parallelism), as raw bytes (numpy uint8, so that Ray moves it without pickling
    tensors), on its way from the replica that holds it to one that would otherwise recompute
    it. `digest` covers the chained hash and the bytes: a
    page whose bytes were altered on the way is refused."""

    page_hash: str
    arrays: tuple[np.ndarray, ...]
    digest: str

    @staticmethod
    def digest_of(page_hash: str, arrays: tuple[np.ndarray, ...]) -> str:
        digest = hashlib.blake2b(bytes.fromhex(page_hash), digest_size=16)
        for array in arrays:
            digest.update(np.ascontiguousarray(array).data)
        return digest.hexdigest()

    @classmethod
    def of(cls, page_hash: str, arrays: tuple[np.ndarray, ...]) -> PagePayload:
        return cls(page_hash, arrays, cls.digest_of(page_hash, arrays))

    @property
    def intact(self) -> bool:
        return self.digest == self.digest_of(self.page_hash, self.arrays)

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self.arrays)


PageEventListener = Callable[[PageEvent], None]
