"""The Triton backend of the `kernels` functions (CUDA; CPU under TRITON_INTERPRET=1)."""

from __future__ import annotations

import torch

from kernels import prefill_kv_major, query_major
from kernels.index_scoring import select_blocks
from kernels.reference import dense_attention  # dense layers: the reference (SDPA) path

__all__ = ["select_blocks", "sparse_attention", "dense_attention"]

# Measured crossover on an H100 (bench/results/kernels_h100.md): the KV-major kernel's CSR sort
# and float32 partial round trip (rows x Hq x topk x D) only pay off for long chunks, and only
# when a group has few query heads (G <= 8: 1.04x at 9.8K rows, 1.43x at 16K rows after 158K;
# at G = 16 the partials are 4x larger and it loses, 0.56x).
KV_MAJOR_MIN_ROWS = 8192
KV_MAJOR_MAX_GROUP = 8


def sparse_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_table: torch.Tensor, seq_lens: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, blocks: torch.Tensor,
                     softmax_scale: float | None = None, return_lse: bool = False):
    group = q.shape[1] // k_cache.shape[2]
    long_chunk = q.shape[0] >= KV_MAJOR_MIN_ROWS and group <= KV_MAJOR_MAX_GROUP
    impl = prefill_kv_major if long_chunk else query_major
    return impl.sparse_attention(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                                 blocks, softmax_scale, return_lse)
