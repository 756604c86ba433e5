"""What the deployments hand each other through Ray (pickled dataclasses, never JSON)."""

from __future__ import annotations

from dataclasses import dataclass, field

from worker.errors import InvalidRequestError
from worker.prefix_hash import chain_page_hashes
from worker.wire import BLOCK_SIZE, MultimodalInput, SamplingParams, TokenLogprob


@dataclass
class PreparedPrompt:
    """A prompt after the preprocess tier: token ids, the prefix-cache page hashes, and the
    images and videos (numpy patches: Ray moves them through its object store, not as JSON)."""

    token_ids: list[int]
    page_hashes: list[str]  # chained hashes of the full pages: what the router looks up
    mm_inputs: list[MultimodalInput] = field(default_factory=list)
    # The chat template left the model's reasoning open: its output starts as reasoning.
    opens_reasoning: bool = False

    @classmethod
    def from_token_ids(cls, token_ids: list[int], salt: str,
                       mm_inputs: list[MultimodalInput] = (),
                       opens_reasoning: bool = False) -> PreparedPrompt:
        """salt: the model's fingerprint, as the engine's BlockManager uses it."""
        if not token_ids:
            raise InvalidRequestError("the prompt is empty")
        # Only pages before the last prompt token can come from the cache (BlockManager's rule).
        matchable = (len(token_ids) - 1) // BLOCK_SIZE * BLOCK_SIZE
        spans = [span for item in mm_inputs for span in item.spans]
        return cls(token_ids, chain_page_hashes(token_ids[:matchable], salt, spans),
                   list(mm_inputs), opens_reasoning)


@dataclass(frozen=True)
class PullHint:
    """The router's note on a request it sends away from the replica holding its prefix: that
    replica (`holder`) holds the first `pages` prefix pages, which the chosen one may pull."""

    holder: str
    pages: int


@dataclass
class GenerateRequest:
    request_id: str
    prompt: PreparedPrompt
    params: SamplingParams
    pull: PullHint | None = None  # set by the router (deployments/router.py)


@dataclass(frozen=True)
class ExportRequest:
    """One replica asking another (`target`, a replica id) for the pages of a hash chain it
    holds: routers send it to that replica alone."""

    target: str
    page_hashes: list[str]


@dataclass
class GenerateChunk:
    """One streamed piece of a request's output, as the model replica yields it."""

    replica: str  # the model replica that serves the request
    delta: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    index: int = 0  # which of the request's n samples
    # On a request's last chunk: the replica's load figures then (LLMEngine.load_figures), so
    # that /metrics shows them with or without Redis.
    replica_load: dict[str, int] | None = None
    # With SamplingParams.prompt_logprobs, on each sample's first chunk: prompt tokens 1.. scored.
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass
class Usage:
    """A request's token counts over all its samples: the prompt once, every sample's
    output tokens, and the prompt tokens the first sample found in the prefix cache."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    @classmethod
    def of(cls, last_chunks: list[GenerateChunk]) -> Usage:
        """From each sample's latest chunk."""
        first = min(last_chunks, key=lambda chunk: chunk.index)
        return cls(first.prompt_tokens, sum(c.completion_tokens for c in last_chunks),
                   first.cached_tokens)
