"""Runs one scheduled step: packs tokens, builds the spec's paged metadata, forwards, samples."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kernels import BLOCK_SIZE
from worker.engine.cuda_graphs import DecodeGraphs
from worker.engine.kv_cache import AttentionMetadata, KVCache
from worker.engine.multimodal import VisionEncoder
from worker.engine.sampler import Sampler, token_logprobs
from worker.engine.scheduler import ScheduledBatch
from worker.engine.sequence import Sequence
from worker.models.base import PagedCausalLM
from worker.wire import TokenLogprob

if TYPE_CHECKING:
    from worker.engine.rank_workers import RankWorkers


@dataclass
class StepResult:
    """The sequences whose last token was computed this step, with what they sampled."""

    sequences: list[Sequence]
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]
    # The prompt tokens scored this step (SamplingParams.prompt_logprobs), by sequence, in
    # prompt order.
    prompt_logprobs: list[tuple[Sequence, list[TokenLogprob]]] = field(default_factory=list)

    def extend(self, other: "StepResult") -> None:
        self.sequences += other.sequences
        self.token_ids += other.token_ids
        self.logprobs += other.logprobs
        self.prompt_logprobs += other.prompt_logprobs


@dataclass
class PromptScoring:
    """Which prompt tokens a step scores: packed row rows[i] predicts targets[i]; the rows are
    the sequences' in `counts` order. `score_rows` (forward_step's callback) fills `scored`."""

    counts: list[tuple[Sequence, int]] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    top_n: list[int] = field(default_factory=list)
    scored: list[TokenLogprob] = field(default_factory=list)

    def add(self, seq: Sequence, rows: range, targets: list[int]) -> None:
        self.counts.append((seq, len(targets)))
        self.rows += rows
        self.targets += targets
        self.top_n += [seq.params.prompt_logprobs] * len(targets)

    def score_rows(self, begin: int, logits: torch.Tensor) -> None:
        """Scores rows [begin, begin + len(logits)) from their logits."""
        end = begin + logits.shape[0]
        self.scored += token_logprobs(logits, self.targets[begin:end], self.top_n[begin:end])

    def by_sequence(self) -> list[tuple[Sequence, list[TokenLogprob]]]:
        result, start = [], 0
        for seq, count in self.counts:
            result.append((seq, self.scored[start:start + count]))
            start += count
        return result


@dataclass
class StepInputs:
    """An eager step's model inputs as built on the host: what rank 0 of a tensor-parallel
    replica broadcasts to the other ranks once per step (and all that it broadcasts)."""

    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    cu_seqlens_q: torch.Tensor  # int32 [B + 1]
    seq_lens: torch.Tensor  # int32 [B]
    block_table: torch.Tensor  # int32 [B, max_pages]
    slot_mapping: torch.Tensor  # int64 [T]
    logit_rows: list[int]  # packed rows whose logits are sampled
    mm_embeds: tuple[torch.Tensor, torch.Tensor] | None  # (packed rows, embeddings)
    prompt_rows: list[int] = field(default_factory=list)  # packed rows that score a prompt token

    def to_host(self) -> "StepInputs":
        """The same inputs with the image embeddings (computed on rank 0's device) on the host."""
        if self.mm_embeds is None:
            return self
        rows, embeds = self.mm_embeds
        return dataclasses.replace(self, mm_embeds=(rows.cpu(), embeds.cpu()))


# Prompt rows turned into full-vocabulary logits at once: bounds the memory of scoring a long
# prompt chunk to this many rows of logits.
PROMPT_SCORE_ROWS = 256


def forward_step(model: PagedCausalLM, cache: KVCache, inputs: StepInputs, topk: int | None,
                 check_indices: bool,
                 score_prompt: Callable[[int, torch.Tensor], None] | None = None
                 ) -> torch.Tensor | None:
    """The model's forward over one step's inputs: logits of the sampled rows, or None. Every
    rank of a tensor-parallel replica runs it on the same inputs (its collectives pair up).

    The prompt rows' logits go, PROMPT_SCORE_ROWS at a time, to `score_prompt(first row,
    logits)` (rank 0's scoring; the other ranks compute them only for the collectives)."""
    device = cache.k.device

    def here(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device, non_blocking=True)

    metadata = AttentionMetadata(
        cu_seqlens_q=here(inputs.cu_seqlens_q), seq_lens=here(inputs.seq_lens),
        block_table=here(inputs.block_table), slot_mapping=here(inputs.slot_mapping),
        max_seq_len=int(inputs.seq_lens.max()), check_indices=check_indices)
    mm_embeds = None
    if inputs.mm_embeds is not None:
        mm_embeds = tuple(here(t) for t in inputs.mm_embeds)
    hidden = model(here(inputs.input_ids), here(inputs.positions), metadata, cache, topk,
                   mm_embeds)
    for begin in range(0, len(inputs.prompt_rows), PROMPT_SCORE_ROWS):
        rows = inputs.prompt_rows[begin:begin + PROMPT_SCORE_ROWS]
        logits = model.compute_logits(hidden[torch.tensor(rows, device=device)])
        if score_prompt is not None:
            score_prompt(begin, logits)
    if not inputs.logit_rows:
        return None
    return model.compute_logits(hidden[torch.tensor(inputs.logit_rows, device=device)])


class ModelRunner:
    """`decode_graphs`, when given, replays the decode steps that fit it (CUDA only; the
    other ranks of a tensor-parallel replica replay theirs from the same `DecodeInputs`);
    `vision` embeds the images and videos of the prompt chunks that reach them; `peers`, on
    rank 0 of a tensor-parallel replica, hands each step's inputs to the other ranks."""

    def __init__(self, model: PagedCausalLM, cache: KVCache, sampler: Sampler,
                 topk: int | None = None, debug_checks: bool = False,
                 decode_graphs: DecodeGraphs | None = None, vision: VisionEncoder | None = None,
                 peers: "RankWorkers | None" = None):
        self.model = model
        self.vision = vision
        self.cache = cache
        self.sampler = sampler
        self.topk = topk
        self.debug_checks = debug_checks
        self.decode_graphs = decode_graphs
        self.peers = peers
        self.device = cache.k.device

    def prepare(self, batch: ScheduledBatch) -> tuple[StepInputs, list[int], PromptScoring]:
        """(the model inputs of a mixed step, which batch rows are sampled, which prompt
        tokens are scored)."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu_seqlens_q = [0]
        seq_lens = []
        sample_rows = []
        scoring = PromptScoring()
        max_pages = max(len(s.page_ids) for s in batch.sequences)
        block_table = torch.zeros(len(batch), max_pages, dtype=torch.int32)
        for b, (seq, num_tokens) in enumerate(zip(batch.sequences, batch.num_tokens)):
            start = seq.num_computed_tokens
            end = start + num_tokens
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(seq.page_ids[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
                         for p in range(start, end))
            cu_seqlens_q.append(cu_seqlens_q[-1] + num_tokens)
            seq_lens.append(end)
            block_table[b, : len(seq.page_ids)] = torch.tensor(seq.page_ids, dtype=torch.int32)
            if end == seq.num_tokens:  # the chunk reaches the newest token: sample the next
                sample_rows.append(b)
            if seq.needs_prompt_logprobs:
                # Position p scores prompt token p + 1; positions scored before a preemption
                # are not scored again.
                first = max(start, len(seq.prompt_logprobs))
                last = min(end, seq.num_prompt_tokens - 1)
                if first < last:
                    scoring.add(seq, range(cu_seqlens_q[b] + first - start,
                                           cu_seqlens_q[b] + last - start),
                                seq.token_ids[first + 1:last + 1])
        inputs = StepInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.long),
            positions=torch.tensor(positions, dtype=torch.long),
            cu_seqlens_q=torch.tensor(cu_seqlens_q, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_table=block_table,
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            logit_rows=[cu_seqlens_q[b + 1] - 1 for b in sample_rows],
            mm_embeds=self._mm_embeds(batch, cu_seqlens_q),
            prompt_rows=scoring.rows)
        return inputs, sample_rows, scoring

    def _mm_embeds(self, batch: ScheduledBatch, cu_seqlens_q: list[int]):
        """(packed rows, embeddings) of the placeholder tokens in this step, or None."""
        rows, embeds = [], []
        for b, (seq, num_tokens) in enumerate(zip(batch.sequences, batch.num_tokens)):
            if seq.mm_inputs:
                start = seq.num_computed_tokens
                seq_rows, seq_embeds = self.vision.for_chunk(seq.mm_inputs, start,
                                                             start + num_tokens, cu_seqlens_q[b])
                rows += seq_rows
                embeds += seq_embeds
        if not rows:
            return None
        return torch.tensor(rows, dtype=torch.long, device=self.device), torch.cat(embeds)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepResult:
        """Computes the step and samples; changes no request state (the scheduler's
        `postprocess` does), so a step that raises can be run again."""
        if self.decode_graphs is not None and self.decode_graphs.fits(batch):
            inputs = self.decode_graphs.prepare(batch)
            if self.peers is not None:
                self.peers.send(inputs)
            logits = self.decode_graphs.replay(inputs)[: len(batch)]
            sample_rows, prompt_logprobs = range(len(batch)), []
        else:
            logits, sample_rows, prompt_logprobs = self._run_eager(batch)
        if not sample_rows:
            return StepResult([], [], [], prompt_logprobs)
        sequences = [batch.sequences[b] for b in sample_rows]
        token_ids, logprobs = self.sampler(logits, sequences)
        return StepResult(sequences, token_ids, logprobs, prompt_logprobs)

    def capture_decode_graphs(self) -> None:
        """Every decode graph ahead of time (the engine's warm-up), on every rank at once."""
        if self.decode_graphs is not None:
            self.decode_graphs.capture_all(self.peers.send if self.peers is not None else None)

    def _run_eager(self, batch: ScheduledBatch
                   ) -> tuple[torch.Tensor | None, list[int],
                              list[tuple[Sequence, list[TokenLogprob]]]]:
        """(logits of the sampled rows, which batch rows they are, the scored prompt tokens)
        of a mixed step."""
        inputs, sample_rows, scoring = self.prepare(batch)
        if self.peers is not None:
            self.peers.send(inputs.to_host())
        logits = forward_step(self.model, self.cache, inputs, self.topk, self.debug_checks,
                              scoring.score_rows)
        return logits, sample_rows, scoring.by_sequence()
