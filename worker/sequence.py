"""A request's state inside the engine, and the sampling parameters it carries."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import torch

from kernels import BLOCK_SIZE
from worker.errors import InvalidRequestError
from worker.multimodal import MultimodalInput
from worker.prefix_hash import MultimodalSpan, chain_page_hashes
from worker.tokenizer import IncrementalDetokenizer

MAX_LOGPROBS = 20
MAX_TEMPERATURE = 2.0  # OpenAI's bound; HTTP, gRPC and offline callers share it
# torch.Generator.manual_seed takes any integer in [-2^63, 2^64); beyond that it overflows.
SEED_RANGE = (-(2**63), 2**64 - 1)
MAX_TOP_K = 2**31 - 1  # larger values mean "off" as much as 0 does; the sampler clamps to vocab


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
    n: int = 1
    logprobs: int | None = None  # top-N alternatives per token (0 = only the sampled one)

    def __post_init__(self):
        """The one validator of sampling fields: every front door builds a SamplingParams, so
        a value that passes here is safe for the engine (no overflow, no NaN, no inf)."""

        def integer_in(value, low: int, high: int) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

        def number_in(value, low: float, high: float) -> bool:
            return (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and math.isfinite(value) and low <= value <= high)

        checks = [
            (integer_in(self.max_tokens, 1, 2**31 - 1),
             lambda: f"max_tokens must be an integer >= 1, got {self.max_tokens!r}"),
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
            (self.n == 1, lambda: f"only n=1 is supported, got n={self.n}"),
            (self.logprobs is None or integer_in(self.logprobs, 0, MAX_LOGPROBS),
             lambda: f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs!r}"),
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


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # cancelled by the client or the server
    ERROR = "error"  # the engine failed on this request (RequestOutput.error says how)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


class Sequence:
    """Prompt + generated tokens, how many are in the KV cache, and which pages hold them."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 detokenizer: IncrementalDetokenizer,
                 mm_inputs: tuple[MultimodalInput, ...] = ()):
        self.request_id = request_id
        self.params = params
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.mm_inputs = mm_inputs  # images and videos, by placeholder span
        self.mm_spans: tuple[MultimodalSpan, ...] = tuple(i.span for i in mm_inputs)
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.num_cached_tokens = 0  # of the prompt, served from the prefix cache
        self.page_ids: list[int] = []
        self.num_registered_pages = 0  # leading full pages already published to the prefix cache
        self._page_hashes: list[str] = []
        self.detokenizer = detokenizer
        self.num_emitted_chars = 0  # text already handed to the caller
        self.generator: torch.Generator | None = None  # per-request RNG when a seed is given

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def page_hashes(self, salt: str) -> list[str]:
        """Chained hashes of the sequence's full pages, computed incrementally."""
        full_pages = self.num_tokens // BLOCK_SIZE
        if len(self._page_hashes) < full_pages:
            self._page_hashes = chain_page_hashes(self.token_ids[: full_pages * BLOCK_SIZE], salt,
                                                  self.mm_spans, known=self._page_hashes)
        return self._page_hashes[:full_pages]

    def reset_for_recompute(self) -> None:
        """After preemption: everything is recomputed from the (prompt + output) tokens."""
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.page_ids = []
        self.num_registered_pages = 0
