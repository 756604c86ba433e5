"""Projections of one input stacked into one GEMM (`StackedLinear`): the same outputs as the
projections apart, in full precision and FP8; projections that cannot share a matrix stay
apart."""

from __future__ import annotations

import pytest
import torch

from kernels.reference import E4M3, quantize_fp8
from worker.layers import fp8
from worker.layers.linear import ParallelLinear, StackedLinear

HIDDEN = 64


def _projection(rows: int, seed: int, fp8_block: tuple[int, int] | None = None):
    generator = torch.Generator().manual_seed(seed)
    projection = ParallelLinear(HIDDEN, rows, bias=False)
    weight = torch.randn(rows, HIDDEN, generator=generator) / HIDDEN ** 0.5
    if fp8_block is None:
        projection.weight = torch.nn.Parameter(weight, requires_grad=False)
        return projection
    quantized, scales = quantize_fp8(weight, *fp8_block)
    projection.weight = torch.nn.Parameter(quantized, requires_grad=False)
    setattr(projection, "weight" + fp8.SCALE_SUFFIX,
            torch.nn.Parameter(scales.scale, requires_grad=False))
    projection.__dict__["fp8_block"] = fp8_block
    return projection


@pytest.mark.parametrize("fp8_block", [None, (16, 16), (1, 32)],
                         ids=["fp32", "fp8-blocks", "mxfp8-rows"])
def test_stacked_projections_give_what_they_give_apart(fp8_block):
    projections = [_projection(rows, seed, fp8_block) for seed, rows in enumerate((64, 32, 16))]
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(9))
    apart = [projection(x) for projection in projections]
    stacked = StackedLinear(projections)
    assert stacked.stacked and len(stacked.projections) == 1
    if fp8_block is not None:
        assert stacked.projections[0].weight.dtype == E4M3
    for ours, want in zip(stacked(x), apart, strict=True):
        torch.testing.assert_close(ours, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("projections", [
    lambda: [_projection(32, 0, (16, 16)), _projection(32, 1)],  # one left in full precision
    lambda: [_projection(32, 0, (16, 16)), _projection(24, 1, (16, 16))],  # 24 rows: 1.5 blocks
], ids=["mixed-dtypes", "partial-scale-block"])
def test_projections_that_cannot_share_a_matrix_stay_apart(projections):
    projections = projections()
    x = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(4))
    apart = [projection(x) for projection in projections]
    stacked = StackedLinear(projections)
    assert not stacked.stacked and len(stacked.projections) == 2
    for ours, want in zip(stacked(x), apart, strict=True):
        torch.testing.assert_close(ours, want, atol=0, rtol=0)
