"""kernels (reference backend) against the slow float64 oracle of the spec."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from tests.kernels.paged_batch import (
    check_selection,
    make_batch,
    oracle_attention,
    relative_error,
)


@st.composite
def paged_batches(draw):
    """Prefill from scratch, prefix + chunk, decode and multi-token decode, mixed in one batch."""
    num_kv_heads = draw(st.sampled_from([1, 2, 3]))
    group_size = draw(st.sampled_from([1, 2, 4]))
    batch_size = draw(st.integers(1, 3))
    seq_lens, q_lens = [], []
    for _ in range(batch_size):
        seq_len = draw(st.integers(1, 900))
        kind = draw(st.sampled_from(["prefill", "chunk", "decode", "multi"]))
        q_len = {"prefill": min(seq_len, 24), "chunk": draw(st.integers(1, min(seq_len, 12))),
                 "decode": 1, "multi": min(seq_len, draw(st.integers(2, 16)))}[kind]
        if kind == "prefill":
            seq_len = q_len  # the whole sequence is this step's queries
        seq_lens.append(seq_len)
        q_lens.append(q_len)
    index_key_heads = draw(st.sampled_from([1, num_kv_heads]))
    return dict(seq_lens=seq_lens, q_lens=q_lens, num_heads=num_kv_heads * group_size,
                num_kv_heads=num_kv_heads, head_dim=draw(st.sampled_from([8, 16])),
                index_dim=draw(st.sampled_from([4, 8])), index_key_heads=index_key_heads,
                seed=draw(st.integers(0, 2**16)))


@settings(max_examples=30, deadline=None)
@given(spec=paged_batches(), topk=st.integers(1, 6))
def test_select_blocks_matches_oracle(spec, topk):
    batch = make_batch(**spec)
    blocks = kernels.select_blocks(batch.q_idx, batch.k_idx_cache, *batch.layout(), topk=topk,
                                   backend="reference")
    assert blocks.dtype == torch.int32 and blocks.shape == (*batch.q_idx.shape[:2], topk)
    check_selection(blocks, batch, topk)


def test_stale_slots_past_the_end_change_no_pick():
    """The index branch scores gathered pages without zeroing the slots past each sequence's
    end (they lie in blocks the selection never reads): NaN left there by a page's previous
    owner must change no pick. The decode rows of 600 and 700 tokens share a unit, whose
    scores run to token 640: past the shorter row's end."""
    batch = make_batch([600, 700, 900, 1000], [1, 1, 1, 300], 6, 3, 16, 8, 1, seed=3)
    clean = kernels.select_blocks(batch.q_idx, batch.k_idx_cache, *batch.layout(), topk=3)
    poisoned = batch.k_idx_cache.clone()
    for b, seq_len in enumerate(batch.seq_lens.tolist()):
        last_page = int(batch.block_table[b, (seq_len - 1) // 128])
        poisoned[last_page, (seq_len - 1) % 128 + 1:] = float("nan")
    unused = set(range(poisoned.shape[0])) - set(batch.block_table[batch.block_table >= 0]
                                                 .tolist())
    poisoned[sorted(unused)] = float("nan")
    picks = kernels.select_blocks(batch.q_idx, poisoned, *batch.layout(), topk=3)
    assert torch.equal(picks, clean)
    check_selection(clean, batch, 3)


@settings(max_examples=30, deadline=None)
@given(spec=paged_batches(), topk=st.integers(1, 6))
def test_sparse_attention_matches_oracle(spec, topk):
    batch = make_batch(**spec)
    blocks = kernels.select_blocks(batch.q_idx, batch.k_idx_cache, *batch.layout(), topk=topk)
    out, lse = kernels.sparse_attention(batch.q, batch.k_cache, batch.v_cache, *batch.layout(),
                                        blocks, return_lse=True, backend="reference")
    ref_out, ref_lse = oracle_attention(batch, blocks)
    assert relative_error(out, ref_out) < 1e-5
    assert torch.allclose(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2),
                                       (torch.float16, 1e-2)])
def test_sparse_attention_low_precision(dtype, tol):
    batch = make_batch([700, 300], [5, 300], 8, 2, 16, 8, 1, seed=3)
    blocks = kernels.select_blocks(batch.q_idx, batch.k_idx_cache, *batch.layout(), topk=3)
    ref_out, _ = oracle_attention(batch, blocks)
    low = batch.to(dtype=dtype)
    out = kernels.sparse_attention(low.q, low.k_cache, low.v_cache, *low.layout(), blocks)
    assert out.dtype == dtype
    # The oracle sees the unrounded inputs, so this bounds input rounding plus accumulation.
    assert relative_error(out, ref_out) < tol


def test_default_topk_long_context_decode():
    """topk 16 over 2,300 tokens (18 pages): selection really drops blocks."""
    batch = make_batch([2300, 2050], [1, 3], 4, 2, 8, 8, 2, seed=11)
    blocks = kernels.select_blocks(batch.q_idx, batch.k_idx_cache, *batch.layout())
    check_selection(blocks, batch, 16)
    assert (blocks[0] >= 0).sum(-1).tolist() == [16, 16]
    out = kernels.sparse_attention(batch.q, batch.k_cache, batch.v_cache, *batch.layout(), blocks)
    assert relative_error(out, oracle_attention(batch, blocks)[0]) < 1e-5
    dense = kernels.dense_attention(batch.q, batch.k_cache, batch.v_cache, *batch.layout())
    assert relative_error(out, dense.double()) > 1e-3, "sparse must differ from dense here"


@settings(max_examples=15, deadline=None)
@given(spec=paged_batches())
def test_sparse_equals_dense_when_topk_covers_everything(spec):
    batch = make_batch(**spec)
    topk = 1 + max(-(-n // 128) for n in spec["seq_lens"])
    blocks = kernels.select_blocks(batch.q_idx, batch.k_idx_cache, *batch.layout(), topk=topk)
    sparse = kernels.sparse_attention(batch.q, batch.k_cache, batch.v_cache, *batch.layout(), blocks)
    dense = kernels.dense_attention(batch.q, batch.k_cache, batch.v_cache, *batch.layout())
    assert relative_error(sparse, dense.double()) < 1e-6
    assert relative_error(dense, oracle_attention(batch, None)[0]) < 1e-5


def test_softmax_scale_is_honoured():
    batch = make_batch([300], [4], 4, 2, 16, 8, 1, seed=5)
    out = kernels.dense_attention(batch.q, batch.k_cache, batch.v_cache, *batch.layout(),
                                  softmax_scale=0.05)
    assert relative_error(out, oracle_attention(batch, None, scale=0.05)[0]) < 1e-5


class TestValidation:
    batch = make_batch([200, 40], [3, 40], 4, 2, 8, 8, 1)

    def attention(self, **override):
        args = dict(q=self.batch.q, k_cache=self.batch.k_cache, v_cache=self.batch.v_cache,
                    block_table=self.batch.block_table, seq_lens=self.batch.seq_lens,
                    cu_seqlens_q=self.batch.cu_seqlens_q)
        args.update(override)
        return kernels.dense_attention(**args)

    @pytest.mark.parametrize("override,message", [
        (dict(seq_lens=torch.tensor([200, 40], dtype=torch.int64)), "seq_lens must be int32"),
        (dict(cu_seqlens_q=torch.tensor([0, 3, 42], dtype=torch.int32)), "ends at 42"),
        (dict(cu_seqlens_q=torch.tensor([0, 3], dtype=torch.int32)), "batch \\+ 1"),
        (dict(seq_lens=torch.tensor([2, 40], dtype=torch.int32)), "seq_lens >= its query count"),
        (dict(seq_lens=torch.tensor([900, 40], dtype=torch.int32)), "too few"),
        (dict(block_table=torch.full((2, 3), 99, dtype=torch.int32)), "outside"),
        (dict(q=torch.zeros(43, 3, 8)), "multiple of KV heads"),
        (dict(q=torch.zeros(43, 4, 16)), "head dims differ"),
        (dict(q=torch.zeros(43, 4, 8, dtype=torch.int64)), "q must be one of"),
        (dict(k_cache=torch.zeros(5, 64, 2, 8)), "k_cache must be"),
    ])
    def test_bad_attention_inputs(self, override, message):
        with pytest.raises(ValueError, match=message):
            self.attention(**override)

    def test_bad_blocks(self):
        blocks = torch.zeros(43, 2, 4, dtype=torch.int32)
        blocks[40, 0, 0] = 1  # the second sequence has a single page
        with pytest.raises(ValueError, match="blocks holds ids outside"):
            kernels.sparse_attention(self.batch.q, self.batch.k_cache, self.batch.v_cache,
                                     *self.batch.layout(), blocks)

    def test_bad_index_heads_and_backend(self):
        with pytest.raises(ValueError, match="index-key heads"):
            kernels.select_blocks(torch.zeros(43, 2, 8), torch.zeros(5, 128, 3, 8),
                                  *self.batch.layout())
        with pytest.raises(ValueError, match="backend must be"):
            kernels.select_blocks(self.batch.q_idx, self.batch.k_idx_cache, *self.batch.layout(),
                                  backend="cuda")
