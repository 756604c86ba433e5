"""A request's state inside the engine, and the sampling parameters it carries."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from kernels import BLOCK_SIZE
from worker.errors import InvalidRequestError
from worker.multimodal import MultimodalInput
from worker.prefix_hash import MultimodalSpan, chain_page_hashes
from worker.tokenizer import IncrementalDetokenizer

MAX_LOGPROBS = 20


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
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1,
             f"max_tokens must be an integer >= 1, got {self.max_tokens!r}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 disables it), got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.n == 1, f"only n=1 is supported, got n={self.n}"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)
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
