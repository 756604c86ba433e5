"""Triton: y = x @ W^T for an e4m3 weight W with block or group scales, weight-only: x stays in
its own dtype and each weight tile is scaled into it in registers, so no kernel quantizes x
first. `reference.fp8_weight_only` names the GEMMs that take this mode (MXFP8's 32-wide scale
groups, too narrow for e4m3 tensor-core K tiles); `reference.fp8_weight_only_linear` is the
math.

The operands are swapped: a program computes a tile of y^T = W x^T, weight rows by tokens. The
scaled weight tile is then the tensor cores' first operand, which Hopper's wgmma reads straight
from registers (the second comes from shared memory only), so the tile is multiplied where it
was scaled and the K tiles' products chain in one accumulator. With x first, each scaled weight
tile would go back through shared memory before its product (bench/results/fp8_picks_<gpu>.md
measured both). x's tokens, the few rows of a decode batch, are the tile's narrow side.

Decode GEMMs split K over several programs per output tile, as the W8A8 kernel does
(`kernels.split_k_sum`). The weight loads through pointers; x's tile comes through a
tensor descriptor (the bulk copy engine) when a batch fills the 64-row decode tile
(`loads_x_by_descriptor`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from kernels.reference import BlockScales
from kernels.split_k_sum import SplitSums
from kernels.triton_layout import (
    TensorDescriptor,
    split_k_range,
    store_split_k,
    tma_loads,
    weight_only_depth,
    weight_only_product,
)

if TYPE_CHECKING:
    from kernels.fp8_gemm import GemmTile

# Rows from which x's tile loads through a tensor descriptor: at 64 rows, a full decode tile,
# descriptor loads ran faster on 14 of M3's 15 projections and shards at TP 1, 2 and 4 (the
# 15th tied); at 1-33 rows pointer loads, which skip the tile's missing rows, ran as fast or
# faster in geometric mean (fp8_picks_h200.md).
X_DESC_MIN_ROWS = 64


@triton.jit
def _fp8_weight_only_kernel(
    x, w, scale, out, partials, arrivals, m, n, k, stride_xm, stride_wn, stride_sn, stride_sk,
    stride_om,
    SCALE_N: tl.constexpr, SCALE_K: tl.constexpr, E8M0: tl.constexpr, X_DESC: tl.constexpr,
    SPLIT_K: tl.constexpr, SUM_IN_GEMM: tl.constexpr, USE_PDL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Weight-row tiles first in the grid: programs side by side share x's tile in L2.
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row0 = tl.program_id(1) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    w_rows = w + cols.to(tl.int64)[:, None] * stride_wn
    x_rows = x if X_DESC else x + rows.to(tl.int64)[:, None] * stride_xm
    k_begin, k_end = split_k_range(k, BLOCK_K, SPLIT_K)
    acc = weight_only_product(x_rows, rows < m, row0, w_rows, 1, scale, cols, n, k, k_begin,
                              k_end, stride_sn, stride_sk, SCALE_N, SCALE_K, E8M0, None, X_DESC,
                              BLOCK_M, BLOCK_N, BLOCK_K)  # y^T's tile
    mask = (cols[:, None] < n) & (rows[None, :] < m)
    offsets = rows.to(tl.int64)[None, :] * stride_om + cols[:, None]
    tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    store_split_k(acc, out, partials, arrivals, offsets, mask, tile, m * n, SPLIT_K, SUM_IN_GEMM,
                  USE_PDL)


def fp8_weight_only_linear(x: torch.Tensor, weight: torch.Tensor, scales: BlockScales,
                           tile: GemmTile) -> torch.Tensor:
    """x [M, K] (rows contiguous) @ W^T for an e4m3 weight [N, K]: out [M, N] in x's dtype.
    `tile.rows` are x's rows per program, `tile.cols` the weight's."""
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    block_k = weight_only_depth(min(tile.depth, max(16, triton.next_power_of_2(k))),
                                scales.block_k)
    grid = (triton.cdiv(n, tile.cols), triton.cdiv(m, tile.rows), tile.split_k)
    x_desc = loads_x_by_descriptor(x)
    x_arg = TensorDescriptor.from_tensor(x, [tile.rows, block_k]) if x_desc else x
    splits = SplitSums.plan(grid, out, tile.rows)
    _fp8_weight_only_kernel[grid](
        x_arg, weight, scales.scale, out, splits.partials, splits.arrivals, m, n, k, x.stride(0),
        weight.stride(0), scales.scale.stride(0), scales.scale.stride(1), out.stride(0),
        SCALE_N=scales.block_n, SCALE_K=scales.block_k, E8M0=scales.e8m0, X_DESC=x_desc,
        SPLIT_K=tile.split_k, BLOCK_M=tile.rows, BLOCK_N=tile.cols, BLOCK_K=block_k,
        num_warps=tile.num_warps, num_stages=tile.num_stages, **splits.constants)
    return splits.finish()


def loads_x_by_descriptor(x: torch.Tensor) -> bool:
    """Whether `fp8_weight_only_linear` loads x [M, K] through a tensor descriptor."""
    return x.shape[0] >= X_DESC_MIN_ROWS and tma_loads(x)
