"""The Triton backend of the `kernels` functions (CUDA; CPU under TRITON_INTERPRET=1)."""

from __future__ import annotations

import torch

from kernels import prefill_kv_major, query_major
from kernels.index_scoring import select_blocks
from kernels.reference import dense_attention  # dense layers: the reference (SDPA) path

__all__ = ["select_blocks", "sparse_attention", "dense_attention"]

# Below this many query rows in a step the query-major kernel wins (decode, short chunks): the
# KV-major kernel's CSR sort and partial round trip only pay off when blocks are shared by many
# queries. Measured crossover on an H100: bench/results/kernels_h100.md.
KV_MAJOR_MIN_ROWS = 1024


def sparse_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_table: torch.Tensor, seq_lens: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, blocks: torch.Tensor,
                     softmax_scale: float | None = None, return_lse: bool = False):
    impl = prefill_kv_major if q.shape[0] >= KV_MAJOR_MIN_ROWS else query_major
    return impl.sparse_attention(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                                 blocks, softmax_scale, return_lse)
