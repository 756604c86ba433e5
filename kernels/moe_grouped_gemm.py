"""Triton: the routed experts of a mixture-of-experts layer as grouped GEMMs.

A step's (token, expert) pairs are sorted by expert and each expert's run is padded to a whole
number of row tiles (`ExpertRows`); one launch then multiplies every tile by its own expert's
weight matrix (`grouped_gemm`). Each expert's weights are read once per row tile that chose it,
so a decode step reads about the chosen experts' bytes and nothing else, and nothing in the
layout needs the host: the sort, the padding and the tile -> expert map are tensor ops of fixed
size, so a CUDA graph captures a step whatever the router picks.

FP8 experts (e4m3 with block scales) read half the bytes and multiply in the mode
`reference.fp8_weight_only` names for their scale groups, as the dense FP8 GEMMs do: W8A8
(block scales, MXFP8 regrouped into 1 x 128 blocks) quantizes the rows per token in groups
along K, and each K tile is an e4m3 x e4m3 tensor-core product scaled by both sides' scales;
weight-only (MXFP8's 32-wide groups as stored) keeps the rows in their dtype and scales each
weight tile into it in registers, the operands swapped as in `kernels/fp8_weight_only_gemm.py`.

The math is `reference.routed_experts`; `routed_experts` here is the same contract.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.fp8_quantize import quantize_activations
from kernels.reference import BlockScales, fp8_weight_only
from kernels.triton_layout import (
    dot_precision,
    fp8_depth,
    scaled_e4m3_dot,
    weight_block_scales,
    weight_only_depth,
    weight_only_product,
)


@dataclass(frozen=True)
class ExpertRows:
    """(token, expert) pairs grouped by expert, in tiles of `tile_rows` rows.

    `rows[i]` is the pair at sorted slot i (pair p = token * top_k + choice), or the pair count
    where a tile's expert has too few pairs to fill it; `tile_expert[j]` is tile j's expert, or
    the expert count for tiles past the last one in use and for the pairs whose id is the
    expert count (experts held by other ranks): their programs return at once.
    """

    rows: torch.Tensor  # int32 [num_tiles * tile_rows]
    tile_expert: torch.Tensor  # int32 [num_tiles]
    tile_rows: int

    @classmethod
    def build(cls, chosen: torch.Tensor, num_experts: int, tile_rows: int) -> "ExpertRows":
        experts = chosen.flatten().long()
        pairs = experts.numel()
        # Tiles in use are at most one partial tile per expert plus the full ones: a bound
        # known on the host, so the buffers have fixed sizes.
        # One bucket past the experts holds the other ranks' choices (expert parallelism).
        num_tiles = triton.cdiv(pairs, tile_rows) + min(pairs, num_experts + 1)
        counts = torch.zeros(num_experts + 1, dtype=torch.long, device=chosen.device)
        counts.scatter_add_(0, experts, torch.ones_like(experts))
        padded = (counts + tile_rows - 1) // tile_rows * tile_rows
        padded_end = padded.cumsum(0)
        first_pair = counts.cumsum(0) - counts  # of each expert, in the unpadded sort
        order = experts.argsort(stable=True)
        sorted_experts = experts[order]
        rank = torch.arange(pairs, device=chosen.device) - first_pair[sorted_experts]
        slot = padded_end[sorted_experts] - padded[sorted_experts] + rank
        rows = torch.full((num_tiles * tile_rows,), pairs, dtype=torch.int32,
                          device=chosen.device)
        rows[slot] = order.to(torch.int32)
        tile_start = torch.arange(num_tiles, device=chosen.device) * tile_rows
        tile_expert = torch.searchsorted(padded_end, tile_start, right=True)
        tile_expert = tile_expert.clamp(max=num_experts).to(torch.int32)
        return cls(rows, tile_expert, tile_rows)


@triton.jit
def _grouped_gemm_kernel(
    a, a_scale, weights, out, rows, tile_expert, row_scale, w_scale,
    num_pairs, num_experts, n, k, stride_am, stride_asm, stride_we, stride_wn, stride_wk,
    stride_om, stride_se, stride_sn, stride_sk,
    A_ROW_DIV: tl.constexpr, SCALED: tl.constexpr, PRECISION: tl.constexpr,
    W_FP8: tl.constexpr, WEIGHT_ONLY: tl.constexpr, SCALE_N: tl.constexpr,
    SCALE_K: tl.constexpr, E8M0: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    expert = tl.load(tile_expert + tile)
    if expert >= num_experts:  # past the tiles in use
        return
    pair = tl.load(rows + tile * BLOCK_M + tl.arange(0, BLOCK_M))
    real = pair < num_pairs
    # Row p of the output is pair p; its input row is token p // top_k of the layer's input
    # (first projection) or row p of the activations (second).
    a_row = (pair // A_ROW_DIV).to(tl.int64)
    a_rows = a + a_row[:, None] * stride_am
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    expert_weights = weights + expert.to(tl.int64) * stride_we
    expert_scales = w_scale + expert.to(tl.int64) * stride_se
    if WEIGHT_ONLY:
        w_rows = expert_weights + cols.to(tl.int64)[:, None] * stride_wn
        acc = weight_only_product(a_rows, real, 0, w_rows, stride_wk, expert_scales, cols, n, k,
                                  0, k, stride_sn, stride_sk, SCALE_N, SCALE_K, E8M0, PRECISION,
                                  False, BLOCK_M, BLOCK_N, BLOCK_K).T
    else:
        w = expert_weights + cols[None, :] * stride_wn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(a_rows + ks[None, :], mask=real[:, None] & (ks[None, :] < k), other=0.0)
            wt = tl.load(w + ks[:, None] * stride_wk,
                         mask=(ks[:, None] < k) & (cols[None, :] < n), other=0.0)
            if W_FP8:  # e4m3 rows and weights: scale the tile's product by both sides' scales
                x_scale = tl.load(a_scale + a_row * stride_asm + k0 // SCALE_K, mask=real,
                                  other=0.0)
                wt_scale = weight_block_scales(expert_scales, cols, k0, n, stride_sn, stride_sk,
                                               SCALE_N, SCALE_K, E8M0)
                acc += scaled_e4m3_dot(x, wt, x_scale, wt_scale, BLOCK_K)
            else:
                acc = tl.dot(x, wt, acc, input_precision=PRECISION)
    if SCALED:
        acc *= tl.load(row_scale + pair, mask=real, other=0.0)[:, None]
    tl.store(out + pair.to(tl.int64)[:, None] * stride_om + cols[None, :],
             acc.to(out.dtype.element_ty), mask=real[:, None] & (cols[None, :] < n))


@dataclass(frozen=True)
class TileShape:
    rows: int  # BLOCK_M: (token, expert) pairs a program multiplies
    cols: int  # BLOCK_N
    depth: int  # BLOCK_K
    num_warps: int
    num_stages: int = 3

    @classmethod
    def for_pairs(cls, pairs: int, scale_block_k: int | None = None) -> "TileShape":
        # Decode steps read weights (a few pairs an expert: small row tiles waste nothing but
        # padding, deep K tiles keep loads in flight); prefill chunks are compute-bound and
        # take the tensor cores' big tiles. FP8 experts (`scale_block_k` given) halve the bytes
        # a decode tile waits for, so small row tiles pay up to batch 64 (256 pairs). W8A8's
        # K tiles cut short by scale groups narrower than 64 take wider column tiles; in
        # prefill each K tile's scaled product is a second accumulator, so FP8 tiles stay
        # under 128 x 128. Weight-only experts (MXFP8) hold 64 weight rows a program, the
        # tensor cores' smallest register operand, 3 stages deep (deeper measured slower).
        # Chosen by bench/moe_tiles.py (bf16) and bench/fp8_tiles.py (FP8) at M3's width.
        if scale_block_k is not None:
            if fp8_weight_only(scale_block_k):
                return cls(16, 64, 128, 4, 3) if pairs <= 256 else cls(128, 64, 128, 4, 3)
            narrow_k = scale_block_k < 64
            if pairs > 256:
                return cls(64, 128, 128, 4, 4) if narrow_k else cls(128, 128, 128, 8, 3)
            if narrow_k and pairs > 64:
                return cls(32, 128, 128, 4, num_stages=4)
            return cls(16, 64, 128, 4, num_stages=6)
        if pairs <= 64:
            return cls(16, 64, 128, 4, num_stages=4)
        if pairs < 4096:
            return cls(64, 64, 64, 4)
        return cls(128, 256, 64, 8)


def grouped_gemm(a: torch.Tensor, weights: torch.Tensor, layout: ExpertRows, num_pairs: int,
                 a_row_div: int, shape: TileShape,
                 row_scale: torch.Tensor | None = None, zeroed: bool = False,
                 scales: BlockScales | None = None) -> torch.Tensor:
    """out [num_pairs, N]: row p = a[p // a_row_div] @ weights[expert of p].T (x row_scale[p]).
    Rows of pairs whose expert is on another rank are left unwritten: zeros if `zeroed`.
    `scales`: the weights are e4m3 with these block scales (W8A8: `a` is quantized to match)."""
    num_experts, n, k = weights.shape
    out = (torch.zeros if zeroed else torch.empty)(num_pairs, n, dtype=a.dtype, device=a.device)
    block_n = min(shape.cols, max(16, triton.next_power_of_2(n)))
    block_k = min(shape.depth, max(16, triton.next_power_of_2(k)))
    weight_only = scales is not None and fp8_weight_only(scales.block_k)
    a_scale = w_scale = weights  # unused unless the weights are e4m3
    if weight_only:
        block_k = weight_only_depth(block_k, scales.block_k)
        w_scale = scales.scale
    elif scales is not None:
        block_k = fp8_depth(block_k, scales.block_k)
        a, a_scale = quantize_activations(a, scales.block_k)
        w_scale = scales.scale
    grid = (layout.tile_expert.numel(), triton.cdiv(n, block_n))
    _grouped_gemm_kernel[grid](
        a, a_scale, weights, out, layout.rows, layout.tile_expert,
        row_scale if row_scale is not None else out, w_scale,
        num_pairs, num_experts, n, k, a.stride(0), a_scale.stride(0), weights.stride(0),
        weights.stride(1), weights.stride(2), out.stride(0),
        *(w_scale.stride() if scales else (0, 0, 0)),
        A_ROW_DIV=a_row_div, SCALED=row_scale is not None, PRECISION=dot_precision(out.dtype),
        W_FP8=scales is not None, WEIGHT_ONLY=weight_only,
        SCALE_N=scales.block_n if scales else 1,
        SCALE_K=scales.block_k if scales else 1, E8M0=bool(scales and scales.e8m0),
        BLOCK_M=layout.tile_rows, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=shape.num_warps, num_stages=shape.num_stages)
    return out


def routed_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                   route_weights: torch.Tensor, chosen: torch.Tensor,
                   activation: Callable[[torch.Tensor], torch.Tensor],
                   w13_scales: BlockScales | None = None,
                   w2_scales: BlockScales | None = None) -> torch.Tensor:
    """Same contract as `reference.routed_experts`: two launches, one per projection."""
    num_tokens, top_k = chosen.shape
    pairs = num_tokens * top_k
    if pairs == 0:
        return torch.zeros_like(x)
    shape = TileShape.for_pairs(pairs, w13_scales.block_k if w13_scales else None)
    layout = ExpertRows.build(chosen, w13.shape[0], shape.rows)
    hidden = activation(grouped_gemm(x, w13, layout, pairs, top_k, shape, scales=w13_scales))
    # The second pass's rows are summed per token, so other ranks' pairs must add zeros; the
    # first pass's rows for them are never read.
    out = grouped_gemm(hidden.contiguous(), w2, layout, pairs, 1, shape,
                       row_scale=route_weights.flatten().float().contiguous(), zeroed=True,
                       scales=w2_scales)
    return out.view(num_tokens, top_k, -1).sum(dim=1)
