"""Triton: an e4m3 weight [N, K] with block or group scales, dequantized into a dtype of the
model's (bf16 on GPU), one pass over the weight.

Weight-only GEMMs with many rows (prefill chunks) run on this and cuBLAS (`fp8_gemm.fp8_linear`):
the in-register path of `kernels.fp8_weight_only_gemm` scales every weight tile again for each
tile of rows, which costs more than one dequantizing pass once the rows are many (the crossover
is measured in bench/results/fp8_picks_<gpu>.md). The dequantized copy lives for one GEMM, so
at most one projection's weight is ever held in the model's dtype, never the model.
`reference.dequantize_fp8` is the math."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.reference import BlockScales
from kernels.triton_layout import dequantized_weight_rows, weight_only_depth

_BLOCK_N, _DEPTH = 64, 128


@triton.jit
def _dequantize_weight_kernel(w, scale, out, n, k, stride_wn, stride_sn, stride_sk, stride_on,
                              SCALE_N: tl.constexpr, SCALE_K: tl.constexpr,
                              E8M0: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    ks = k0 + tl.arange(0, BLOCK_K)
    mask = (cols[:, None] < n) & (ks[None, :] < k)
    tile = tl.load(w + cols.to(tl.int64)[:, None] * stride_wn + ks[None, :], mask=mask,
                   other=0.0)
    tile = dequantized_weight_rows(tile, scale, k0, cols, n, k, stride_sn, stride_sk, SCALE_N,
                                   SCALE_K, E8M0, BLOCK_K, out.dtype.element_ty)
    tl.store(out + cols.to(tl.int64)[:, None] * stride_on + ks[None, :], tile, mask=mask)


def dequantize_weight(weight: torch.Tensor, scales: BlockScales,
                      dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] (rows contiguous, e4m3) its scales stand for, in `dtype`."""
    n, k = weight.shape
    out = torch.empty(n, k, dtype=dtype, device=weight.device)
    block_k = weight_only_depth(min(_DEPTH, max(16, triton.next_power_of_2(k))), scales.block_k)
    grid = (triton.cdiv(n, _BLOCK_N), triton.cdiv(k, block_k))
    _dequantize_weight_kernel[grid](
        weight, scales.scale, out, n, k, weight.stride(0), scales.scale.stride(0),
        scales.scale.stride(1), out.stride(0), SCALE_N=scales.block_n, SCALE_K=scales.block_k,
        E8M0=scales.e8m0, BLOCK_N=_BLOCK_N, BLOCK_K=block_k)
    return out
