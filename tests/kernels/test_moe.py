"""The grouped-GEMM MoE kernel against `kernels.reference.routed_experts`.

On CPU it runs under Triton's interpreter at small shapes; on a CUDA machine the `gpu` test
repeats it at M3's width in bf16 and inside a CUDA graph, whose layout must not need the host.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.moe_grouped_gemm import ExpertRows


def _swiglu(projected: torch.Tensor) -> torch.Tensor:
    gate, up = projected.chunk(2, dim=-1)
    return F.silu(gate) * up


def _layer(tokens, experts, top_k, hidden, inter, seed, device="cpu", dtype=torch.float32,
           unused=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden ** 0.5
    w2 = torch.randn(experts, hidden, inter, generator=g) / inter ** 0.5
    logits = torch.randn(tokens, experts, generator=g)
    logits[:, list(unused)] = -1e9  # experts nobody picks: their tiles must not exist
    weights, chosen = torch.softmax(logits, -1).topk(top_k, dim=-1)
    return [t.to(device) if t.dtype == torch.long else t.to(device, dtype)
            for t in (x, w13, w2)] + [weights.to(device), chosen.to(device)]


@pytest.mark.parametrize("tokens,experts,top_k,hidden,inter", [
    (1, 8, 2, 32, 16),  # one decode token
    (7, 16, 4, 48, 24),  # dims that are no power of two, pairs in one small tile each
    (40, 8, 4, 32, 40),  # 160 pairs: tiles of 64, several per expert
    (1100, 6, 4, 16, 16),  # 4,400 pairs: a prefill chunk's tiles of 128
    (0, 4, 2, 16, 16),  # an empty step
])
def test_grouped_gemm_matches_reference(tokens, experts, top_k, hidden, inter):
    args = _layer(tokens, experts, top_k, hidden, inter, seed=tokens, unused=(experts - 1,))
    ours = kernels.routed_experts(*args, _swiglu, backend="triton")
    ref = kernels.routed_experts(*args, _swiglu, backend="reference")
    assert ours.shape == (tokens, hidden)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    if tokens:
        assert ref.abs().max() > 0.1  # a real signal, not two zero tensors


def test_expert_rows_group_every_pair_once_in_its_experts_tiles():
    chosen = torch.tensor([[3, 0], [3, 1], [0, 3], [3, 2]])
    layout = ExpertRows.build(chosen, num_experts=5, tile_rows=2)
    pairs = chosen.numel()
    rows = layout.rows.view(-1, 2)
    used = layout.tile_expert < 5
    # Expert 3 has 3 pairs (two tiles), 0 two (one), 1 and 2 one each (padded), 4 none.
    assert layout.tile_expert[used].tolist() == [0, 1, 2, 3, 3]
    for tile, expert in enumerate(layout.tile_expert[used].tolist()):
        real = rows[tile][rows[tile] < pairs]
        assert (chosen.flatten()[real.long()] == expert).all()
    real = layout.rows[layout.rows < pairs]
    assert sorted(real.tolist()) == list(range(pairs))
    assert (rows[~used] == pairs).all()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_experts_dealt_to_two_ranks_sum_to_the_whole_layer(backend):
    """Expert parallelism: each rank holds half the experts and maps the other half's choices
    to the id one past its own; the two partial outputs add up to the layer's."""
    x, w13, w2, weights, chosen = _layer(40, 8, 4, 32, 40, seed=3)
    whole = kernels.routed_experts(x, w13, w2, weights, chosen, _swiglu, backend="reference")
    parts = []
    for start in (0, 4):
        local = chosen - start
        local = torch.where((local >= 0) & (local < 4), local, 4)
        parts.append(kernels.routed_experts(x, w13[start:start + 4], w2[start:start + 4],
                                            weights, local, _swiglu, backend=backend))
    assert parts[0].abs().max() > 0.1 and parts[1].abs().max() > 0.1
    torch.testing.assert_close(parts[0] + parts[1], whole, atol=1e-5, rtol=1e-5)


def test_routed_experts_refuses_weights_that_do_not_fit():
    x, w13, w2, weights, chosen = _layer(3, 4, 2, 16, 8, seed=0)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.routed_experts(x, w13[:, :, :8], w2, weights, chosen, _swiglu)
    with pytest.raises(ValueError, match="top_k"):
        kernels.routed_experts(x, w13, w2, weights[:, :1], chosen, _swiglu)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU; CPU runs the interpreter tests above")
@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 16, 300])
def test_grouped_gemm_at_m3_width_in_a_cuda_graph(tokens):
    """M3's expert shape (H 6144 -> I 2048 is scaled to 3072/1024 to keep the test quick), bf16;
    replayed from a graph captured with other routing, so the layout is rebuilt on the device."""
    args = _layer(tokens, 128, 4, 3072, 1024, seed=1, device="cuda", dtype=torch.bfloat16)
    ref = kernels.routed_experts(*args, _swiglu, backend="reference")
    x, w13, w2, weights, chosen = args
    static = [x.clone(), weights.clone(), chosen.roll(1, dims=0).clone()]
    kernels.routed_experts(static[0], w13, w2, static[1], static[2], _swiglu)  # compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels.routed_experts(static[0], w13, w2, static[1], static[2], _swiglu)
    static[2].copy_(chosen)
    graph.replay()
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
