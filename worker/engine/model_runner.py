"""Runs one scheduled step: packs tokens, builds the spec's paged metadata, forwards, samples."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import BLOCK_SIZE
from worker.engine.cuda_graphs import DecodeGraphs
from worker.engine.kv_cache import AttentionMetadata, KVCache
from worker.engine.multimodal import VisionEncoder
from worker.engine.sampler import Sampler
from worker.engine.scheduler import ScheduledBatch
from worker.engine.sequence import Sequence
from worker.models.base import PagedCausalLM
from worker.wire import TokenLogprob


@dataclass
class StepResult:
    """The sequences whose last token was computed this step, with what they sampled."""

    sequences: list[Sequence]
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]

    def extend(self, other: "StepResult") -> None:
        self.sequences += other.sequences
        self.token_ids += other.token_ids
        self.logprobs += other.logprobs


class ModelRunner:
    """`decode_graphs`, when given, replays the decode steps that fit it (CUDA only);
    `vision` embeds the images and videos of the prompt chunks that reach them."""

    def __init__(self, model: PagedCausalLM, cache: KVCache, sampler: Sampler,
                 topk: int | None = None, debug_checks: bool = False,
                 decode_graphs: DecodeGraphs | None = None, vision: VisionEncoder | None = None):
        self.model = model
        self.vision = vision
        self.cache = cache
        self.sampler = sampler
        self.topk = topk
        self.debug_checks = debug_checks
        self.decode_graphs = decode_graphs
        self.device = cache.k.device

    def prepare(self, batch: ScheduledBatch):
        """(input_ids, positions, metadata, rows whose logits are sampled) for a mixed step."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu_seqlens_q = [0]
        seq_lens = []
        sample_rows = []
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

        def to_device(values, dtype):
            return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

        metadata = AttentionMetadata(
            cu_seqlens_q=to_device(cu_seqlens_q, torch.int32),
            seq_lens=to_device(seq_lens, torch.int32),
            block_table=block_table.to(self.device, non_blocking=True),
            slot_mapping=to_device(slots, torch.long),
            max_seq_len=max(seq_lens),
            check_indices=self.debug_checks,
        )
        logit_rows = [cu_seqlens_q[b + 1] - 1 for b in sample_rows]
        return (to_device(input_ids, torch.long), to_device(positions, torch.long), metadata,
                sample_rows, logit_rows, self._mm_embeds(batch, cu_seqlens_q))

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
            logits = self.decode_graphs.run(batch)
            sample_rows = range(len(batch))
        else:
            logits, sample_rows = self._run_eager(batch)
        if not sample_rows:
            return StepResult([], [], [])
        sequences = [batch.sequences[b] for b in sample_rows]
        token_ids, logprobs = self.sampler(logits, sequences)
        return StepResult(sequences, token_ids, logprobs)

    def _run_eager(self, batch: ScheduledBatch) -> tuple[torch.Tensor | None, list[int]]:
        """(logits of the sampled rows, which batch rows they are) of a mixed step."""
        input_ids, positions, metadata, sample_rows, logit_rows, mm_embeds = self.prepare(batch)
        hidden = self.model(input_ids, positions, metadata, self.cache, self.topk, mm_embeds)
        if not sample_rows:
            return None, []
        return (self.model.compute_logits(hidden[torch.tensor(logit_rows, device=self.device)]),
                sample_rows)
