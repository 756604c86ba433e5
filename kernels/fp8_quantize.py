"""Triton: activations quantized to e4m3 per token in groups along K (the "dynamic" activation
scheme of FP8 checkpoints), so the FP8 GEMMs multiply e4m3 by e4m3 on the tensor cores and the
weight tiles go from memory to the tensor cores untouched.

Each group's largest magnitude maps to e4m3's largest value; its scale is stored in fp32. The
math is `reference.quantize_activations`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.reference import AMAX_FLOOR, E4M3, E4M3_MAX


@triton.jit
def _quantize_groups_kernel(x, q, s, k, stride_xm, stride_qm, stride_sm, stride_sg,
                            GROUP: tl.constexpr, GROUP_P2: tl.constexpr, GROUPS: tl.constexpr,
                            EVEN: tl.constexpr, E4M3_MAX: tl.constexpr,
                            AMAX_FLOOR: tl.constexpr, E4M3_MIN_NORMAL: tl.constexpr):
    # One row's GROUPS groups; GROUPS divides the row's groups, so no program runs past them.
    row = tl.program_id(0).to(tl.int64)
    groups = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    offsets = tl.arange(0, GROUP_P2)
    ks = groups[:, None] * GROUP + offsets[None, :]
    if EVEN:  # whole power-of-two groups: unmasked, vectorized loads and stores
        mask = None
        v = tl.load(x + row * stride_xm + ks).to(tl.float32)
    else:
        mask = (offsets[None, :] < GROUP) & (ks < k)
        v = tl.load(x + row * stride_xm + ks, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(v), axis=1), AMAX_FLOOR) / E4M3_MAX
    # Rounded division, as torch divides: the same bytes as the reference.
    quantized = tl.clamp(tl.div_rn(v, scale[:, None]), -E4M3_MAX, E4M3_MAX)
    # Normal values are rounded to e4m3's 3 mantissa bits (to nearest, ties to even) in the
    # fp32 bits, so the cast below is exact: Triton's interpreter, which the CPU tests run,
    # drops the carry when a cast rounds up into the next power of two. Subnormals are left
    # to the cast.
    bits = quantized.to(tl.int32, bitcast=True)
    rounded = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    quantized = tl.where(tl.abs(quantized) >= E4M3_MIN_NORMAL, rounded, quantized)
    tl.store(q + row * stride_qm + ks, quantized.to(tl.float8e4nv), mask=mask)
    tl.store(s + row * stride_sm + groups * stride_sg, scale)


def quantize_activations(x: torch.Tensor, group: int, token_major_scales: bool = False,
                         rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 [R, K], fp32 scales [R, ceil(K / group)]) for x [M, K] (rows contiguous); the
    scales' strides are (1, R) when `token_major_scales`, else (groups, 1). R is `rows` (M when
    None): rows past M are left unwritten, for a GEMM that takes whole multiples of rows."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    rows = m if rows is None else rows
    num_groups = -(-k // group)
    q = torch.empty(rows, k, dtype=E4M3, device=x.device)
    if token_major_scales:
        s = torch.empty(num_groups, rows, dtype=torch.float32, device=x.device).t()
    else:
        s = torch.empty(rows, num_groups, dtype=torch.float32, device=x.device)
    if m == 0:
        return q, s
    group_p2 = triton.next_power_of_2(group)
    # Small programs, many warps for a decode batch (its rows alone are too few programs to
    # keep the GPU's loads in flight); larger ones for prefill (bench/results/fp8_picks_<gpu>.md
    # times this kernel alone). The largest power of two dividing a row's groups: no program
    # runs past them.
    elements, warps = (1024, 8) if m <= 64 else (2048, 4)
    groups = min(num_groups & -num_groups, max(1, elements // group_p2))
    _quantize_groups_kernel[(m, num_groups // groups)](
        x, q, s, k, x.stride(0), q.stride(0), s.stride(0), s.stride(1), GROUP=group,
        GROUP_P2=group_p2, GROUPS=groups, EVEN=group == group_p2 and k % group == 0,
        E4M3_MAX=E4M3_MAX, AMAX_FLOOR=AMAX_FLOOR, E4M3_MIN_NORMAL=2.0 ** -6, num_warps=warps)
    return q, s
