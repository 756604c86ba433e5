"""The CPU backend (KV-block-major prefill attention in PyTorch's flash attention, the
reference for the rest) against the slow float64 oracle of the spec."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernels import cpu_backend
from tests.kernels.paged_batch import make_batch, oracle_attention, relative_error
from tests.kernels.test_reference import paged_batches


def test_cpu_is_the_default_backend_on_cpu():
    assert kernels._resolve_backend(None, torch.device("cpu")) is cpu_backend


@settings(max_examples=30, deadline=None)
@given(spec=paged_batches(), topk=st.integers(1, 6))
def test_sparse_attention_matches_oracle(spec, topk):
    # Prefills, chunks after a prefix, decodes and multi-token decodes mixed in one batch.
    batch = make_batch(**spec)
    blocks = kernels.select_blocks(batch.q_idx, batch.k_idx_cache, *batch.layout(), topk=topk)
    out = kernels.sparse_attention(batch.q, batch.k_cache, batch.v_cache, *batch.layout(),
                                   blocks, backend="cpu")
    assert relative_error(out, oracle_attention(batch, blocks)[0]) < 1e-5


@settings(max_examples=15, deadline=None)
@given(spec=paged_batches())
def test_dense_attention_matches_oracle(spec):
    batch = make_batch(**spec)
    out = kernels.dense_attention(batch.q, batch.k_cache, batch.v_cache, *batch.layout(),
                                  backend="cpu")
    assert relative_error(out, oracle_attention(batch, None)[0]) < 1e-5


@pytest.mark.parametrize("dense", [False, True])
def test_long_chunk_after_a_prefix(dense):
    """A 1,200-row chunk after 511 cached tokens (its first block shared with the prefix, its
    last one partial) beside decode rows; topk 4 of up to 14 blocks really drops blocks."""
    batch = make_batch([1711, 900, 1300], [1200, 1, 1], 9, 3, 16, 8, 1, seed=7)
    blocks = None if dense else kernels.select_blocks(batch.q_idx, batch.k_idx_cache,
                                                      *batch.layout(), topk=4)
    args = (batch.q, batch.k_cache, batch.v_cache, *batch.layout())

    def attend(**options):
        if dense:
            return kernels.dense_attention(*args, backend="cpu", **options)
        return kernels.sparse_attention(*args, blocks, backend="cpu", **options)

    assert relative_error(attend(), oracle_attention(batch, blocks)[0]) < 1e-5
    assert relative_error(attend(softmax_scale=0.05),
                          oracle_attention(batch, blocks, scale=0.05)[0]) < 1e-5


@pytest.mark.parametrize("dense", [False, True])
def test_many_decode_rows_go_through_the_reference(dense):
    """More decode rows than go one flash call each: the reference's length-batched path."""
    batch = make_batch([130, 300, 700, 900, 1300, 2100], [1] * 6, 8, 2, 16, 8, 1, seed=3)
    blocks = None if dense else kernels.select_blocks(batch.q_idx, batch.k_idx_cache,
                                                      *batch.layout(), topk=4)
    args = (batch.q, batch.k_cache, batch.v_cache, *batch.layout())
    out = (kernels.dense_attention(*args, backend="cpu") if dense
           else kernels.sparse_attention(*args, blocks, backend="cpu"))
    assert relative_error(out, oracle_attention(batch, blocks)[0]) < 1e-5


def test_log_sum_exp_comes_from_the_reference():
    batch = make_batch([600], [300], 4, 2, 8, 8, 1, seed=2)
    blocks = kernels.select_blocks(batch.q_idx, batch.k_idx_cache, *batch.layout(), topk=2)
    args = (batch.q, batch.k_cache, batch.v_cache, *batch.layout(), blocks)
    out, lse = kernels.sparse_attention(*args, return_lse=True, backend="cpu")
    ref_out, ref_lse = oracle_attention(batch, blocks)
    assert relative_error(out, ref_out) < 1e-5
    assert torch.allclose(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
