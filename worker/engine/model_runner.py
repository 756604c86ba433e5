"""Runs one scheduled step: packs tokens, builds the spec's paged metadata, forwards, samples.

`launch` queues a step's GPU work and returns at once; its sampled token ids stay on the
device, where the next step can read them as inputs (overlapped scheduling), and come to the
host when the engine asks for the `LaunchedStep`'s result."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from worker import parallel
from worker.engine.block_table import BlockTables, slot_mapping
from worker.engine.cuda_graphs import DecodeGraphs, DecodeInputs
from worker.engine.host_copies import HostCopy, to_device
from worker.engine.host_tier import PageTransfer
from worker.engine.kv_cache import AttentionMetadata, HostKVCache, KVCache
from worker.engine.multimodal import VisionEncoder
from worker.engine.sampler import SampledTokens, Sampler, ScoredTokens, token_logprobs
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
    # Packed rows whose token an earlier step sampled on the device (overlapped scheduling):
    # rank 0 broadcasts those tokens to the other ranks right after these inputs.
    fed_rows: list[int] = field(default_factory=list)

    def to_host(self) -> "StepInputs":
        """The same inputs with the image embeddings (computed on rank 0's device) on the host."""
        if self.mm_embeds is None:
            return self
        rows, embeds = self.mm_embeds
        return dataclasses.replace(self, mm_embeds=(rows.cpu(), embeds.cpu()))


@dataclass
class FedTokens:
    """Input rows whose token an earlier, still unread step sampled: the step copies them
    from that step's token ids on the device instead of from the host."""

    host_rows: list[int]  # rows of the step's input ids
    rows: torch.Tensor  # int64 [P], the same rows on the device
    token_ids: torch.Tensor  # int64 [P] (device)

    def write_into(self, input_ids: torch.Tensor) -> None:
        input_ids.index_copy_(0, self.rows, self.token_ids)

    @classmethod
    def receive(cls, rows: list[int], device: torch.device) -> "FedTokens | None":
        """Ranks 1..N-1 of a tensor-parallel replica: the tokens rank 0 broadcasts for these
        rows (`ModelRunner._send_to_peers`), or None when the step has none."""
        if not rows:
            return None
        token_ids = parallel.broadcast_tensor(torch.empty(len(rows), dtype=torch.long,
                                                          device=device))
        return cls(rows, to_device(rows, device, torch.long), token_ids)


# Prompt rows turned into full-vocabulary logits at once: bounds the memory of scoring a long
# prompt chunk to this many rows of logits.
PROMPT_SCORE_ROWS = 256


def forward_step(model: PagedCausalLM, cache: KVCache, inputs: StepInputs, topk: int | None,
                 check_indices: bool,
                 score_prompt: Callable[[int, torch.Tensor], None] | None = None,
                 fed: FedTokens | None = None) -> torch.Tensor | None:
    """The model's forward over one step's inputs: logits of the sampled rows, or None. Every
    rank of a tensor-parallel replica runs it on the same inputs (its collectives pair up).

    The prompt rows' logits go, PROMPT_SCORE_ROWS at a time, to `score_prompt(first row,
    logits)` (rank 0's scoring; the other ranks compute them only for the collectives)."""
    device = cache.k.device

    def here(tensor: torch.Tensor) -> torch.Tensor:
        return to_device(tensor, device)

    metadata = AttentionMetadata(
        cu_seqlens_q=here(inputs.cu_seqlens_q), seq_lens=here(inputs.seq_lens),
        block_table=here(inputs.block_table), slot_mapping=here(inputs.slot_mapping),
        max_seq_len=int(inputs.seq_lens.max()), check_indices=check_indices)
    mm_embeds = None
    if inputs.mm_embeds is not None:
        mm_embeds = tuple(here(t) for t in inputs.mm_embeds)
    input_ids = here(inputs.input_ids)
    if fed is not None:
        fed.write_into(input_ids)
    hidden = model(input_ids, here(inputs.positions), metadata, cache, topk, mm_embeds)
    for begin in range(0, len(inputs.prompt_rows), PROMPT_SCORE_ROWS):
        rows = inputs.prompt_rows[begin:begin + PROMPT_SCORE_ROWS]
        logits = model.compute_logits(hidden[to_device(rows, device, torch.long)])
        if score_prompt is not None:
            score_prompt(begin, logits)
    if not inputs.logit_rows:
        return None
    return model.compute_logits(hidden[to_device(inputs.logit_rows, device, torch.long)])


class LaunchedStep:
    """A step whose GPU work is queued. `sequences` sampled one token each, on the device
    (`sampled.token_ids`, row by row); `result()` reads them on the host, waiting for the
    step's GPU work if it is still running. `prompt_logprobs`: the prompt tokens it scored
    (SamplingParams.prompt_logprobs), by sequence, in prompt order, read during the launch."""

    def __init__(self, batch: ScheduledBatch, sequences: list[Sequence],
                 sampled: SampledTokens | None,
                 prompt_logprobs: list[tuple[Sequence, list[TokenLogprob]]]):
        self.batch = batch
        self.sequences = sequences
        self.sampled = sampled
        self.prompt_logprobs = prompt_logprobs
        self._copy = None
        if sampled is not None:
            scored = sampled.scored.tensors() if sampled.scored is not None else ()
            self._copy = HostCopy(sampled.token_ids, *scored)

    @property
    def needs_host_first(self) -> bool:
        """The next step's inputs need this step's tokens on the host: a grammar (structured
        output) must accept a token before it can mask the next one."""
        return any(seq.grammar is not None for seq in self.sequences)

    def result(self) -> StepResult:
        if self._copy is None:
            return StepResult([], [], [])
        token_tensor, *scored = self._copy.get()
        token_ids = token_tensor.tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(token_ids)
        if scored:
            rows = self.sampled.logprob_rows
            values = ScoredTokens(*scored).to_list(
                [token_ids[i] for i in rows], [self.sequences[i].params.logprobs for i in rows])
            for i, logprob in zip(rows, values, strict=True):
                logprobs[i] = logprob
        return StepResult(self.sequences, token_ids, logprobs)


class ModelRunner:
    """`decode_graphs`, when given, replays the decode steps that fit it (CUDA only; the
    other ranks of a tensor-parallel replica replay theirs from the same `DecodeInputs`);
    `vision` embeds the images and videos of the prompt chunks that reach them; `peers`, on
    rank 0 of a tensor-parallel replica, hands each step's inputs to the other ranks;
    `host_cache` is the host tier's memory, which `move_pages` copies pages to and from."""

    def __init__(self, model: PagedCausalLM, cache: KVCache, sampler: Sampler,
                 block_tables: BlockTables, topk: int | None = None, debug_checks: bool = False,
                 decode_graphs: DecodeGraphs | None = None, vision: VisionEncoder | None = None,
                 peers: "RankWorkers | None" = None, host_cache: HostKVCache | None = None):
        self.model = model
        self.vision = vision
        self.cache = cache
        self.sampler = sampler
        self.block_tables = block_tables
        self.topk = topk
        self.debug_checks = debug_checks
        self.decode_graphs = decode_graphs
        self.peers = peers
        self.host_cache = host_cache
        self.device = cache.k.device

    def move_pages(self, transfers: list[PageTransfer]) -> None:
        """Queues the copies between the device cache and the host tier that the scheduler
        recorded for the coming step, on every rank (each holds its own slice of a page)."""
        if not transfers:
            return
        if self.peers is not None:
            self.peers.send(transfers)
        self.host_cache.apply(transfers)

    def prepare(self, batch: ScheduledBatch) -> tuple[StepInputs, list[int], PromptScoring]:
        """(the model inputs of a mixed step, which batch rows are sampled, which prompt
        tokens are scored). A sequence's token still on the device enters input_ids as 0 and
        is fed on the device (`launch`)."""
        input_ids: list[int] = []
        cu_seqlens_q = [0]
        seq_lens = []
        sample_rows = []
        scoring = PromptScoring()
        for b, (seq, num_tokens) in enumerate(zip(batch.sequences, batch.num_tokens)):
            start = seq.num_computed_tokens
            end = start + num_tokens
            known = seq.token_ids[start:end]
            input_ids += known + [0] * (num_tokens - len(known))
            cu_seqlens_q.append(cu_seqlens_q[-1] + num_tokens)
            seq_lens.append(end)
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
        counts = torch.tensor(batch.num_tokens)
        ends = torch.tensor(seq_lens, dtype=torch.int32)
        cu = torch.tensor(cu_seqlens_q, dtype=torch.int32)
        rows = torch.repeat_interleave(torch.arange(len(batch)), counts)
        # Packed token t of row b sits at position (end_b - count_b) + (t - cu_b).
        positions = torch.arange(cu_seqlens_q[-1]) + (ends - counts - cu[:-1]).repeat_interleave(
            counts)
        block_table = self.block_tables.gather(batch.sequences,
                                               max(len(s.page_ids) for s in batch.sequences))
        inputs = StepInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.long),
            positions=positions,
            cu_seqlens_q=cu,
            seq_lens=ends,
            block_table=block_table,
            slot_mapping=slot_mapping(block_table, rows, positions),
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
        return to_device(rows, self.device, torch.long), torch.cat(embeds)

    def _fed_tokens(self, batch: ScheduledBatch,
                    earlier: list[LaunchedStep]) -> FedTokens | None:
        """Where this step's inputs still on the device come from: each is the last token of
        its row's chunk, sampled by one of the earlier, unread steps."""
        sources, offset = {}, 0
        for step in earlier:
            for row, seq in enumerate(step.sequences):
                sources[seq] = offset + row
            offset += len(step.sequences)
        rows, picks = [], []
        chunk_ends = itertools.accumulate(batch.num_tokens)
        for seq, num_tokens, chunk_end in zip(batch.sequences, batch.num_tokens, chunk_ends):
            if seq.num_pending_tokens:
                assert seq.num_computed_tokens + num_tokens == seq.num_tokens == \
                    len(seq.token_ids) + 1, "only a chunk's last token can be on the device"
                rows.append(chunk_end - 1)
                picks.append(sources[seq])
        if not rows:
            return None
        token_ids = torch.cat([step.sampled.token_ids for step in earlier])
        return FedTokens(rows, to_device(rows, self.device, torch.long),
                         token_ids[to_device(picks, self.device, torch.long)])

    def _send_to_peers(self, inputs: StepInputs | DecodeInputs, fed: FedTokens | None) -> None:
        """Hands a step to the other ranks: its host inputs, then the tokens fed on the
        device (a broadcast on the device, so overlapped scheduling stays overlapped)."""
        inputs.fed_rows = fed.host_rows if fed is not None else []
        if self.peers is None:
            return
        self.peers.send(inputs)
        if fed is not None:
            parallel.broadcast_tensor(fed.token_ids)

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, earlier: list[LaunchedStep]) -> LaunchedStep:
        """Queues the step's forward and sampling; changes no request state (the scheduler's
        `postprocess` does), so a step that raises can be run again. `earlier`: the launched
        steps not yet read, whose sampled tokens this step may take as inputs."""
        fed = self._fed_tokens(batch, earlier)
        if self.decode_graphs is not None and self.decode_graphs.fits(batch):
            inputs = self.decode_graphs.prepare(batch, self.block_tables)
            self._send_to_peers(inputs, fed)
            logits = self.decode_graphs.replay(inputs, fed)[: len(batch)]
            sample_rows, prompt_logprobs = range(len(batch)), []
        else:
            logits, sample_rows, prompt_logprobs = self._run_eager(batch, fed)
        if not sample_rows:
            return LaunchedStep(batch, [], None, prompt_logprobs)
        sequences = [batch.sequences[b] for b in sample_rows]
        return LaunchedStep(batch, sequences, self.sampler(logits, sequences), prompt_logprobs)

    def capture_decode_graphs(self) -> None:
        """Every decode graph ahead of time (the engine's warm-up), on every rank at once."""
        if self.decode_graphs is not None:
            self.decode_graphs.capture_all(self.peers.send if self.peers is not None else None)

    def _run_eager(self, batch: ScheduledBatch, fed: FedTokens | None
                   ) -> tuple[torch.Tensor | None, list[int],
                              list[tuple[Sequence, list[TokenLogprob]]]]:
        """(logits of the sampled rows, which batch rows they are, the scored prompt tokens)
        of a mixed step."""
        inputs, sample_rows, scoring = self.prepare(batch)
        self._send_to_peers(inputs.to_host(), fed)
        logits = forward_step(self.model, self.cache, inputs, self.topk, self.debug_checks,
                              scoring.score_rows, fed)
        return logits, sample_rows, scoring.by_sequence()
