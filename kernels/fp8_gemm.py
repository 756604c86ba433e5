"""Triton: y = x @ W^T for an e4m3 weight W with block scales, as FP8 checkpoints run (W8A8,
dynamic activation scales). The activations are quantized per token in groups as wide as a
weight block along K (`kernels.fp8_quantize`); each K tile then is one e4m3 x e4m3 tensor-core
product, scaled by the rows' activation scales and the columns' weight scales and summed in
fp32. The weight tiles go from memory to the tensor cores as stored: decode GEMMs read every
weight byte for a few rows, so half the bytes of bf16 is the aim.

The math is `reference.fp8_linear`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.fp8_quantize import quantize_activations
from kernels.reference import BlockScales
from kernels.triton_layout import fp8_depth, scaled_e4m3_dot, weight_block_scales


@triton.jit
def _fp8_linear_kernel(
    xq, xs, w, scale, out, m, n, k, stride_xm, stride_xsm, stride_wn, stride_sn, stride_sk,
    stride_om,
    SCALE_N: tl.constexpr, SCALE_K: tl.constexpr, E8M0: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    x_rows = xq + rows.to(tl.int64)[:, None] * stride_xm
    xs_rows = xs + rows.to(tl.int64) * stride_xsm
    w_cols = w + cols.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_rows + ks[None, :], mask=(rows[:, None] < m) & (ks[None, :] < k),
                    other=0.0)
        b = tl.load(w_cols + ks[:, None], mask=(ks[:, None] < k) & (cols[None, :] < n),
                    other=0.0)
        a_scale = tl.load(xs_rows + k0 // SCALE_K, mask=rows < m, other=0.0)
        b_scale = weight_block_scales(scale, cols, k0, n, stride_sn, stride_sk, SCALE_N,
                                      SCALE_K, E8M0)
        acc += scaled_e4m3_dot(a, b, a_scale, b_scale, BLOCK_K)
    tl.store(out + rows.to(tl.int64)[:, None] * stride_om + cols[None, :],
             acc.to(out.dtype.element_ty), mask=(rows[:, None] < m) & (cols[None, :] < n))


@dataclass(frozen=True)
class GemmTile:
    rows: int  # BLOCK_M
    cols: int  # BLOCK_N
    depth: int  # BLOCK_K before the scale block caps it
    num_warps: int
    num_stages: int

    @classmethod
    def for_rows(cls, m: int, scale_block_k: int) -> "GemmTile":
        # Few rows (decode) read weights: deep pipelines keep loads in flight, and K tiles cut
        # short by 32-wide scale groups (MXFP8) take wider column tiles to stay busy; many rows
        # (prefill) take the tensor cores' large tiles. Picked by bench/fp8_tiles.py (H200).
        rows = max(16, triton.next_power_of_2(m))
        narrow_k = scale_block_k < 64
        if m <= 64:
            return cls(rows, 128 if narrow_k and m > 8 else 64, 128, 4, 6)
        return cls(128, 64, 128, 4, 4) if narrow_k else cls(128, 128, 128, 8, 3)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scales: BlockScales,
               tile: GemmTile | None = None) -> torch.Tensor:
    """Same contract as `reference.fp8_linear`; x [..., K], weight [N, K] e4m3. `tile`
    overrides the tile choice (bench/parallel.py sweeps them)."""
    n, k = weight.shape
    flat = x.reshape(-1, k)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    m = flat.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n)
    xq, xs = quantize_activations(flat, scales.block_k)
    tile = tile or GemmTile.for_rows(m, scales.block_k)
    block_k = fp8_depth(min(tile.depth, max(16, triton.next_power_of_2(k))), scales.block_k)
    scale = scales.scale
    grid = (triton.cdiv(m, tile.rows), triton.cdiv(n, tile.cols))
    _fp8_linear_kernel[grid](
        xq, xs, weight, scale, out, m, n, k, xq.stride(0), xs.stride(0), weight.stride(0),
        scale.stride(0), scale.stride(1), out.stride(0),
        SCALE_N=scales.block_n, SCALE_K=scales.block_k, E8M0=scales.e8m0,
        BLOCK_M=tile.rows, BLOCK_N=tile.cols, BLOCK_K=block_k,
        num_warps=tile.num_warps, num_stages=tile.num_stages)
    return out.view(*x.shape[:-1], n)
