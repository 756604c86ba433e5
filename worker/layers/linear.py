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

    def forward(self, x: torch.Tensor | kernels.QuantizedRows) -> torch.Tensor:
        scales = fp8.scales(self, "weight")
        if scales is None:
            return F.linear(x, self.weight)
        return kernels.fp8_linear(x, self.weight, scales)

    def input_layout(self, x: torch.Tensor) -> kernels.ActivationLayout | None:
        """How this projection's FP8 GEMM takes x [M, K] quantized, for the kernel producing x to
        quantize as it goes (`kernels.fp8_activation_layout`); None: give it x as it is."""
        scales = fp8.scales(self, "weight")
        return None if scales is None else kernels.fp8_activation_layout(x, self.weight, scales)


class StackedLinear(nn.Module):
    """Projections of one input (q, k, v and the index branch's; gate and up) as one GEMM: after
    loading, their weights' rows are stacked into one matrix, so a step launches one GEMM (and
    quantizes x once, with FP8 weights) where it launched one per projection, and the output
    comes back split. Each projection keeps the rows it loaded, so its own split across ranks.
    Projections that cannot share one matrix (one kept in full precision by
    `modules_to_not_convert`, FP8 rows that are not whole scale blocks) stay apart."""

    def __init__(self, projections: list[nn.Linear]):
        super().__init__()
        self.widths = [projection.out_features for projection in projections]
        self.stacked = _stackable(projections)
        if not self.stacked:
            self.projections = nn.ModuleList(projections)
            return
        first = projections[0]
        whole = ParallelLinear(first.in_features, sum(self.widths), bias=False, device="meta")
        whole.weight = nn.Parameter(torch.cat([p.weight for p in projections]),
                                    requires_grad=False)
        block = first.__dict__.get("fp8_block")
        if block is not None:
            setattr(whole, "weight" + fp8.SCALE_SUFFIX, nn.Parameter(
                torch.cat([fp8.scales(p, "weight").scale for p in projections]),
                requires_grad=False))
            whole.__dict__["fp8_block"] = block
        self.projections = nn.ModuleList([whole])

    def forward(self, x: torch.Tensor | kernels.QuantizedRows) -> tuple[torch.Tensor, ...]:
        if self.stacked:
            return self.projections[0](x).split(self.widths, dim=-1)
        return tuple(projection(x) for projection in self.projections)

    def input_layout(self, x: torch.Tensor) -> kernels.ActivationLayout | None:
        """`ParallelLinear.input_layout` of the stacked GEMM; None for projections apart (each
        would quantize x its own way)."""
        return self.projections[0].input_layout(x) if self.stacked else None


def stack_projections(module: nn.Module, names: list[str], into: str) -> None:
    """Replaces `module`'s projections `names` (loaded) by one `StackedLinear` named `into`."""
    setattr(module, into, StackedLinear([getattr(module, name) for name in names]))
    for name in names:
        delattr(module, name)


def _stackable(projections: list[nn.Linear]) -> bool:
    dtypes = {p.weight.dtype for p in projections}
    blocks = {p.__dict__.get("fp8_block") for p in projections}
    if len(dtypes) > 1 or len(blocks) > 1:
        return False
    (block,) = blocks
    # FP8 scales stack with their rows only where every projection is whole row blocks.
    return block is None or all(p.out_features % block[0] == 0 for p in projections)


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
