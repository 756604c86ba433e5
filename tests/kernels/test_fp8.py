"""FP8 weights (e4m3 with block scales): quantization round trips within e4m3's rounding, the
activations are quantized per token group exactly as the reference does, and the Triton GEMMs
(dense, in both modes: weight-only and W8A8; grouped) multiply exactly what the reference
dequantizes.

On CPU the kernels run under Triton's interpreter at small shapes; on a CUDA machine the `gpu`
test repeats them at M3's width in bf16."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import triton

import kernels
from kernels import (
    fp8_gemm,
    fp8_weight_only_gemm,
    reference,
    rms_norm_quantize,
    split_k_sum,
    swiglu_quantize,
    triton_layout,
)
from kernels.fp8_dequantize import dequantize_weight
from kernels.fp8_gemm import GemmTile
from kernels.fp8_quantize import quantize_activations
from kernels.reference import E4M3, dequantize_fp8, quantize_fp8
from tests.kernels.test_moe import _layer, _swiglu

# (block_n, block_k, e8m0): DeepSeek-style blocks with fp32 scales, MXFP8's groups of 32 with
# power-of-two scales, and a block that does not divide the matrix (partial edge blocks).
LAYOUTS = [(128, 128, False), (1, 32, True), (16, 48, False)]
# MXFP8 weights as served by default: regrouped into 1 x 128 blocks once loaded. Dense 128 x 128
# block-scaled weights as served: with a copy of their scales per weight row.
REGROUPED = "MXFP8 regrouped to 1 x 128"
SPREAD = "128 x 128 blocks with a per-row copy"


def _quantize(weight: torch.Tensor, layout):
    if layout == REGROUPED:
        return reference.regroup_mxfp8(*quantize_fp8(weight, 1, 32, True))
    if layout == SPREAD:
        quantized, blocks = quantize_fp8(weight, 128, 128)
        rows = reference.per_row_scales(blocks, weight.shape[-2])
        return quantized, dataclasses.replace(blocks, per_row=rows.scale)
    return quantize_fp8(weight, *layout)


@pytest.mark.parametrize("block_n,block_k,e8m0", LAYOUTS)
def test_quantized_weights_round_trip_within_e4m3_rounding(block_n, block_k, e8m0):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 80, 200, generator=g) * torch.rand(3, 80, 1, generator=g)
    quantized, scales = quantize_fp8(weight, block_n, block_k, e8m0)
    assert quantized.dtype == E4M3
    assert scales.scale.shape == (3, -(-80 // block_n), -(-200 // block_k))
    assert scales.scale.dtype == (torch.uint8 if e8m0 else torch.float32)
    restored = dequantize_fp8(quantized, scales)
    # e4m3 keeps 3 mantissa bits: a relative error of at most 2^-4 on normal values, and an
    # absolute one of half its smallest subnormal step (2^-10 x scale) below them.
    per_element = scales.values().repeat_interleave(block_n, -2)[:, :80].repeat_interleave(
        block_k, -1)[..., :200]
    bound = weight.abs() * 2 ** -4 + per_element * 2 ** -10
    assert ((restored - weight).abs() <= bound * 1.0001).all()
    # Each block's largest magnitude lands near e4m3's largest value (exactly, for fp32 scales).
    assert quantized.float().abs().max() <= 448
    if not e8m0:
        assert quantized.float().abs().amax() == 448


@pytest.mark.parametrize("k", [256, 200])  # whole 128-wide blocks; a last block of 2.25 groups
def test_regrouped_mxfp8_weights_stand_for_the_stored_ones(k):
    g = torch.Generator().manual_seed(k)
    weight = torch.randn(2, 64, k, generator=g) / k ** 0.5
    weight[..., 3] *= 2 ** 9  # an outlier input channel: its group's scale 9 powers of two up
    stored, groups = quantize_fp8(weight, 1, 32, e8m0=True)
    assert reference.regroups_to_w8a8(groups)
    assert not reference.regroups_to_w8a8(quantize_fp8(weight, 128, 128)[1])
    regrouped, blocks = reference.regroup_mxfp8(stored, groups)
    assert (blocks.block_n, blocks.block_k) == (1, 128) and not blocks.e8m0
    assert blocks.scale.shape == (2, 64, -(-k // 128))
    assert blocks.scale.stride()[1:] == (1, 64)  # K-block-major: a K tile's row scales adjacent
    assert torch.equal(torch.exp2(torch.log2(blocks.scale).round()), blocks.scale)
    # Each block's scale is its largest group scale; each value is the stored one, but for the
    # values under 2^-6 of the block's scale, which round by at most half a subnormal step.
    block_of = blocks.scale.repeat_interleave(128, -1)[..., :k]
    old, new = dequantize_fp8(stored, groups), dequantize_fp8(regrouped, blocks)
    tiny = old.abs() < block_of * 2 ** -6
    assert torch.equal(new[~tiny], old[~tiny])
    assert ((new - old).abs() <= block_of * 2 ** -10).all()
    assert tiny.any() and (new != old).any()  # the outlier's blocks do round some values
    assert ((new - old).norm() / old.norm()) < 1e-3
    # A block whose groups share a scale is copied bit for bit (the second: no outlier there).
    same = (groups.scale[..., 4:8] == groups.scale[..., 4:5]).all(-1)
    assert same.any()
    assert torch.equal(regrouped[..., 128:][same].view(torch.uint8),
                       stored[..., 128:][same].view(torch.uint8))


def test_block_scales_spread_per_row_stand_for_the_same_weights():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(2, 40, 200, generator=g)  # partial blocks along both dims
    quantized, blocks = quantize_fp8(weight, 16, 48)
    rows = reference.per_row_scales(blocks, 40)
    assert (rows.block_n, rows.block_k, rows.e8m0) == (1, 48, False)
    assert rows.scale.shape == (2, 40, 5) and rows.scale.stride()[1:] == (1, 40)
    assert torch.equal(rows.scale[:, 17], blocks.scale[:, 1])
    assert torch.equal(dequantize_fp8(quantized, rows), dequantize_fp8(quantized, blocks))


def test_17_to_64_row_w8a8_gemms_split_k_so_their_waves_fill_the_gpu():
    # (output columns, K): M3's projections at TP 1, 2 and 4 on 132 multiprocessors, against
    # the split each measured fastest at (or within 2% of) in bench/results/fp8_picks_h200.md.
    fastest = {(6144, 8192): 4, (6144, 12288): 4, (24576, 6144): 1, (9856, 6144): 2,
               (4992, 6144): 3, (2560, 6144): 3, (6144, 2048): 1, (1536, 6144): 4}
    for (n, k), split in fastest.items():
        assert GemmTile.for_shape(64, n, k, 128, 132).split_k == split, (n, k)
    # 8 K tiles per split at least; the other decode rules are unchanged.
    assert GemmTile.for_shape(64, 6144, 1024, 128, 132).split_k == 1
    assert GemmTile.for_shape(16, 6144, 8192, 128, 132).split_k == 4


@pytest.mark.parametrize("rows,k,group", [(37, 160, 128), (5, 200, 48), (130, 64, 32)])
def test_activations_quantize_per_token_group_as_the_reference_does(rows, k, group):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=g) * torch.rand(rows, 1, generator=g) * 100
    x[0, :group] = 0  # an all-zero group keeps a finite scale
    # A value that rounds up out of e4m3's subnormals into its smallest normal, 2 ** -6.
    x[2, 1] = x[2, :group].abs().max() / 448 * (2 ** -6 - 2 ** -11)
    # A negative value too small for e4m3: -0, as torch's cast makes it.
    x[2, 2] = -x[2, :group].abs().max() / 448 * 2 ** -12
    ref = reference.quantize_activations(x, group)
    assert ref[0][2, 2].view(torch.uint8) == 0x80
    for token_major in (False, True):  # the Triton GEMMs' scale layout and cuBLASLt's
        ours = quantize_activations(x, group, token_major_scales=token_major)
        assert torch.equal(ours[0].view(torch.uint8), ref[0].view(torch.uint8))
        assert torch.equal(ours[1], ref[1])
        assert ours[1].stride() == ((1, rows) if token_major else (ref[1].shape[1], 1))
    # Whole multiples of rows for cuBLASLt: the rows past x's are left to the caller.
    padded = quantize_activations(x, group, token_major_scales=True, rows=rows + 3)
    assert padded[0].shape == (rows + 3, k) and padded[1].stride() == (1, rows + 3)
    assert torch.equal(padded[0][:rows].view(torch.uint8), ref[0].view(torch.uint8))
    assert torch.equal(padded[1][:rows], ref[1])
    restored = reference.dequantize_activations(*ref, group)
    per_element = ref[1].repeat_interleave(group, dim=-1)[:, :k]
    assert ((restored - x).abs() <= x.abs() * 2 ** -4 + per_element * 2 ** -10).all()
    assert (ref[0].float().abs().amax(dim=-1)[1:] == 448).all()


# (rows, K, group, token-major scales) for the kernels that quantize what they produce.
QUANTIZING_PRODUCER_CASES = pytest.mark.parametrize("rows,k,group,token_major", [
    (37, 160, 128, False),  # a last group of 32 (masked)
    (5, 1100, 64, True),  # cuBLASLt's layout, rows padded; 2 programs a row, the last part-full
    (70, 200, 48, False)])  # a prefill chunk; groups not a power of two


def _assert_quantized_as_the_reference(ours: reference.QuantizedRows, x: torch.Tensor,
                                       layout: reference.ActivationLayout) -> None:
    """A producer's quantized output against `reference.quantize_activations` of its output x
    [M, K] in `layout`. The producer's arithmetic may differ from torch's in a last bit (a sum's
    order, exp): scales agree to fp32 rounding, and values to one e4m3 step where a value sits
    on a rounding boundary (2 ** -3 of it; 2 ** -9 of its scale below e4m3's normal range)."""
    (rows, k), group = x.shape, layout.group
    want_values, want_scales = reference.quantize_activations(x, group)
    assert ours.values.shape == (layout.rows, k) and ours.count == rows
    assert ours.scales.stride() == ((1, layout.rows) if layout.token_major
                                    else (-(-k // group), 1))
    torch.testing.assert_close(ours.scales[:rows], want_scales, rtol=1e-6, atol=0)
    same = ours.values[:rows].view(torch.uint8) == want_values.view(torch.uint8)
    assert same.float().mean() > 0.99
    got, want = (reference.dequantize_activations(values, scales, group) for values, scales in
                 [(ours.values[:rows], ours.scales[:rows]), (want_values, want_scales)])
    step = want.abs() * 2 ** -3 + want_scales.repeat_interleave(group, -1)[:, :k] * 2 ** -9
    assert ((got - want).abs() <= step).all()


@QUANTIZING_PRODUCER_CASES
def test_norm_and_quantization_in_one_kernel_match_the_norm_then_the_quantization(
        rows, k, group, token_major):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=g) * torch.rand(rows, 1, generator=g) * 30
    weight = torch.randn(k, generator=g) * 0.5
    x[1, :group] = 0  # a group of zeros keeps a finite scale
    layout = reference.ActivationLayout(group, token_major, rows + 3 if token_major else rows)
    want = reference.gemma_rms_norm(x, weight, 1e-6)
    ours = rms_norm_quantize.gemma_rms_norm_quantized(x, weight, 1e-6, layout)
    _assert_quantized_as_the_reference(ours, want, layout)
    # Asked for the normed x too (the MoE's experts beside its FP8 shared expert): the same
    # quantized bytes, and the normed rows themselves.
    plain = torch.full_like(x, float("nan"))
    both = rms_norm_quantize.gemma_rms_norm_quantized(x, weight, 1e-6, layout, plain)
    assert torch.equal(both.values[:rows].view(torch.uint8), ours.values[:rows].view(torch.uint8))
    torch.testing.assert_close(both.scales[:rows], ours.scales[:rows], rtol=0, atol=0)
    torch.testing.assert_close(plain, want, rtol=1e-5, atol=1e-5)


def test_norm_quantized_refuses_buffers_it_cannot_fill():
    """Too few rows in the layout, or a `plain` buffer of another shape or dtype: a clear error
    before any kernel runs."""
    x, weight = torch.randn(4, 256), torch.randn(256)
    layout = reference.ActivationLayout(128, False, 4)
    with pytest.raises(ValueError, match="writes 3 rows, fewer than x's 4"):
        kernels.gemma_rms_norm_quantized(x, weight, 1e-6, dataclasses.replace(layout, rows=3))
    for plain in (torch.empty(4, 128), torch.empty(4, 256, dtype=torch.bfloat16)):
        with pytest.raises(ValueError, match=r"plain must be x's shape \(4, 256\)"):
            kernels.gemma_rms_norm_quantized(x, weight, 1e-6, layout, plain)


@QUANTIZING_PRODUCER_CASES
def test_swiglu_and_quantization_in_one_kernel_match_the_swiglu_then_the_quantization(
        rows, k, group, token_major):
    """gate and up as the stacked gate/up projection hands them (views of its columns), some
    values past the clamps."""
    g = torch.Generator().manual_seed(rows)
    gate, up = (torch.randn(rows, 2 * k, generator=g) * 4).chunk(2, dim=-1)
    gate[1, :group] = -40  # a group of (near) zeros keeps a finite scale
    layout = reference.ActivationLayout(group, token_major, rows + 3 if token_major else rows)
    ours = swiglu_quantize.swiglu_oai_quantized(gate, up, 1.702, 7.0, layout)
    _assert_quantized_as_the_reference(ours, reference.swiglu_oai(gate, up, 1.702, 7.0), layout)


@pytest.mark.parametrize("layout", [(16, 64, False), REGROUPED])
def test_fp8_linear_takes_x_quantized_by_the_norm(layout):
    """The W8A8 GEMM given x quantized by the norm's kernel (in the layout
    `activation_layout` names off Hopper: the Triton kernel's) multiplies what the reference
    multiplies for the norm's output."""
    weight, scales = _fp8_weight(96, 256, layout, seed=3)
    g = torch.Generator().manual_seed(5)
    x, norm_weight = torch.randn(7, 256, generator=g), torch.randn(256, generator=g)
    quantized_as = fp8_gemm.activation_layout(x, weight, scales)
    assert quantized_as == reference.ActivationLayout(scales.block_k, False, 7)
    normed = rms_norm_quantize.gemma_rms_norm_quantized(x, norm_weight, 1e-6, quantized_as)
    ours = kernels.fp8_linear(normed, weight, scales)
    want = reference.fp8_w8a8_linear(reference.gemma_rms_norm(x, norm_weight, 1e-6), weight,
                                     scales)
    torch.testing.assert_close(ours, want, atol=1e-3, rtol=1e-3)
    assert want.abs().max() > 0.1
    wrong_group = dataclasses.replace(normed, layout=dataclasses.replace(quantized_as, group=32))
    with pytest.raises(ValueError, match="quantized in groups of 32.*fp8_activation_layout"):
        kernels.fp8_linear(wrong_group, weight, scales)


def _fp8_weight(n: int, k: int, layout, seed: int, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    weight, scales = _quantize(torch.randn(n, k, generator=g) / k ** 0.5, layout)
    per_row = None if scales.per_row is None else scales.per_row.to(device)
    return weight.to(device), dataclasses.replace(scales, scale=scales.scale.to(device),
                                                  per_row=per_row)


@pytest.mark.parametrize("layout", [*LAYOUTS, REGROUPED])
# A decode row, a few, a full decode tile (x through a tensor descriptor in the weight-only
# kernel), a prefill chunk's tiles.
@pytest.mark.parametrize("rows", [1, 37, 64, 130])
# Partial tiles; whole tiles only; rows of e4m3 not 16-byte aligned (pointer loads, not TMA).
@pytest.mark.parametrize("n,k", [(96, 160), (128, 256), (96, 152)])
def test_fp8_linear_matches_reference(layout, rows, n, k):
    weight, scales = _fp8_weight(n, k, layout, seed=rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1))
    ours = kernels.fp8_linear(x, weight, scales, backend="triton")
    ref = kernels.fp8_linear(x, weight, scales, backend="reference")
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert triton_layout.tma_loads(x, weight) == (k % 16 == 0)
    # fp32 x's rows are 16-byte aligned at every K here: the weight-only kernel's x descriptor
    # depends on the rows alone.
    assert fp8_weight_only_gemm.loads_x_by_descriptor(x) == (rows >= 64)
    modes = {True: reference.fp8_w8a8_linear, False: reference.fp8_weight_only_linear}
    # The reference takes the mode the rule names: MXFP8 as stored weight-only, block scales
    # (regrouped MXFP8 too) W8A8 at any number of rows.
    weight_only = layout == (1, 32, True)
    assert reference.fp8_weight_only(scales.block_k) == weight_only
    torch.testing.assert_close(ref, modes[not weight_only](x, weight, scales))
    if rows <= 64:
        # The decode GEMM's K splits in both modes, an uneven or empty last split included
        # (k / 16 tiles over 3 splits), added inside the GEMM (16-row tiles) or after it.
        tile_rows = max(16, triton.next_power_of_2(rows))
        assert split_k_sum.sums_in_gemm(tile_rows) == (rows == 1)
        for quantize_x, mode_ref in modes.items():
            tile = GemmTile(tile_rows, 32, 128, 4, 2, split_k=3, quantize_x=quantize_x)
            torch.testing.assert_close(fp8_gemm.fp8_linear(x, weight, scales, tile),
                                       mode_ref(x, weight, scales), atol=1e-5, rtol=1e-5)
        # The last split reset every arrival count: the next split GEMM starts from zero.
        assert not triton_layout.split_arrival_counts(x.device).any()
    act = reference.dequantize_activations(
        *reference.quantize_activations(x, scales.block_k), scales.block_k)
    torch.testing.assert_close(modes[True](x, weight, scales),
                               act @ dequantize_fp8(weight, scales).T)
    torch.testing.assert_close(modes[False](x, weight, scales),
                               x @ dequantize_fp8(weight, scales).T)
    assert ref.abs().max() > 0.1


def test_split_k_partials_add_up_in_split_order():
    partials = torch.randn(5, 3, 700, generator=torch.Generator().manual_seed(3)) * 1e4
    out = torch.empty(3, 700)  # fp32: the interpreter's bf16 casts may round differently
    assert split_k_sum.SplitSums.plan((1, 2, 1), out, tile_rows=64).partials is out
    assert split_k_sum.SplitSums.plan((1, 2, 5), out, tile_rows=64).partials.shape == (5, 3, 700)
    ordered = partials[0] + partials[1] + partials[2] + partials[3] + partials[4]
    assert torch.equal(split_k_sum.sum_splits(partials, out), ordered)
    assert split_k_sum.sum_splits(out, out) is out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dequantized_weight_is_exactly_the_references(layout):
    weight, scales = _fp8_weight(96, 152, layout, seed=3)
    assert torch.equal(dequantize_weight(weight, scales, torch.float32),
                       dequantize_fp8(weight, scales))
    if scales.e8m0:  # e4m3 values times powers of two are exact in bf16 too (no rounding)
        ours = dequantize_weight(weight, scales, torch.bfloat16)
        assert ours.dtype == torch.bfloat16
        assert torch.equal(ours.float(), dequantize_fp8(weight, scales))


def test_many_row_weight_only_gemms_dequantize_the_weight_once():
    rows = fp8_gemm.DEQUANTIZED_MIN_ROWS
    x = torch.randn(rows, 160, generator=torch.Generator().manual_seed(2))
    for layout in LAYOUTS:
        weight, scales = _fp8_weight(96, 160, layout, seed=4)
        weight_only = reference.fp8_weight_only(scales.block_k)
        assert fp8_gemm.runs_dequantized(rows, scales) == weight_only
        assert not fp8_gemm.runs_dequantized(rows - 1, scales)
        if weight_only:
            torch.testing.assert_close(kernels.fp8_linear(x, weight, scales, backend="triton"),
                                       reference.fp8_weight_only_linear(x, weight, scales),
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", [(16, 16, False), (1, 32, True), REGROUPED])
def test_grouped_gemm_with_fp8_experts_matches_reference(layout):
    x, w13, w2, weights, chosen = _layer(40, 8, 4, 64, 32, seed=5)
    q13, s13 = _quantize(w13, layout)
    q2, s2 = _quantize(w2, layout)
    ours = kernels.routed_experts(x, q13, q2, weights, chosen, _swiglu, s13, s2,
                                  backend="triton")
    ref = kernels.routed_experts(x, q13, q2, weights, chosen, _swiglu, s13, s2,
                                 backend="reference")
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    full = kernels.routed_experts(x, w13, w2, weights, chosen, _swiglu, backend="reference")
    # e4m3 rounding of weights and activations in both projections (coarser with power-of-two
    # scales), not a wrong product: that would be near 1.
    assert (ref - full).norm() / full.norm() < 0.08


def test_fp8_weights_without_matching_scales_are_refused():
    weight, scales = _fp8_weight(32, 64, (16, 32, False), seed=0)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"needs scales \(2, 2\)"):
        kernels.fp8_linear(x, weight, type(scales)(scales.scale[:, :1], 16, 32))
    x2, w13, w2, weights, chosen = _layer(3, 4, 2, 32, 16, seed=0)
    with pytest.raises(ValueError, match="e4m3 but came without its scales"):
        kernels.routed_experts(x2, w13.to(E4M3), w2, weights, chosen, _swiglu)
    with pytest.raises(ValueError, match="multiple of 16"):
        kernels.fp8_linear(x, *_fp8_weight(32, 64, (1, 8, False), seed=0), backend="triton")


def test_fp8_gemm_paths_on_hopper(monkeypatch):
    """Which GEMMs `fp8_linear` hands to cuBLASLt on Hopper (the measurements behind each rule:
    bench/results/fp8_picks_h200.md), and which MXFP8 ones it dequantizes."""
    monkeypatch.setattr(fp8_gemm, "sm_major", lambda device: 9)
    x = torch.empty(1, 6144, dtype=torch.bfloat16)
    narrow, wide, widest = 1536, 9856, 24576  # shared expert at TP 4, q/k/v and gate/up at TP 1
    paths = {}
    for layout in [(128, 128, False), (1, 32, True), REGROUPED, SPREAD]:
        _, scales = _quantize(torch.randn(128, 6144), layout)
        paths[layout] = {(rows, n): fp8_gemm.runs_on_cublas(rows, n, 6144, x, scales)
                         for rows in (1, 8, 33, 64, 130) for n in (narrow, wide, widest)}
        assert [fp8_gemm.runs_dequantized(rows, scales) for rows in (64, 65)] == (
            [False, True] if layout == (1, 32, True) else [False, False])
    assert not any(paths[(1, 32, True)].values())  # weight-only: never cuBLASLt's FP8 GEMM
    # 128 x 128 scales alone: prefill-sized GEMMs, and 64-row ones 8K to 16K wide.
    assert {key for key, cublas in paths[(128, 128, False)].items() if cublas} == {
        (64, wide), (130, narrow), (130, wide), (130, widest)}
    # 1 x 128 scales (regrouped MXFP8 at every batch; a per-row copy of 128 x 128 ones up to 64
    # rows): every batch but a single row of a narrow GEMM, and with the blocks at hand, not
    # 17-64 rows of the widest.
    triton_kept = {(1, narrow)}
    assert {key for key, cublas in paths[REGROUPED].items() if not cublas} == triton_kept
    assert {key for key, cublas in paths[SPREAD].items() if not cublas} == triton_kept | {
        (33, widest), (64, widest)}
    # The layout a norm quantizes x in for each: cuBLASLt's (token-major scales, rows padded
    # to 4) where it runs the GEMM, the Triton kernel's elsewhere, none for weight-only.
    for layout, scales in [(layout, _quantize(torch.randn(128, 6144), layout)[1])
                           for layout in paths]:
        weight = torch.empty(widest, 6144, dtype=E4M3)
        for rows in (1, 33, 130):
            x_rows = torch.empty(rows, 6144, dtype=torch.bfloat16)
            quantized_as = fp8_gemm.activation_layout(x_rows, weight, scales)
            if layout == (1, 32, True):
                assert quantized_as is None
            elif paths[layout][rows, widest]:
                assert quantized_as == reference.ActivationLayout(128, True, -(-rows // 4) * 4)
            else:
                assert quantized_as == reference.ActivationLayout(scales.block_k, False, rows)
    # 1 x 128 scales in whole multiples of 4 K blocks only (padding would copy them).
    _, scales = _quantize(torch.randn(128, 640), REGROUPED)
    assert not fp8_gemm.runs_on_cublas(8, wide, 640, x, scales)
    # cuBLASLt takes the per-row copy of 128 x 128 scales up to 64 rows, and past them up to
    # 640K outputs.
    _, spread = _quantize(torch.randn(128, 6144), SPREAD)
    takes_rows = {(m, n): fp8_gemm._cublas_row_scales(m, n, 6144, spread) is not None
                  for m, n in [(256, 2560), (257, 2560), (213, 3072), (214, 3072), (106, 6144),
                               (107, 6144), (64, widest), (65, widest)]}
    assert takes_rows == {(256, 2560): True, (257, 2560): False, (213, 3072): True,
                          (214, 3072): False, (106, 6144): True, (107, 6144): False,
                          (64, widest): True, (65, widest): False}


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU; CPU runs the interpreter tests above")
@pytest.mark.gpu
@pytest.mark.parametrize("layout", [(128, 128, False), (1, 32, True), REGROUPED, SPREAD])
@pytest.mark.parametrize("rows", [1, 8, 33, 64, 96, 130, 512])
def test_fp8_gemms_at_m3_width_on_the_gpu(layout, rows):
    weight, scales = _fp8_weight(4096, 6144, layout, seed=0, device="cuda")
    x = torch.randn(rows, 6144, device="cuda", dtype=torch.bfloat16)
    ours = kernels.fp8_linear(x, weight, scales)
    ref = kernels.fp8_linear(x.float(), weight, scales, backend="reference")
    torch.testing.assert_close(ours.float(), ref, atol=3e-2, rtol=3e-2)
    # Which path runs which GEMM: test_fp8_gemm_paths_on_hopper (33 and 130 rows on cuBLASLt:
    # padded to 36 and 132).
    hopper = torch.cuda.get_device_capability()[0] == 9
    if layout != (1, 32, True) and hopper:
        torch.testing.assert_close(fp8_gemm.cublas_fp8_linear(x, weight, scales).float(),
                                   reference.fp8_w8a8_linear(x.float(), weight, scales),
                                   atol=3e-2, rtol=3e-2)
    if rows <= 64:  # each mode's decode pick at every split count, replayed for stale counts
        modes = {True: reference.fp8_w8a8_linear, False: reference.fp8_weight_only_linear}
        sms = triton_layout.multiprocessors(x.device)
        for split_k, quantize_x in itertools.product((2, 3, 8), modes):
            tile = dataclasses.replace(GemmTile.for_shape(
                rows, 4096, 6144, scales.block_k, sms, weight_only=not quantize_x),
                split_k=split_k)
            first = fp8_gemm.fp8_linear(x, weight, scales, tile)
            torch.testing.assert_close(first.float(), modes[quantize_x](x.float(), weight, scales),
                                       atol=3e-2, rtol=3e-2)
            # 33 rows (a partial tile) and 100 replays: where tensor-descriptor loads of the
            # weight in the weight-only kernel once returned garbage now and then; 64 rows
            # load x through a descriptor.
            for _ in range(100):
                assert torch.equal(fp8_gemm.fp8_linear(x, weight, scales, tile), first)
    x, w13, w2, weights, chosen = _layer(rows, 128, 4, 3072, 1024, seed=1, device="cuda",
                                         dtype=torch.bfloat16)
    (q13, s13), (q2, s2) = _quantize(w13, layout), _quantize(w2, layout)
    ours = kernels.routed_experts(x, q13, q2, weights, chosen, _swiglu, s13, s2)
    ref = kernels.routed_experts(x, q13, q2, weights, chosen, _swiglu, s13, s2,
                                 backend="reference")
    torch.testing.assert_close(ours.float(), ref.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU; CPU runs the interpreter tests above")
@pytest.mark.gpu
@pytest.mark.parametrize("layout", [(128, 128, False), REGROUPED, SPREAD])
@pytest.mark.parametrize("rows", [1, 8, 64, 130])
def test_norm_quantized_gemms_at_m3_width_on_the_gpu(layout, rows):
    """q/k/v's norm quantizing x for the GEMM (cuBLASLt's layout or the Triton kernel's, as
    `activation_layout` picks at each batch on this GPU), in bf16: the same bytes as the norm
    then the quantization kernel, up to the rms's last bit, and the same product."""
    weight, scales = _fp8_weight(9856, 6144, layout, seed=0, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, 6144, device="cuda", dtype=torch.bfloat16, generator=g) * 4
    norm_weight = torch.randn(6144, device="cuda", dtype=torch.bfloat16, generator=g) * 0.2
    quantized_as = fp8_gemm.activation_layout(x, weight, scales)
    plain = torch.empty_like(x)
    normed = kernels.gemma_rms_norm_quantized(x, norm_weight, 1e-6, quantized_as, plain)
    unfused = reference.gemma_rms_norm(x, norm_weight, 1e-6)
    # The normed rows as the MoE's experts take them: the compiled norm's bf16, up to its last
    # bit (the rms sums in another order).
    torch.testing.assert_close(plain, unfused, rtol=2 ** -7, atol=0)
    assert (plain == unfused).float().mean() > 0.99
    values, x_scales = quantize_activations(unfused, quantized_as.group)
    assert (normed.values[:rows].view(torch.uint8) == values.view(torch.uint8)).float().mean(
        ) > 0.99
    torch.testing.assert_close(normed.scales[:rows], x_scales, rtol=1e-6, atol=0)
    ours = kernels.fp8_linear(normed, weight, scales).float()
    torch.testing.assert_close(ours, kernels.fp8_linear(unfused, weight, scales).float(),
                               atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(ours, reference.fp8_w8a8_linear(unfused.float(), weight, scales),
                               atol=3e-2, rtol=3e-2)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU; CPU runs the interpreter tests above")
@pytest.mark.gpu
@pytest.mark.parametrize("width", [12288, 3072], ids=["dense-down", "shared-expert-down"])
@pytest.mark.parametrize("rows", [1, 64, 130])
def test_swiglu_quantized_down_proj_at_m3_width_on_the_gpu(width, rows):
    """The MLP's activation quantizing x for its down projection (in the layout
    `activation_layout` picks for the served 128 x 128-block weight at each batch), in bf16:
    the same bytes as the compiled activation, then the quantization kernel, up to exp's last
    bit, and the same product."""
    from worker.models.minimax_m3 import swiglu_oai

    weight, scales = _fp8_weight(6144, width, SPREAD, seed=1, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(rows)
    projected = torch.randn(rows, 2 * width, device="cuda", dtype=torch.bfloat16,
                            generator=g) * 4
    gate, up = projected.chunk(2, dim=-1)
    unfused = swiglu_oai(gate, up, 1.702, 7.0)
    quantized_as = fp8_gemm.activation_layout(unfused, weight, scales)
    activated = kernels.swiglu_oai_quantized(gate, up, 1.702, 7.0, quantized_as)
    values, x_scales = quantize_activations(unfused, quantized_as.group)
    assert (activated.values[:rows].view(torch.uint8) == values.view(torch.uint8)).float(
        ).mean() > 0.99
    torch.testing.assert_close(activated.scales[:rows], x_scales, rtol=1e-2, atol=0)
    ours = kernels.fp8_linear(activated, weight, scales).float()
    torch.testing.assert_close(ours, kernels.fp8_linear(unfused, weight, scales).float(),
                               atol=3e-2, rtol=3e-2)
