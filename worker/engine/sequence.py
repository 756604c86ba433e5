"""A request's state inside the engine, and the sampling parameters it carries."""

from __future__ import annotations

import enum

import torch

from kernels import BLOCK_SIZE
from worker.prefix_hash import chain_page_hashes
from worker.tokenizer import IncrementalDetokenizer
from worker.wire import MultimodalInput, MultimodalSpan, SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # cancelled by the client or the server
    ERROR = "error"  # the engine failed on this request (RequestOutput.error says how)


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
        self.mm_spans: tuple[MultimodalSpan, ...] = tuple(s for i in mm_inputs for s in i.spans)
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
