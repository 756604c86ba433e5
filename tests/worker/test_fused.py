"""The `@fused` glue traces whole (no graph break) with dynamic shapes, as torch.compile needs
to fuse it on CUDA, and the traced function computes what the eager one does. The CPU runs it
through `aot_eager` (no code generation); the GPU tests run the real inductor kernels."""

from __future__ import annotations

import pytest
import torch

from worker.layers.norms import gemma_rms_norm, rms_norm
from worker.layers.rotary import apply_partial_rope, rope_tables, rotary_tables, rotate_half
from worker.models.minimax_m3 import norm_and_rotate, sigmoid_route, swiglu_oai, swiglu_oai_stacked


def _cases(tokens: int):
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 64, generator=g)
    heads = torch.randn(tokens, 4, 32, generator=g)
    cos, sin = rotary_tables(torch.arange(tokens) * 7, 16, 10000.0)
    positions = torch.arange(tokens) * 3
    cos_table, sin_table = rope_tables(32, 10000.0, 4096, torch.device("cpu"))
    return {
        "rms_norm": (rms_norm, (x, torch.randn(64, generator=g), 1e-6)),
        "gemma_rms_norm": (gemma_rms_norm, (x, torch.randn(64, generator=g), 1e-6)),
        "rotate_half": (rotate_half, (heads, positions, cos_table, sin_table)),
        "apply_partial_rope": (apply_partial_rope, (heads, cos, sin)),
        "norm_and_rotate": (norm_and_rotate, (heads, torch.randn(32, generator=g), 1e-6, cos,
                                              sin)),
        "swiglu_oai": (swiglu_oai, (x * 9, x.flip(0) * 9, 1.702, 7.0)),
        "swiglu_oai_stacked": (swiglu_oai_stacked, (x * 9, 1.702, 7.0)),
        "sigmoid_route": (sigmoid_route, (x, torch.randn(64, generator=g), 4)),
    }


def _assert_same(want, got) -> None:
    for w, o in zip(*(t if isinstance(t, tuple) else (t,) for t in (want, got)), strict=True):
        assert o.shape == w.shape
        if w.dtype.is_floating_point:
            torch.testing.assert_close(o, w, rtol=1e-5, atol=1e-5)
        else:  # expert ids: the same set (the route's top-k is unsorted)
            assert torch.equal(o.sort(-1).values, w.sort(-1).values)


@pytest.mark.parametrize("name", sorted(_cases(1)))
def test_fused_glue_traces_whole_and_matches_eager(name):
    fn = _cases(1)[name][0]
    traced = torch.compile(fn.__wrapped__, backend="aot_eager", dynamic=True, fullgraph=True)
    for tokens in (1, 5, 64, 300):  # a decode row, buckets and a prefill chunk
        args = _cases(tokens)[name][1]
        want, got = fn(*args), traced(*args)
        _assert_same(want, got)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor's CUDA kernels need a GPU")
@pytest.mark.parametrize("name", sorted(_cases(1)))
def test_fused_glue_compiles_on_cuda_and_matches_eager(name):
    fn = _cases(1)[name][0]
    for tokens in (1, 5, 64, 300):
        args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in _cases(tokens)[name][1]]
        want, got = fn.__wrapped__(*args), fn(*args)
        _assert_same(want, got)
