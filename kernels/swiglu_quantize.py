"""Triton: MiniMax-M3's SwiGLU-OAI with its output quantized to e4m3 per token group, in one
kernel, for the W8A8 down projection it feeds (the dense MLPs' and the shared experts').

Unfused, the activation writes its output in bf16 and the FP8 GEMM's own quantization kernel
reads it back: a second launch per MLP of every decode step (bench/results/fp8_picks_<gpu>.md
times it). Here each program computes its share of a row's groups from the gate and up
projections, rounds them to the projections' dtype (so the bytes are those of the activation
then the quantization) and quantizes them as the GEMM takes them (`reference.ActivationLayout`).
The math is `reference.quantize_activations(reference.swiglu_oai(gate, up, alpha, limit), group)`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.fp8_quantize import (
    E4M3_MIN_NORMAL,
    program_size,
    quantize_groups,
    quantized_buffers,
)
from kernels.reference import AMAX_FLOOR, E4M3_MAX, ActivationLayout, QuantizedRows


@triton.jit
def _swiglu_oai_quantize_kernel(
    gate, up, q, s, width, num_groups, alpha, limit, stride_gm, stride_um, stride_qm,
    stride_sm, stride_sg, GROUP: tl.constexpr, GROUP_P2: tl.constexpr, GROUPS: tl.constexpr,
    E4M3_MAX: tl.constexpr, AMAX_FLOOR: tl.constexpr, E4M3_MIN_NORMAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    groups = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    offsets = tl.arange(0, GROUP_P2)
    ks = groups[:, None] * GROUP + offsets[None, :]
    mask = (offsets[None, :] < GROUP) & (ks < width)
    g = tl.load(gate + row * stride_gm + ks, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up + row * stride_um + ks, mask=mask, other=0.0).to(tl.float32)
    g = tl.minimum(g, limit)
    u = tl.clamp(u, -limit, limit)
    # Rounded to the projections' dtype as the unfused activation's output is, then quantized.
    act = ((u + 1.0) * g * tl.sigmoid(g * alpha)).to(gate.dtype.element_ty).to(tl.float32)
    quantized, scale = quantize_groups(act, E4M3_MAX, AMAX_FLOOR, E4M3_MIN_NORMAL)
    tl.store(q + row * stride_qm + ks, quantized, mask=mask)
    tl.store(s + row * stride_sm + groups * stride_sg, scale, mask=groups < num_groups)


def swiglu_oai_quantized(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float,
                         layout: ActivationLayout) -> QuantizedRows:
    """`reference.swiglu_oai` of gate and up [M, I] (each with contiguous rows: columns of the
    stacked gate/up projection will do) quantized as `layout` says."""
    gate, up = (t if t.stride(-1) == 1 else t.contiguous() for t in (gate, up))
    (m, width), dtype = gate.shape, gate.dtype
    out = quantized_buffers(m, width, dtype, gate.device, layout)
    if m == 0:
        return out
    num_groups = out.scales.shape[1]
    group_p2 = triton.next_power_of_2(layout.group)
    elements, warps = program_size(m)
    groups = min(triton.next_power_of_2(num_groups), max(1, elements // group_p2))
    _swiglu_oai_quantize_kernel[(m, triton.cdiv(num_groups, groups))](
        gate, up, out.values, out.scales, width, num_groups, alpha, limit, gate.stride(0),
        up.stride(0), out.values.stride(0), out.scales.stride(0), out.scales.stride(1),
        GROUP=layout.group, GROUP_P2=group_p2, GROUPS=groups, E4M3_MAX=E4M3_MAX,
        AMAX_FLOOR=AMAX_FLOOR, E4M3_MIN_NORMAL=E4M3_MIN_NORMAL, num_warps=warps)
    return out
