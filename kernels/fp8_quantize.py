"""Triton: activations quantized to e4m3 per token in groups along K (the "dynamic" activation
scheme of FP8 checkpoints), so the FP8 GEMMs multiply e4m3 by e4m3 on the tensor cores and the
weight tiles go from memory to the tensor cores untouched.

Each group's largest magnitude maps to e4m3's largest value; its scale is stored in fp32. The
math is `reference.quantize_activations`; the layout (group width, scales token-major or not,
rows written) is the GEMM's, `reference.ActivationLayout`. Kernels that produce activations and
quantize them in the same pass (`kernels.rms_norm_quantize`, `kernels.lse_merge`,
`kernels.swiglu_quantize`) share `quantize_groups` and `quantized_buffers`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.reference import AMAX_FLOOR, E4M3, E4M3_MAX, ActivationLayout, QuantizedRows

E4M3_MIN_NORMAL = 2.0 ** -6


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
    quantized, scale = quantize_groups(v, E4M3_MAX, AMAX_FLOOR, E4M3_MIN_NORMAL)
    tl.store(q + row * stride_qm + ks, quantized, mask=mask)
    tl.store(s + row * stride_sm + groups * stride_sg, scale)


@triton.jit
def quantize_groups(v, E4M3_MAX: tl.constexpr, AMAX_FLOOR: tl.constexpr,
                    E4M3_MIN_NORMAL: tl.constexpr):
    """Groups of fp32 values v [groups, width] as e4m3, each group's largest magnitude mapped to
    e4m3's largest value: (e4m3 [groups, width], fp32 scales [groups])."""
    scale = tl.maximum(tl.max(tl.abs(v), axis=1), AMAX_FLOOR) / E4M3_MAX
    return _to_e4m3(v, scale, E4M3_MAX, E4M3_MIN_NORMAL), scale


@triton.jit
def _to_e4m3(v, scale, E4M3_MAX: tl.constexpr, E4M3_MIN_NORMAL: tl.constexpr):
    """Groups of fp32 values v [groups, width] divided by their scales [groups], as e4m3."""
    # Rounded division, as torch divides: the same bytes as the reference.
    quantized = tl.clamp(tl.div_rn(v, scale[:, None]), -E4M3_MAX, E4M3_MAX)
    # Values are rounded to e4m3's precision (to nearest, ties to even) in fp32 first, so the
    # cast below is exact: Triton's interpreter, which the CPU tests run, drops the carry when a
    # cast rounds up into the next power of two. Normal values: 3 mantissa bits, in the fp32
    # bits. Subnormals: multiples of 2 ** -9, by adding and taking away a number whose fp32
    # spacing is 2 ** -9, on the magnitude (a negative value that rounds to zero stays -0, as
    # torch's cast leaves it).
    bits = quantized.to(tl.int32, bitcast=True)
    rounded = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    magnitude = (tl.abs(quantized) + 24576.0) - 24576.0  # 1.5 * 2 ** 14
    subnormal = tl.where(bits < 0, -magnitude, magnitude)
    quantized = tl.where(tl.abs(quantized) >= E4M3_MIN_NORMAL, rounded, subnormal)
    return quantized.to(tl.float8e4nv)


def quantized_buffers(count: int, width: int, dtype: torch.dtype, device: torch.device,
                      layout: ActivationLayout) -> QuantizedRows:
    """Unwritten buffers for `count` rows of `width` values in `dtype`, quantized as `layout`
    says: what a kernel producing those rows fills for the GEMM after it."""
    groups = -(-width // layout.group)
    values = torch.empty(layout.rows, width, dtype=E4M3, device=device)
    if layout.token_major:
        scales = torch.empty(groups, layout.rows, dtype=torch.float32, device=device).t()
    else:
        scales = torch.empty(layout.rows, groups, dtype=torch.float32, device=device)
    return QuantizedRows(values, scales, layout, count, dtype)


def empty_quantized(x: torch.Tensor, layout: ActivationLayout) -> tuple[torch.Tensor,
                                                                         QuantizedRows]:
    """x [M, K] with contiguous rows, and the buffers a kernel quantizing it as `layout` says
    writes into."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x, quantized_buffers(x.shape[0], x.shape[1], x.dtype, x.device, layout)


def program_size(rows: int) -> tuple[int, int]:
    """(values, warps) of a program that quantizes a share of a row, for `rows` rows: small
    programs with many warps for a decode batch (its rows alone are too few programs to keep
    the GPU's loads in flight), larger ones for prefill chunks (bench/results/fp8_picks_<gpu>.md
    times `quantize_rows` alone)."""
    return (1024, 8) if rows <= 64 else (2048, 4)


def quantize_rows(x: torch.Tensor, layout: ActivationLayout) -> QuantizedRows:
    """x [M, K] quantized per token in groups, as `layout` says."""
    x, out = empty_quantized(x, layout)
    (m, k), num_groups = x.shape, out.scales.shape[1]
    if m == 0:
        return out
    group_p2 = triton.next_power_of_2(layout.group)
    # The largest power of two dividing a row's groups: no program runs past them.
    elements, warps = program_size(m)
    groups = min(num_groups & -num_groups, max(1, elements // group_p2))
    _quantize_groups_kernel[(m, num_groups // groups)](
        x, out.values, out.scales, k, x.stride(0), out.values.stride(0), out.scales.stride(0),
        out.scales.stride(1), GROUP=layout.group, GROUP_P2=group_p2, GROUPS=groups,
        EVEN=layout.group == group_p2 and k % layout.group == 0, E4M3_MAX=E4M3_MAX,
        AMAX_FLOOR=AMAX_FLOOR, E4M3_MIN_NORMAL=E4M3_MIN_NORMAL, num_warps=warps)
    return out


def quantize_activations(x: torch.Tensor, group: int, token_major_scales: bool = False,
                         rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 [R, K], fp32 scales [R, ceil(K / group)]) for x [M, K]: `quantize_rows` with R
    `rows` (M when None)."""
    layout = ActivationLayout(group, token_major_scales, x.shape[0] if rows is None else rows)
    quantized = quantize_rows(x, layout)
    return quantized.values, quantized.scales
