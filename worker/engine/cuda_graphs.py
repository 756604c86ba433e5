"""CUDA graphs for decode steps: one launch replays a whole forward instead of hundreds.

A decode step is small (one token per sequence) and, at short contexts, bound by kernel-launch
overhead rather than by the GPU. Each (batch bucket, attention path) is captured once (all of
them by the engine's start-up warm-up, or any missing one on first use) into static input
buffers sized for the largest bucket; a step copies its metadata into
those buffers, pads the batch up to its bucket with rows that write only to the cache's scratch
page, and replays. Block tables are as wide as `max_model_len` needs, so one graph serves every
context length; the index scan skips pages past each row's length.

Two paths per bucket because the layer's dense-or-sparse choice is made on the host: "short"
(every sequence fits in topk blocks, so MSA layers attend to all blocks) and "sparse".
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kernels import BLOCK_SIZE
from worker.config import EngineConfig
from worker.engine.block_table import BlockTables, slot_mapping
from worker.engine.host_copies import copy_to_device
from worker.engine.kv_cache import AttentionMetadata, KVCache
from worker.engine.scheduler import ScheduledBatch
from worker.models.base import PagedCausalLM

if TYPE_CHECKING:
    from worker.engine.model_runner import FedTokens

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def max_graph_batch(config: EngineConfig) -> int:
    """The largest decode batch replayed from a graph (every rank sizes its buffers so)."""
    return min(config.max_num_seqs, BATCH_BUCKETS[-1])


def is_decode_step(batch: ScheduledBatch) -> bool:
    """Every sequence computes exactly its newest token, a generated one (so never an image's
    placeholder), and samples the next."""
    return all(n == 1 and seq.num_computed_tokens + 1 == seq.num_tokens > seq.num_prompt_tokens
               for seq, n in zip(batch.sequences, batch.num_tokens))


@dataclass
class DecodeInputs:
    """One graphed decode step's inputs on the host: the batch padded to its bucket."""

    bucket: int
    short: bool  # every row within topk blocks: the all-blocks path
    input_ids: torch.Tensor  # int64 [bucket]
    positions: torch.Tensor  # int64 [bucket]
    slot_mapping: torch.Tensor  # int64 [bucket]
    seq_lens: torch.Tensor  # int32 [bucket]
    block_table: torch.Tensor  # int32 [bucket, pages of the widest row]
    fed_rows: list[int] = dataclasses.field(default_factory=list)  # as StepInputs.fed_rows


class DecodeGraphs:
    """Captured decode forwards (token ids in, logits out) of one model and cache.

    `capture=False` runs the same padded, static-buffer forward eagerly: how the CPU tests check
    the padding and the graph-safe layer paths without a GPU.
    """

    def __init__(self, model: PagedCausalLM, cache: KVCache, topk: int, max_batch: int,
                 max_model_len: int, capture: bool = True):
        self.model = model
        self.cache = cache
        self.topk = topk
        self.max_model_len = max_model_len
        self.capture = capture
        self.buckets = [b for b in BATCH_BUCKETS if b < max_batch] + [max_batch]
        device = cache.k.device
        self.max_pages = -(-max_model_len // BLOCK_SIZE)

        def buffer(*shape, dtype):
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.input_ids = buffer(max_batch, dtype=torch.long)
        self.positions = buffer(max_batch, dtype=torch.long)
        self.slot_mapping = buffer(max_batch, dtype=torch.long)
        self.seq_lens = buffer(max_batch, dtype=torch.int32)
        self.block_table = buffer(max_batch, self.max_pages, dtype=torch.int32)
        self.cu_seqlens_q = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.logits: dict[tuple[int, bool], torch.Tensor] = {}
        self.pool = None  # one memory pool shared by every captured graph

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def fits(self, batch: ScheduledBatch) -> bool:
        return len(batch) <= self.max_batch and is_decode_step(batch)

    def prepare(self, batch: ScheduledBatch, block_tables: BlockTables) -> DecodeInputs:
        """The step's static-buffer contents, built on the host: also what rank 0 of a
        tensor-parallel replica sends the other ranks, which replay the same graph. A token
        still on the device enters as 0 (`replay` feeds it)."""
        bucket = next(b for b in self.buckets if b >= len(batch))
        padding = bucket - len(batch)
        scratch = self.cache.scratch_page
        sequences = batch.sequences
        lengths = [seq.num_tokens for seq in sequences]
        widest = max(len(seq.page_ids) for seq in sequences)
        table = torch.full((bucket, widest), scratch, dtype=torch.int32)
        table[: len(batch)] = block_tables.gather(sequences, widest)
        seq_lens = torch.tensor(lengths + [1] * padding, dtype=torch.int32)
        positions = seq_lens.long() - 1
        return DecodeInputs(
            bucket=bucket,
            short=max(lengths) <= self.topk * BLOCK_SIZE,
            input_ids=torch.tensor([seq.token_ids[-1] if not seq.num_pending_tokens else 0
                                    for seq in sequences] + [0] * padding),
            positions=positions,
            # Padding rows' table is the scratch page alone: their slot is its first.
            slot_mapping=slot_mapping(table, torch.arange(bucket), positions),
            seq_lens=seq_lens,
            block_table=table)

    def padding(self, bucket: int, short: bool) -> DecodeInputs:
        """A step of padding rows only, which write to the scratch page alone (captures ahead
        of time run on it, so they never touch a live sequence's pages)."""
        scratch = self.cache.scratch_page
        return DecodeInputs(
            bucket=bucket, short=short, input_ids=torch.zeros(bucket, dtype=torch.long),
            positions=torch.zeros(bucket, dtype=torch.long),
            slot_mapping=torch.full((bucket,), scratch * BLOCK_SIZE, dtype=torch.long),
            seq_lens=torch.ones(bucket, dtype=torch.int32),
            block_table=torch.full((bucket, self.max_pages), scratch, dtype=torch.int32))

    def capture_all(self, announce: Callable[[DecodeInputs], None] | None = None) -> None:
        """Every bucket and attention path ahead of time (the engine's warm-up), largest
        bucket first (smaller ones reuse its memory pool). `announce` hands each padding step
        to a replica's other ranks first, which capture alongside."""
        if not self.capture:
            return
        sparse_possible = self.max_model_len > self.topk * BLOCK_SIZE
        for bucket in reversed(self.buckets):
            for short in (True, False) if sparse_possible else (True,):
                inputs = self.padding(bucket, short)
                if announce is not None:
                    announce(inputs)
                self.replay(inputs)

    @torch.inference_mode()
    def replay(self, inputs: DecodeInputs, fed: "FedTokens | None" = None) -> torch.Tensor:
        """Logits [bucket, vocab]. A key's graph is captured at its first step; every rank of
        a tensor-parallel replica replays (and captures) at the same step, so the NCCL calls
        captured in the graphs pair up. `fed`: input tokens taken from an earlier step's
        sampled ids on the device."""
        key = (inputs.bucket, inputs.short)
        if self.capture and key not in self.graphs:
            self._capture(key)  # on padding rows: the step's own rows are loaded after
        self._load(inputs)
        if fed is not None:
            fed.write_into(self.input_ids)
        if not self.capture:
            return self._forward(*key)
        self.graphs[key].replay()
        return self.logits[key]

    def _load(self, inputs: DecodeInputs) -> None:
        bucket = inputs.bucket
        for name in ("input_ids", "positions", "slot_mapping", "seq_lens"):
            copy_to_device(getattr(self, name)[:bucket], getattr(inputs, name))
        # Columns past a row's pages keep stale ids: nothing reads past a row's length.
        widest = inputs.block_table.shape[1]
        copy_to_device(self.block_table[:bucket, :widest], inputs.block_table)

    def _forward(self, bucket: int, short: bool) -> torch.Tensor:
        seq_lens = self.seq_lens[:bucket]
        columns = torch.arange(self.max_pages, dtype=torch.int32, device=seq_lens.device)
        pages = (seq_lens + BLOCK_SIZE - 1) // BLOCK_SIZE
        all_blocks = torch.where(columns[None, :] < pages[:, None], columns, -1)
        metadata = AttentionMetadata(
            cu_seqlens_q=self.cu_seqlens_q[: bucket + 1], seq_lens=seq_lens,
            block_table=self.block_table[:bucket], slot_mapping=self.slot_mapping[:bucket],
            # Only its side of the dense-or-sparse threshold matters to the layers.
            max_seq_len=self.topk * BLOCK_SIZE if short else self.max_model_len,
            all_blocks=all_blocks)
        hidden = self.model(self.input_ids[:bucket], self.positions[:bucket], metadata,
                            self.cache, self.topk)
        return self.model.compute_logits(hidden)

    def _capture(self, key: tuple[int, bool]) -> None:
        bucket, short = key
        logger.info("capturing a CUDA graph: decode batch %d, %s attention", bucket,
                    "all-blocks" if short else "sparse")
        self._load(self.padding(bucket, short))
        self._forward(bucket, short)  # warm-up: compiles kernels, fills lazy caches
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.logits[key] = self._forward(bucket, short)
        self.pool = graph.pool()
        self.graphs[key] = graph
