"""Triton: y = x @ W^T for an e4m3 weight W with block scales, as FP8 checkpoints run (W8A8,
dynamic activation scales). The activations are quantized per token in groups as wide as a
weight block along K (`kernels.fp8_quantize`); each K tile then is one e4m3 x e4m3
tensor-core product, scaled by the rows' activation scales and the columns' weight scales and
summed in fp32. The weight tiles go from memory to the tensor cores as stored: decode GEMMs
read every weight byte for a few rows, so half the bytes of bf16 is the aim.

Decode-sized GEMMs (few rows) may split K over `split_k` programs per output tile, so a
projection whose column tiles are fewer than the GPU's multiprocessors still keeps all of them
streaming weights. Each split writes fp32 partial sums; the split that arrives last (an atomic
count per output tile) adds them in split order, so the result does not depend on which
finished first, and resets the count for the next launch (CUDA-graph replays included). The
counts are one buffer per device: the GEMMs run on one stream, one after another.

The math is `reference.fp8_linear`."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.fp8_quantize import quantize_activations
from kernels.reference import BlockScales
from kernels.triton_layout import fp8_depth, multiprocessors, scaled_e4m3_dot, weight_block_scales

# Output tiles one launch may split over K: the size of each device's arrival counts.
_MAX_SPLIT_TILES = 1 << 16


@triton.jit
def _fp8_linear_kernel(
    xq, xs, w, scale, out, partials, arrivals, m, n, k, stride_xm, stride_xsm, stride_wn,
    stride_sn, stride_sk, stride_om,
    SCALE_N: tl.constexpr, SCALE_K: tl.constexpr, E8M0: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    x_rows = xq + rows.to(tl.int64)[:, None] * stride_xm
    xs_rows = xs + rows.to(tl.int64) * stride_xsm
    w_cols = w + cols.to(tl.int64)[None, :] * stride_wn
    tiles_per_split = tl.cdiv(tl.cdiv(k, BLOCK_K), SPLIT_K)
    k_begin = tl.program_id(2) * tiles_per_split * BLOCK_K
    k_end = tl.minimum(k, k_begin + tiles_per_split * BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_rows + ks[None, :], mask=(rows[:, None] < m) & (ks[None, :] < k),
                    other=0.0)
        b = tl.load(w_cols + ks[:, None], mask=(ks[:, None] < k) & (cols[None, :] < n),
                    other=0.0)
        a_scale = tl.load(xs_rows + k0 // SCALE_K, mask=rows < m, other=0.0)
        b_scale = weight_block_scales(scale, cols, k0, n, stride_sn, stride_sk, SCALE_N,
                                      SCALE_K, E8M0)
        acc += scaled_e4m3_dot(a, b, a_scale, b_scale, BLOCK_K)
    out_mask = (rows[:, None] < m) & (cols[None, :] < n)
    out_offsets = rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    if SPLIT_K == 1:
        tl.store(out + out_offsets, acc.to(out.dtype.element_ty), mask=out_mask)
    else:
        # Partials are [SPLIT_K, m, n] with out's row stride (n).
        tl.store(partials + tl.program_id(2) * m * n + out_offsets, acc, mask=out_mask)
        # Every thread's partial is stored before the count moves (acq_rel at GPU scope).
        tl.debug_barrier()
        tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        if tl.atomic_add(arrivals + tile, 1, sem="acq_rel") == SPLIT_K - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for split in range(SPLIT_K):
                # .cg reads from L2, where the other programs' stores landed.
                total += tl.load(partials + split * m * n + out_offsets, mask=out_mask,
                                 cache_modifier=".cg")
            tl.store(out + out_offsets, total.to(out.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(arrivals + tile, 0)


@dataclass(frozen=True)
class GemmTile:
    rows: int  # BLOCK_M
    cols: int  # BLOCK_N
    depth: int  # BLOCK_K before the scale block caps it
    num_warps: int
    num_stages: int
    split_k: int = 1  # programs per output tile, each over a share of K

    @classmethod
    def for_shape(cls, m: int, n: int, k: int, scale_block_k: int,
                  multiprocessors: int) -> "GemmTile":
        # Few rows (decode) stream weights: deep pipelines keep loads in flight, and K tiles cut
        # short by 32-wide scale groups (MXFP8) take wider column tiles to stay busy. K is
        # split until there are about 3 programs per multiprocessor for a handful of rows, 1.5
        # for more (each split re-reads x and adds a partial sum). Many rows (prefill) take
        # the tensor cores' large tiles. Picked by bench/fp8_tiles.py (H200).
        rows = max(16, triton.next_power_of_2(m))
        narrow_k = scale_block_k < 64
        if m > 64:
            return cls(128, 64, 128, 4, 4) if narrow_k else cls(128, 128, 128, 8, 3)
        cols = 128 if narrow_k and m > 8 else 64
        col_tiles, k_tiles = -(-n // cols), -(-k // min(128, scale_block_k))
        programs = multiprocessors * (3 if m <= 16 else 1.5)
        split_k = max(1, min(int(programs // col_tiles), k_tiles // 8, 8))
        return cls(rows, cols, 128, 4, 6, split_k)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scales: BlockScales,
               tile: GemmTile | None = None) -> torch.Tensor:
    """Same contract as `reference.fp8_linear`; x [..., K], weight [N, K] e4m3. `tile`
    overrides the tile choice (bench/fp8_tiles.py sweeps them)."""
    n, k = weight.shape
    flat = x.reshape(-1, k)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    m = flat.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n)
    tile = tile or GemmTile.for_shape(m, n, k, scales.block_k, multiprocessors(x.device))
    block_k = fp8_depth(min(tile.depth, max(16, triton.next_power_of_2(k))), scales.block_k)
    xq, xs = quantize_activations(flat, scales.block_k)
    grid = (triton.cdiv(m, tile.rows), triton.cdiv(n, tile.cols), tile.split_k)
    if tile.split_k > 1:
        if grid[0] * grid[1] > _MAX_SPLIT_TILES:
            raise ValueError(f"an FP8 GEMM of {grid[0] * grid[1]} output tiles can't split K")
        partials = torch.empty(tile.split_k, m, n, dtype=torch.float32, device=x.device)
        arrivals = _arrival_counts(x.device)
    else:
        partials = arrivals = out  # unused
    scale = scales.scale
    _fp8_linear_kernel[grid](
        xq, xs, weight, scale, out, partials, arrivals, m, n, k, xq.stride(0), xs.stride(0),
        weight.stride(0), scale.stride(0), scale.stride(1), out.stride(0),
        SCALE_N=scales.block_n, SCALE_K=scales.block_k, E8M0=scales.e8m0,
        SPLIT_K=tile.split_k, BLOCK_M=tile.rows, BLOCK_N=tile.cols, BLOCK_K=block_k,
        num_warps=tile.num_warps, num_stages=tile.num_stages)
    return out.view(*x.shape[:-1], n)


@functools.lru_cache(maxsize=None)
def _arrival_counts(device: torch.device) -> torch.Tensor:
    """Each output tile's count of finished K splits: zero between launches (the last split
    resets it), so one buffer serves every split GEMM on the device, graph replays included."""
    return torch.zeros(_MAX_SPLIT_TILES, dtype=torch.int32, device=device)

