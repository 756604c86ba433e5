"""Triton: Gemma's RMSNorm with its output quantized to e4m3 per token group, in one kernel, for
the W8A8 projection the norm feeds (MiniMax-M3's q/k/v, dense MLP and shared expert inputs).

Unfused, the norm writes x in bf16 and the FP8 GEMM's own quantization kernel reads it back: a
second launch at every layer of every decode step, which costs a decode-sized GEMM a tenth of
its time (bench/results/fp8_picks_<gpu>.md). Here each program sums its row's squares, then
normalizes its share of the row's groups, rounds them to x's dtype (so the bytes are those of
the norm then the quantization) and quantizes them as the GEMM takes them
(`reference.ActivationLayout`). Where other layers take the normed x as it is (the MoE's router
and routed experts beside its FP8 shared expert), the kernel also stores those rounded rows.
The math is `reference.quantize_activations(reference.gemma_rms_norm(x, weight, eps), group)`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.fp8_quantize import E4M3_MIN_NORMAL, empty_quantized, quantize_groups
from kernels.reference import AMAX_FLOOR, E4M3_MAX, ActivationLayout, QuantizedRows


@triton.jit
def _gemma_rms_norm_quantize_kernel(
    x, weight, q, s, plain, k, num_groups, eps, stride_xm, stride_qm, stride_sm, stride_sg,
    stride_pm, STORE_PLAIN: tl.constexpr, GROUP: tl.constexpr, GROUP_P2: tl.constexpr,
    GROUPS: tl.constexpr, ROW_P2: tl.constexpr, E4M3_MAX: tl.constexpr,
    AMAX_FLOOR: tl.constexpr, E4M3_MIN_NORMAL: tl.constexpr,
):
    # GROUPS groups of one row; every program of the row sums the whole row's squares (the
    # others' loads of it hit the cache).
    row = tl.program_id(0).to(tl.int64)
    x_row = x + row * stride_xm
    whole = tl.arange(0, ROW_P2)
    v = tl.load(x_row + whole, mask=whole < k, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(v * v, axis=0) / k + eps)
    groups = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    offsets = tl.arange(0, GROUP_P2)
    ks = groups[:, None] * GROUP + offsets[None, :]
    mask = (offsets[None, :] < GROUP) & (ks < k)
    v = tl.load(x_row + ks, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(weight + ks, mask=mask, other=0.0).to(tl.float32)
    # Rounded to x's dtype as the unfused norm's output is, then quantized from there.
    rounded = (v * rstd * (1.0 + w)).to(x.dtype.element_ty)
    if STORE_PLAIN:
        tl.store(plain + row * stride_pm + ks, rounded, mask=mask)
    quantized, scale = quantize_groups(rounded.to(tl.float32), E4M3_MAX, AMAX_FLOOR,
                                       E4M3_MIN_NORMAL)
    tl.store(q + row * stride_qm + ks, quantized, mask=mask)
    tl.store(s + row * stride_sm + groups * stride_sg, scale, mask=groups < num_groups)


def gemma_rms_norm_quantized(x: torch.Tensor, weight: torch.Tensor, eps: float,
                             layout: ActivationLayout,
                             plain: torch.Tensor | None = None) -> QuantizedRows:
    """x [M, K] normed by `reference.gemma_rms_norm` and quantized as `layout` says; the normed
    rows themselves also into `plain` ([M, K] in x's dtype, contiguous rows) where given."""
    x, out = empty_quantized(x, layout)
    (m, k), num_groups = x.shape, out.scales.shape[1]
    if m == 0:
        return out
    group_p2, row_groups = triton.next_power_of_2(layout.group), triton.next_power_of_2(num_groups)
    # A decode batch's rows alone are too few programs to keep loads in flight: each row is
    # split into programs of about 1024 elements, as `fp8_quantize` splits it. Prefill chunks
    # take a row per program, which reads the row from memory once.
    groups = min(row_groups, max(1, 1024 // group_p2)) if m <= 64 else row_groups
    _gemma_rms_norm_quantize_kernel[(m, triton.cdiv(num_groups, groups))](
        x, weight, out.values, out.scales, out.values if plain is None else plain, k, num_groups,
        eps, x.stride(0), out.values.stride(0), out.scales.stride(0), out.scales.stride(1),
        0 if plain is None else plain.stride(0), STORE_PLAIN=plain is not None,
        GROUP=layout.group, GROUP_P2=group_p2, GROUPS=groups, ROW_P2=triton.next_power_of_2(k),
        E4M3_MAX=E4M3_MAX, AMAX_FLOOR=AMAX_FLOOR, E4M3_MIN_NORMAL=E4M3_MIN_NORMAL, num_warps=8)
    return out
