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

import logging

import torch

from kernels import BLOCK_SIZE
from worker.engine.kv_cache import AttentionMetadata, KVCache
from worker.engine.scheduler import ScheduledBatch
from worker.models.base import PagedCausalLM

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def is_decode_step(batch: ScheduledBatch) -> bool:
    """Every sequence computes exactly its newest token, a generated one (so never an image's
    placeholder), and samples the next."""
    return all(n == 1 and seq.num_computed_tokens + 1 == seq.num_tokens > seq.num_prompt_tokens
               for seq, n in zip(batch.sequences, batch.num_tokens))


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

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [len(batch), vocab] of each sequence's next token."""
        size = len(batch)
        bucket = next(b for b in self.buckets if b >= size)
        short = max(seq.num_tokens for seq in batch.sequences) <= self.topk * BLOCK_SIZE
        self._fill(batch, bucket)
        key = (bucket, short)
        if not self.capture:
            return self._forward(bucket, short)[:size]
        if key not in self.graphs:
            self._capture(key)
            self._fill(batch, bucket)  # capture's warm-up step ran on padding rows only
        self.graphs[key].replay()
        return self.logits[key][:size]

    def capture_all(self) -> None:
        """Every bucket and attention path ahead of time (the engine's warm-up)."""
        if not self.capture:
            return
        sparse_possible = self.max_model_len > self.topk * BLOCK_SIZE
        for bucket in reversed(self.buckets):  # largest first: smaller ones reuse its pool
            for short in (True, False) if sparse_possible else (True,):
                if (bucket, short) not in self.graphs:
                    self._capture((bucket, short))

    def _fill(self, batch: ScheduledBatch, bucket: int) -> None:
        """Copies the step into the static buffers; rows past the batch become padding."""
        size = len(batch)
        scratch = self.cache.scratch_page
        positions = [seq.num_tokens - 1 for seq in batch.sequences]
        widest = max(len(seq.page_ids) for seq in batch.sequences)
        table = torch.full((bucket, widest), scratch, dtype=torch.int32)
        for row, seq in enumerate(batch.sequences):
            table[row, : len(seq.page_ids)] = torch.tensor(seq.page_ids, dtype=torch.int32)
        padding = bucket - size
        host = {
            "input_ids": [seq.token_ids[-1] for seq in batch.sequences] + [0] * padding,
            "positions": positions + [0] * padding,
            "slot_mapping": [seq.page_ids[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
                             for seq, p in zip(batch.sequences, positions)]
            + [scratch * BLOCK_SIZE] * padding,
            "seq_lens": [p + 1 for p in positions] + [1] * padding,
        }
        for name, values in host.items():
            static = getattr(self, name)
            static[:bucket].copy_(torch.tensor(values, dtype=static.dtype), non_blocking=True)
        # Columns past a row's pages keep stale ids: nothing reads past a row's length.
        self.block_table[:bucket, :widest].copy_(table, non_blocking=True)

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
        # Capture runs on padding rows only, so it never touches a live sequence's pages.
        self.input_ids.zero_()
        self.positions.zero_()
        self.slot_mapping.fill_(self.cache.scratch_page * BLOCK_SIZE)
        self.seq_lens.fill_(1)
        self.block_table.fill_(self.cache.scratch_page)
        self._forward(bucket, short)  # warm-up: compiles kernels, fills lazy caches
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.logits[key] = self._forward(bucket, short)
        self.pool = graph.pool()
        self.graphs[key] = graph
