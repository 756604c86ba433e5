"""Triton: y = x @ W^T for an e4m3 weight W with block scales, W8A8, and the dispatch of every
dense FP8 GEMM.

W8A8 (block-scaled weights, and MXFP8 weights regrouped into 1 x 128 blocks at load by
`reference.regroup_mxfp8`; at every batch): the activations are quantized per token in groups
as wide as a weight block along K (`kernels.fp8_quantize`, dynamic scales as FP8 checkpoints
run), or come quantized by the kernel that produced them (the norm, decode attention's merge,
SwiGLU: `activation_layout` says how the GEMM takes them); each K tile then is one e4m3 x e4m3
tensor-core product, scaled by the rows' activation scales and the columns' weight scales and
summed in fp32. On Hopper the e4m3 tiles come through
tensor descriptors (the bulk copy engine) where rows are 16-byte aligned. The weights go from
memory as stored: decode GEMMs read every weight byte for a few rows, so half the bytes of bf16
is the aim.

Decode-sized GEMMs (few rows) may split K over `split_k` programs per output tile, so a
projection whose column tiles are fewer than the GPU's multiprocessors still keeps all of them
streaming weights (`kernels.split_k_sum` says how the splits are added, in order).

On Hopper a W8A8 GEMM goes to cuBLASLt's block-scaled FP8 GEMM instead (`F.scaled_mm`, x's
1 x 128 scales by the weight's) where that measured faster (bench/results/fp8_picks_<gpu>.md).
cuBLASLt runs decode batches far faster with 1 x 128 weight scales (one per weight row) than
with 128 x 128 ones, and prefill chunks slower. So decode batches take 1 x 128 scales (the
per-row copy `worker.layers.fp8` keeps of 128 x 128 ones: up to 64 rows, and more on narrow
GEMMs; or regrouped MXFP8's own), but for a single row of a narrow GEMM and, with 128 x 128
blocks at hand, 17-64 rows of a very wide one; more rows take 128 x 128 scales (without a
per-row copy, from 64 rows in GEMMs 8K to 16K wide), and regrouped MXFP8's 1 x 128 ones. The
Triton kernel keeps the rest, the layouts cuBLASLt does not take, and other GPUs.

Weight-only GEMMs (MXFP8's 32-wide scale groups kept as stored, `mxfp8_mode: weight_only`: too
narrow for e4m3 tensor-core K tiles) run
`kernels.fp8_weight_only_gemm` up to a few hundred rows; with more (prefill chunks) the weight is
dequantized into x's dtype in one pass (`kernels.fp8_dequantize`, held for this GEMM only) and
multiplied by cuBLAS, which beats scaling each weight tile again for every tile of rows. Which
mode a GEMM takes is `reference.fp8_weight_only`; the math of each is
`reference.fp8_weight_only_linear` and `reference.fp8_w8a8_linear`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.fp8_dequantize import dequantize_weight
from kernels.fp8_quantize import quantize_rows
from kernels.fp8_weight_only_gemm import fp8_weight_only_linear
from kernels.reference import ActivationLayout, BlockScales, QuantizedRows, fp8_weight_only
from kernels.split_k_sum import SplitSums
from kernels.triton_layout import (
    fp8_depth,
    gemm_operands,
    multiprocessors,
    scaled_e4m3_dot,
    sm_major,
    split_k_range,
    store_split_k,
    weight_block_scales,
)

# Rows from which a W8A8 GEMM with 128 x 128 weight scales on Hopper runs on cuBLASLt with them
# (fp8_picks_h200.md: the Triton kernel wins at 64 rows on projections up to 8192 wide and on
# those so wide that their 64-column tiles give every multiprocessor 3 programs, such as the
# stacked gate/up at TP 1; cuBLASLt between, such as the stacked q/k/v at TP 1 and gate/up at
# TP 2, and at 256 rows and prefill chunks).
CUBLAS_MIN_ROWS, CUBLAS_WIDE_MIN_ROWS, CUBLAS_WIDE_COLS = 65, 64, range(8193, 16385)
# A W8A8 GEMM with 1 x 128 weight scales (per row) runs on cuBLASLt with them (fp8_picks_h200.md:
# faster than the Triton kernel at decode batches), except a single row of a GEMM at most
# ROW_SCALES_NARROW_COLS wide: its few 128-column tiles leave most multiprocessors idle, where
# the Triton kernel splits K (M3's shared expert at TP 2 and 4, q/k/v at TP 4). With 128 x 128
# blocks at hand the Triton kernel also keeps GEMMs of ROW_SCALES_WIDE_MIN_ROWS to 64 rows wider
# than ROW_SCALES_WIDE_COLS: the same very wide GEMMs as above, whose 64-column tiles alone give
# every multiprocessor 3 programs (the stacked gate/up at TP 1).
ROW_SCALES_NARROW_COLS = 3072
ROW_SCALES_WIDE_MIN_ROWS, ROW_SCALES_WIDE_COLS = 17, CUBLAS_WIDE_COLS[-1]
# cuBLASLt takes 128 x 128 weight scales' per-row copy instead of the blocks up to
# ROW_SCALES_MAX_ROWS rows, and past them in GEMMs of at most ROW_SCALES_MAX_OUTPUTS outputs
# (rows x columns) (fp8_picks_h200.md, 'Per-row scales past 64 rows': the per-row GEMM's time
# grows with its outputs, while the blocks' takes about as long at 256 rows as at 1 on GEMMs at
# most 3072 wide; past 64 rows the two meet at about 640K outputs).
ROW_SCALES_MAX_ROWS, ROW_SCALES_MAX_OUTPUTS = 64, 640 * 1024
# Rows from which a weight-only GEMM dequantizes its weight and runs cuBLAS: any GEMM with more
# rows than a decode tile holds (fp8_picks_h200.md: from 128 rows this is faster on most of M3's
# projections at TP 1 and on all at TP 4, and the in-register kernel's many-row tile costs as
# much at 65 rows as at 128).
DEQUANTIZED_MIN_ROWS = 65
# cuBLASLt's block-scaled GEMM takes whole 128-wide blocks, token counts and K blocks in
# multiples of 4 (we pad both).
_CUBLAS_BLOCK, _CUBLAS_PAD = 128, 4


@triton.jit
def _fp8_w8a8_kernel(
    x, xs, w, scale, out, partials, arrivals, m, n, k, stride_xm, stride_xsm, stride_wn,
    stride_sn, stride_sk, stride_om,
    SCALE_N: tl.constexpr, SCALE_K: tl.constexpr, E8M0: tl.constexpr, TMA: tl.constexpr,
    SPLIT_K: tl.constexpr, SUM_IN_GEMM: tl.constexpr, USE_PDL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    if not TMA:
        x_rows = x + rows.to(tl.int64)[:, None] * stride_xm
        w_cols = w + cols.to(tl.int64)[None, :] * stride_wn
    xs_rows = xs + rows.to(tl.int64) * stride_xsm
    k_begin, k_end = split_k_range(k, BLOCK_K, SPLIT_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        if TMA:  # x and w are tensor descriptors: zero outside the matrices
            a = x.load([tl.program_id(0) * BLOCK_M, k0])
            b = w.load([tl.program_id(1) * BLOCK_N, k0]).T
        else:
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_rows + ks[None, :], mask=(rows[:, None] < m) & (ks[None, :] < k),
                        other=0.0)
            b = tl.load(w_cols + ks[:, None], mask=(ks[:, None] < k) & (cols[None, :] < n),
                        other=0.0)
        a_scale = tl.load(xs_rows + k0 // SCALE_K, mask=rows < m, other=0.0)
        b_scale = weight_block_scales(scale, cols, k0, n, stride_sn, stride_sk, SCALE_N,
                                      SCALE_K, E8M0)
        acc += scaled_e4m3_dot(a, b, a_scale, b_scale, BLOCK_K)
    mask = (rows[:, None] < m) & (cols[None, :] < n)
    offsets = rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    store_split_k(acc, out, partials, arrivals, offsets, mask, tile, m * n, SPLIT_K, SUM_IN_GEMM,
                  USE_PDL)


@dataclass(frozen=True)
class GemmTile:
    rows: int  # x's rows per program (BLOCK_M)
    cols: int  # output columns (the weight's rows) per program (BLOCK_N)
    depth: int  # BLOCK_K before the scale block caps it
    num_warps: int
    num_stages: int
    split_k: int = 1  # programs per output tile, each over a share of K
    quantize_x: bool = True  # W8A8; False: weight-only (x in its own dtype)

    @classmethod
    def for_shape(cls, m: int, n: int, k: int, scale_block_k: int, multiprocessors: int,
                  weight_only: bool | None = None) -> "GemmTile":
        # Few rows (decode) stream weights: deep pipelines keep loads in flight, and W8A8's K
        # tiles cut short by 32-wide scale groups (MXFP8) take wider column tiles to stay busy.
        # K is split until there are about 3 programs per multiprocessor for up to 16 rows,
        # 6 stages deep in W8A8. Weight-only decode tiles (x in bf16 takes more shared memory
        # than e4m3) are 3 stages deep, so 3 programs fit on a multiprocessor, and split K
        # the same way. W8A8 GEMMs of 17-64 rows are 4 stages deep and split K as
        # `_even_waves_split` says: a program's work is long enough there that a wave leaving
        # multiprocessors idle costs more than adding one more split's partial sums. Many rows
        # (prefill) take the tensor cores' large tiles (`fp8_linear` runs weight-only GEMMs of
        # that many rows dequantized on cuBLAS instead). Tiles were picked by
        # bench/fp8_tiles.py (H200) over M3's projections at TP 1, 2 and 4. `weight_only`
        # None: the mode `reference.fp8_weight_only` names.
        if weight_only is None:
            weight_only = fp8_weight_only(scale_block_k)
        rows = max(16, triton.next_power_of_2(m))
        narrow_k = scale_block_k < 64
        if m > 64:
            if weight_only:
                return cls(128, 128, 128, 8, 3, quantize_x=False)
            return cls(128, 64, 128, 4, 4) if narrow_k else cls(128, 128, 128, 8, 3)
        cols = 128 if narrow_k and m > 8 and not weight_only else 64
        depth = 128
        k_tile = depth if weight_only else min(depth, scale_block_k)  # the launcher's cap
        col_tiles, k_tiles = -(-n // cols), -(-k // k_tile)
        if weight_only or m <= 16:
            stages = 3 if weight_only else 6
            split_k = max(1, min(multiprocessors * 3 // col_tiles, k_tiles // 8, 8))
        else:
            stages = 4
            split_k = _even_waves_split(col_tiles, k_tiles, multiprocessors)
        return cls(rows, cols, depth, 4, stages, split_k, quantize_x=not weight_only)


def _even_waves_split(col_tiles: int, k_tiles: int, multiprocessors: int) -> int:
    """K splits (1-4) whose programs leave the fewest multiprocessor slots idle in the waves
    they run in, with at most 3 programs per multiprocessor (3 fit at 4 stages) and at least
    8 K tiles per split; of equally full waves, the fewest splits (each split re-reads x and
    adds a partial sum)."""
    candidates = [split for split in range(1, 5) if split == 1 or (
        k_tiles // split >= 8 and col_tiles * split <= 3 * multiprocessors)]

    def last_wave_filled(split: int) -> float:
        programs = col_tiles * split
        return programs / (multiprocessors * -(-programs // multiprocessors))

    return max(candidates, key=lambda split: (last_wave_filled(split), -split))


def fp8_linear(x: torch.Tensor | QuantizedRows, weight: torch.Tensor, scales: BlockScales,
               tile: GemmTile | None = None) -> torch.Tensor:
    """Same contract as `reference.fp8_linear`; x [..., K], weight [N, K] e4m3. x may come
    quantized already, as `activation_layout` says (out [M, N] then). `tile` overrides the tile
    choice (bench/fp8_tiles.py sweeps them)."""
    if isinstance(x, QuantizedRows):
        return w8a8_linear(x, weight, scales, tile)
    n, k = weight.shape
    flat = x.reshape(-1, k)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    m = flat.shape[0]
    if tile is None:
        if runs_dequantized(m, scales):
            return dequantized_linear(flat, weight, scales).view(*x.shape[:-1], n)
        layout = activation_layout(flat, weight, scales)
    elif tile.quantize_x:
        layout = ActivationLayout(scales.block_k, token_major=False, rows=m)
    else:
        layout = None
    if layout is None:
        tile = tile or GemmTile.for_shape(m, n, k, scales.block_k, multiprocessors(x.device))
        return fp8_weight_only_linear(flat, weight, scales, tile).view(*x.shape[:-1], n)
    return w8a8_linear(quantize_rows(flat, layout), weight, scales, tile).view(*x.shape[:-1], n)


def activation_layout(x: torch.Tensor, weight: torch.Tensor,
                      scales: BlockScales) -> ActivationLayout | None:
    """How `fp8_linear` takes x [M, K] quantized for this weight: cuBLASLt's layout where it runs
    the GEMM (`runs_on_cublas`), else the Triton W8A8 kernel's; None where x stays as it is
    (weight-only and dequantized GEMMs)."""
    if fp8_weight_only(scales.block_k):
        return None
    m, (n, k) = x.shape[0], weight.shape
    if runs_on_cublas(m, n, k, x, scales):
        return _cublas_layout(m)
    return ActivationLayout(scales.block_k, token_major=False, rows=m)


def _cublas_layout(m: int) -> ActivationLayout:
    """cuBLASLt's: 128-wide groups, token-major scales, rows padded to a multiple of 4."""
    return ActivationLayout(_CUBLAS_BLOCK, token_major=True, rows=m + -m % _CUBLAS_PAD)


def w8a8_linear(x: QuantizedRows, weight: torch.Tensor, scales: BlockScales,
                tile: GemmTile | None = None) -> torch.Tensor:
    """x @ W^T [M, N] in x's dtype, for x quantized in cuBLASLt's layout (token-major scales:
    `cublas_w8a8_linear`) or the Triton kernel's (`tile`: None for `GemmTile.for_shape`'s)."""
    if x.layout.token_major:
        return cublas_w8a8_linear(x, weight, scales)
    n, k = weight.shape
    m = x.count
    out = torch.empty(m, n, dtype=x.dtype, device=weight.device)
    if m == 0:
        return out
    tile = tile or GemmTile.for_shape(m, n, k, scales.block_k, multiprocessors(weight.device))
    block_k = fp8_depth(min(tile.depth, max(16, triton.next_power_of_2(k))), scales.block_k)
    grid = (triton.cdiv(m, tile.rows), triton.cdiv(n, tile.cols), tile.split_k)
    x_arg, w_arg, tma = gemm_operands(x.values, weight, tile.rows, tile.cols, block_k)
    splits = SplitSums.plan(grid, out, tile.rows)
    _fp8_w8a8_kernel[grid](
        x_arg, x.scales, w_arg, scales.scale, out, splits.partials, splits.arrivals, m, n, k,
        x.values.stride(0), x.scales.stride(0), weight.stride(0), scales.scale.stride(0),
        scales.scale.stride(1), out.stride(0), SCALE_N=scales.block_n, SCALE_K=scales.block_k,
        E8M0=scales.e8m0, TMA=tma, SPLIT_K=tile.split_k, BLOCK_M=tile.rows, BLOCK_N=tile.cols,
        BLOCK_K=block_k, num_warps=tile.num_warps, num_stages=tile.num_stages,
        **splits.constants)
    splits.finish()
    return out


def runs_on_cublas(m: int, n: int, k: int, x: torch.Tensor, scales: BlockScales) -> bool:
    """Whether `fp8_linear` hands this GEMM to cuBLASLt (see the module's doc)."""
    if not (scales.block_k == _CUBLAS_BLOCK and not scales.e8m0 and k % _CUBLAS_BLOCK == 0
            and x.dtype in (torch.bfloat16, torch.float16)
            # cuBLASLt's block scaling runs on SM90 only (torch refuses it elsewhere).
            and sm_major(x.device) == 9):
        return False
    if _cublas_row_scales(m, n, k, scales) is not None:
        if m == 1 and n <= ROW_SCALES_NARROW_COLS:
            return False
        return (scales.block_n == 1 or m < ROW_SCALES_WIDE_MIN_ROWS
                or n <= ROW_SCALES_WIDE_COLS)
    if scales.block_n != _CUBLAS_BLOCK:
        return False
    return m >= (CUBLAS_WIDE_MIN_ROWS if n in CUBLAS_WIDE_COLS else CUBLAS_MIN_ROWS)


def _cublas_row_scales(m: int, n: int, k: int, scales: BlockScales) -> torch.Tensor | None:
    """The 1 x 128 weight scales cuBLASLt runs this GEMM with, or None for 128 x 128 (or none):
    regrouped MXFP8's own at any rows, a per-row copy of 128 x 128 ones for decode batches (see
    ROW_SCALES_MAX_OUTPUTS); only K-block-major (as `worker.layers.fp8` stores them) and in
    whole multiples of 4 K blocks, since padding them would copy them into another layout."""
    if scales.block_n == 1:
        row_scales = scales.scale
    elif scales.per_row is not None and (m <= ROW_SCALES_MAX_ROWS
                                         or m * n <= ROW_SCALES_MAX_OUTPUTS):
        row_scales = scales.per_row
    else:
        return None
    fits = row_scales.stride(0) == 1 and (k // _CUBLAS_BLOCK) % _CUBLAS_PAD == 0
    return row_scales if fits else None


def runs_dequantized(m: int, scales: BlockScales) -> bool:
    """Whether `fp8_linear` dequantizes the weight and hands this GEMM to cuBLAS."""
    return m >= DEQUANTIZED_MIN_ROWS and fp8_weight_only(scales.block_k)


def dequantized_linear(flat: torch.Tensor, weight: torch.Tensor,
                       scales: BlockScales) -> torch.Tensor:
    """flat @ W^T, the weight dequantized into flat's dtype for this product only."""
    return F.linear(flat, dequantize_weight(weight, scales, flat.dtype))


def cublas_fp8_linear(flat: torch.Tensor, weight: torch.Tensor,
                      scales: BlockScales) -> torch.Tensor:
    """flat @ W^T through cuBLASLt (`cublas_w8a8_linear`), flat [M, K] quantized for it here."""
    return cublas_w8a8_linear(quantize_rows(flat, _cublas_layout(flat.shape[0])), weight, scales)


def cublas_w8a8_linear(x: QuantizedRows, weight: torch.Tensor,
                       scales: BlockScales) -> torch.Tensor:
    """x @ W^T through cuBLASLt, in x's dtype: x's rows quantized per 128-wide group with
    token-major scales (rows padded to a multiple of 4, cut off here), the weight's 1 x 128
    scales where `_cublas_row_scales` gives them, else its 128 x 128 ones as stored (K blocks
    zero-padded to 4)."""
    w_scales = _cublas_row_scales(x.count, *weight.shape, scales)
    if w_scales is not None:
        w_scaling = F.ScalingType.BlockWise1x128
    else:
        w_scaling, w_scales = F.ScalingType.BlockWise128x128, scales.scale
        if w_scales.shape[1] % _CUBLAS_PAD:
            w_scales = F.pad(w_scales, (0, -w_scales.shape[1] % _CUBLAS_PAD))
        w_scales = w_scales.t()
    product = F.scaled_mm(x.values, weight.t(), x.scales, F.ScalingType.BlockWise1x128,
                          w_scales, w_scaling, output_dtype=x.dtype)
    return product[:x.count]
