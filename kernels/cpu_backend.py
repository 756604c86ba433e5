"""The CPU backend of the `kernels` functions: prefill attention KV-block-major
(`cpu_kv_major`), everything else as the PyTorch reference computes it (decode rows batched
across sequences, the index branch, experts, FP8 GEMMs)."""

from __future__ import annotations

import torch

from kernels import cpu_kv_major, reference
from kernels.reference import BLOCK_SIZE, fp8_linear, routed_experts, select_blocks

__all__ = ["select_blocks", "sparse_attention", "dense_attention", "routed_experts",
           "fp8_linear"]


def sparse_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_table: torch.Tensor, seq_lens: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, blocks: torch.Tensor,
                     softmax_scale: float | None = None, return_lse: bool = False):
    if return_lse:
        return reference.sparse_attention(q, k_cache, v_cache, block_table, seq_lens,
                                          cu_seqlens_q, blocks, softmax_scale, return_lse)
    return _attention(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, blocks,
                      softmax_scale)


def dense_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_table: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    softmax_scale: float | None = None, return_lse: bool = False):
    if return_lse:
        return reference.dense_attention(q, k_cache, v_cache, block_table, seq_lens,
                                         cu_seqlens_q, softmax_scale, return_lse)
    return _attention(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, None,
                      softmax_scale)


# Up to this many decode rows go one flash call each (a handful of ops per row); more are batched
# by length through the reference, whose fixed cost of a few dozen ops then pays off.
_DECODES_ONE_BY_ONE = 4


def _attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               block_table: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
               blocks: torch.Tensor | None, softmax_scale: float | None) -> torch.Tensor:
    """Prefill chunks (more than one row of a sequence) KV-block-major, one sequence at a time;
    a few decode rows one flash call each, many through the reference, batched by length."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    out = torch.empty_like(q)
    decodes = []
    for seq, seq_len in enumerate(lens):
        rows = slice(cu[seq], cu[seq + 1])
        q_len = rows.stop - rows.start
        if q_len == 1:
            decodes.append(seq)
        elif q_len > 1:
            pages = _pages_of(block_table, seq, seq_len)
            keys, values = (cpu_kv_major.sequence_tokens(cache, pages, seq_len, q.dtype)
                            for cache in (k_cache, v_cache))
            out[rows] = cpu_kv_major.prefill_attention(
                q[rows], keys, values, seq_len - q_len,
                None if blocks is None else blocks[rows], scale)
    if 0 < len(decodes) <= _DECODES_ONE_BY_ONE:
        for seq in decodes:
            out[cu[seq]] = cpu_kv_major.decode_attention(
                q[cu[seq]], k_cache, v_cache, _pages_of(block_table, seq, lens[seq]), lens[seq],
                None if blocks is None else blocks[cu[seq]], scale)
    elif decodes:
        seqs = torch.tensor(decodes, device=q.device)
        rows = cu_seqlens_q[seqs].long()
        layout = (block_table[seqs], seq_lens[seqs],
                  torch.arange(len(decodes) + 1, dtype=torch.int32, device=q.device))
        if blocks is None:
            out[rows] = reference.dense_attention(q[rows], k_cache, v_cache, *layout, scale)
        else:
            out[rows] = reference.sparse_attention(q[rows], k_cache, v_cache, *layout,
                                                   blocks[rows], scale)
    return out


def _pages_of(block_table: torch.Tensor, seq: int, seq_len: int) -> torch.Tensor:
    """The pages holding a sequence's seq_len tokens, in logical order."""
    return block_table[seq, : -(-seq_len // BLOCK_SIZE)].long()
