"""Layers split across the ranks of a tensor-parallel replica (Megatron-style). With one rank
each is exactly the `nn.Linear` / `nn.Embedding` it extends, checkpoint names included."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from worker import parallel
from worker.layers import fp8
from worker.parallel import ShardSpec, set_shard


class ParallelLinear(nn.Linear):
    """A projection whose weight may be FP8 (`worker.layers.fp8`): e4m3 with block scales,
    multiplied as stored."""

    fp8_weights = {"weight": 1}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scales = fp8.scales(self, "weight")
        if scales is None:
            return F.linear(x, self.weight)
        return kernels.fp8_linear(x, self.weight, scales)


class ColumnParallelLinear(ParallelLinear):
    """Output features split: each rank computes its slice of y = x W^T (its heads, its MLP
    columns), no communication. `parts`/`part` override the split for weights replicated over
    groups of ranks (KV heads when ranks outnumber them)."""

    def __init__(self, in_features: int, out_features: int, parts: int | None = None,
                 part: int | None = None):
        state = parallel.state()
        parts = state.size if parts is None else parts
        part = state.rank if part is None else part
        if out_features % parts:
            raise ValueError(f"{out_features} output features do not split into {parts} parts")
        super().__init__(in_features, out_features // parts, bias=False)
        set_shard(self, "weight", ShardSpec(dim=0, parts=parts, part=part))


class RowParallelLinear(ParallelLinear):
    """Input features split: each rank's output is a partial sum. The caller all-reduces once
    for all the partial sums of its block (attention, or routed plus shared experts)."""

    def __init__(self, in_features: int, out_features: int):
        state = parallel.state()
        _, local = state.part(in_features, f"{in_features} input features")
        super().__init__(local, out_features, bias=False)
        set_shard(self, "weight", ShardSpec(dim=1, parts=state.size, part=state.rank))


class VocabParallelEmbedding(nn.Embedding):
    """Each rank holds a contiguous slice of the vocabulary; a token's row comes from the rank
    that holds it and the others add zeros (one all-reduce)."""

    def __init__(self, vocab_size: int, hidden: int):
        state = parallel.state()
        self.vocab_start, local = state.part(vocab_size, "vocab_size")
        super().__init__(local, hidden)
        set_shard(self, "weight", ShardSpec(dim=0, parts=state.size, part=state.rank))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if parallel.state().size == 1:
            return super().forward(ids)
        local = ids - self.vocab_start
        mine = (local >= 0) & (local < self.num_embeddings)
        rows = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight)
        return parallel.all_reduce(rows * mine[:, None].to(rows.dtype))


class ParallelLMHead(ColumnParallelLinear):
    """Vocabulary-parallel logits, gathered whole on every rank (rank 0 samples)."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return parallel.all_gather_last_dim(self(hidden)).float()
