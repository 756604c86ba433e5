"""A request's state inside the engine, and the sampling parameters it carries."""

from __future__ import annotations

import dataclasses
import enum

import torch

from kernels import BLOCK_SIZE
from worker.prefix_hash import chain_page_hashes
from worker.tokenizer import IncrementalDetokenizer
from worker.wire import SEED_RANGE, MultimodalInput, MultimodalSpan, SamplingParams, TokenLogprob


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
                 mm_inputs: tuple[MultimodalInput, ...] = (), index: int = 0):
        self.request_id = request_id
        self.index = index  # which of the request's n parallel samples (its choice index)
        self.params = params
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.mm_inputs = mm_inputs  # images and videos, by placeholder span
        self.mm_spans: tuple[MultimodalSpan, ...] = tuple(s for i in mm_inputs for s in i.spans)
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache (or being written)
        # Tokens sampled on the device whose ids the host has not read yet (overlapped
        # scheduling): they follow token_ids, and the next step reads them on the device.
        self.num_pending_tokens = 0
        self.num_cached_tokens = 0  # of the prompt, served from the prefix cache
        self.page_ids: list[int] = []
        self.num_registered_pages = 0  # leading full pages already published to the prefix cache
        self._page_hashes: list[str] = []
        self.detokenizer = detokenizer
        self.num_emitted_chars = 0  # text already handed to the caller
        self.generator: torch.Generator | None = None  # per-request RNG when a seed is given
        # The sibling whose computed prompt pages this sample takes at its first admission.
        self.fork_of: Sequence | None = None
        # Structured output: where the output stands in its grammar (an xgrammar matcher).
        self.grammar = None
        # With params.prompt_logprobs: entry i scores prompt token i + 1 (the first token has
        # no context to score it). Parallel samples share their first sample's list.
        self.prompt_logprobs: list[TokenLogprob] = []

    @property
    def num_tokens(self) -> int:
        """Every token the cache will hold, those still on the device included."""
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens the host has read: what the user is told of."""
        return len(self.token_ids) - self.num_prompt_tokens

    def samples_no_more(self, max_model_len: int) -> bool:
        """Its newest token, still on the device, is its last by length (max_tokens or the
        context): scheduling it again would compute a token nobody receives."""
        return self.num_pending_tokens > 0 and (
            self.num_tokens - self.num_prompt_tokens >= self.params.max_tokens
            or self.num_tokens >= max_model_len)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def fork(self, index: int) -> Sequence:
        """Another sample of the same prompt. A seeded request's samples draw from seeds
        seed, seed + 1, ... so that they differ and each is reproducible."""
        params = self.params
        if params.seed is not None:
            low, high = SEED_RANGE
            params = dataclasses.replace(params, seed=(params.seed + index - low)
                                         % (high - low + 1) + low)
        prompt = self.token_ids[: self.num_prompt_tokens]
        child = Sequence(self.request_id, prompt, params,
                         IncrementalDetokenizer(self.detokenizer.tokenizer, prompt),
                         self.mm_inputs, index)
        child.fork_of = self
        child.prompt_logprobs = self.prompt_logprobs  # the prompt is scored once
        if self.grammar is not None:
            child.grammar = self.grammar.fork()
        return child

    @property
    def needs_prompt_logprobs(self) -> bool:
        return (self.params.prompt_logprobs is not None
                and len(self.prompt_logprobs) < self.num_prompt_tokens - 1)

    @property
    def prompt_computed(self) -> bool:
        return self.num_computed_tokens >= self.num_prompt_tokens

    def page_hashes(self, salt: str) -> list[str]:
        """Chained hashes of the sequence's full pages of known tokens, computed
        incrementally."""
        full_pages = len(self.token_ids) // BLOCK_SIZE
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
