"""MiniMax Sparse Attention in PyTorch: the executable form of the MSA contract.

This module is the single source of truth for the math (`shared/msa_spec.md`). Every faster
backend is tested against it, and on CPU it *is* the implementation, so it is vectorized over
tokens and heads; the only Python loops are over sequences and over query chunks that bound
memory.

Layouts (page = MSA block = 128 tokens):
    k_cache, v_cache   [num_pages, 128, Hkv, D]
    k_idx_cache        [num_pages, 128, H_ik, Di], H_ik in {1, Hkv}
    block_table        int32 [B, max_pages]   logical page -> physical page
    seq_lens           int32 [B]              tokens in cache, this step's queries included
    cu_seqlens_q       int32 [B + 1]          packed query tokens of this step
Query i of sequence b sits at position seq_lens[b] - q_len[b] + i.

Arguments are assumed valid here; `kernels.__init__` validates them at the boundary.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

BLOCK_SIZE = 128

# Upper bound on the elements of one [heads, queries, keys] score or mask tensor: queries are
# processed in chunks small enough to stay in cache, and a long prefill over a long context never
# materializes a quadratic tensor.
_MAX_SCORE_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class _SequenceSpan:
    """One sequence's slice of a packed step."""

    index: int  # b, the row of block_table / seq_lens
    seq_len: int  # tokens in the cache, including this step's queries
    q_start: int  # first packed query row
    q_end: int  # one past the last packed query row

    @property
    def num_pages(self) -> int:
        return -(-self.seq_len // BLOCK_SIZE)

    def query_chunks(self, elements_per_query: int) -> Iterator[tuple[int, int]]:
        step = max(1, _MAX_SCORE_ELEMENTS // max(1, elements_per_query))
        for start in range(self.q_start, self.q_end, step):
            yield start, min(start + step, self.q_end)

    def positions(self, start: int, end: int, device: torch.device) -> torch.Tensor:
        first = self.seq_len - (self.q_end - self.q_start)
        return torch.arange(start - self.q_start, end - self.q_start, device=device) + first


def _spans(seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor) -> Iterator[_SequenceSpan]:
    cu = cu_seqlens_q.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        if cu[b + 1] > cu[b]:
            yield _SequenceSpan(b, seq_len, cu[b], cu[b + 1])


def _gather_tokens(cache: torch.Tensor, block_table: torch.Tensor, span: _SequenceSpan,
                   dtype: torch.dtype) -> torch.Tensor:
    """The sequence's first seq_len tokens of a paged cache, in logical order: [S, H, D]."""
    pages = cache[block_table[span.index, : span.num_pages].long()]
    return pages.flatten(0, 1)[: span.seq_len].to(dtype)


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    # float64 inputs stay float64 so tests can run the reference as an exact oracle.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def topk_with_local_block(block_scores: torch.Tensor, positions: torch.Tensor,
                          topk: int) -> torch.Tensor:
    """The spec's selection rule from block scores [t, Hkv, pages] -> int32 [t, Hkv, topk].

    Only historical blocks (before the query's own) compete; the local block takes the last
    valid slot; -1 pads. Shared by every backend: they differ only in how they score blocks.
    """
    num_rows, num_groups, num_pages = block_scores.shape
    local = (positions // BLOCK_SIZE)[:, None].expand(-1, num_groups)  # [t, Hkv]
    block_ids = torch.arange(num_pages, device=block_scores.device)
    historical = block_ids[None, None, :] < local[..., None]
    block_scores = block_scores.masked_fill(~historical, -math.inf)
    selected = torch.full((num_rows, num_groups, topk), -1, dtype=torch.int32,
                          device=block_scores.device)
    slots = min(topk - 1, num_pages)
    if slots > 0:
        best, best_ids = block_scores.topk(slots, dim=-1)
        # Only -inf (non-historical) blocks lose; they sort last, so valid ids come first.
        selected[..., :slots] = torch.where(best > -math.inf, best_ids, -1).to(torch.int32)
    num_valid = torch.clamp(local, max=topk - 1)  # == historical blocks taken
    selected.scatter_(-1, num_valid[..., None], local[..., None].to(torch.int32))
    return selected


def select_blocks(q_idx: torch.Tensor, k_idx_cache: torch.Tensor, block_table: torch.Tensor,
                  seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                  topk: int = 16) -> torch.Tensor:
    """Index branch: the top-k logical blocks of each (query token, KV group).

    Row layout: the chosen historical blocks first (any order), the query's own block in the
    last valid slot, -1 after.
    """
    total_q, num_groups, index_dim = q_idx.shape
    acc = _accumulation_dtype(q_idx)
    selected = torch.full((total_q, num_groups, topk), -1, dtype=torch.int32, device=q_idx.device)
    for span in _spans(seq_lens, cu_seqlens_q):
        # [H_ik, Di, S]; H_ik == 1 broadcasts over the groups in the matmul below.
        keys = _gather_tokens(k_idx_cache, block_table, span, acc).permute(1, 2, 0)
        for start, end in span.query_chunks(num_groups * span.seq_len):
            pos = span.positions(start, end, q_idx.device)
            # Causal: blocks after the chunk's last query are never visible, so never scored.
            key_end = int(pos[-1]) + 1
            num_pages = -(-key_end // BLOCK_SIZE)
            key_pos = torch.arange(key_end, device=q_idx.device)
            queries = q_idx[start:end].to(acc).transpose(0, 1)  # [Hkv, t, Di]
            scores = (queries @ keys[..., :key_end]) / math.sqrt(index_dim)  # [Hkv, t, S']
            scores = scores.masked_fill(key_pos[None, None, :] > pos[None, :, None], -math.inf)
            scores = torch.nn.functional.pad(scores, (0, num_pages * BLOCK_SIZE - key_end),
                                             value=-math.inf)
            block_scores = scores.view(num_groups, end - start, num_pages, BLOCK_SIZE).amax(-1)
            block_scores = block_scores.transpose(0, 1)  # [t, Hkv, pages]

            selected[start:end] = topk_with_local_block(block_scores, pos, topk)
    return selected


def _attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               block_table: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
               blocks: torch.Tensor | None, softmax_scale: float | None, return_lse: bool,
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal attention of each query head over its group's selected blocks (all if None)."""
    total_q, num_heads, head_dim = q.shape
    num_groups = k_cache.shape[2]
    group_size = num_heads // num_groups
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    acc = _accumulation_dtype(q)
    out = torch.zeros_like(q)
    lse = (torch.full((total_q, num_heads), -math.inf, dtype=torch.float32, device=q.device)
           if return_lse else None)
    for span in _spans(seq_lens, cu_seqlens_q):
        keys = _gather_tokens(k_cache, block_table, span, acc).transpose(0, 1)[:, None]
        values = _gather_tokens(v_cache, block_table, span, acc).transpose(0, 1)[:, None]
        for start, end in span.query_chunks(num_heads * span.seq_len):
            t = end - start
            pos = span.positions(start, end, q.device)
            # Causal: no key after the chunk's last query is visible, so none is read.
            key_end = int(pos[-1]) + 1
            key_pos = torch.arange(key_end, device=q.device)
            visible = (key_pos[None, :] <= pos[:, None])[None]  # [1, t, S']
            if blocks is not None:
                num_pages = -(-key_end // BLOCK_SIZE)
                chosen = blocks[start:end].long()  # [t, Hkv, topk]
                chosen = torch.where((chosen < 0) | (chosen >= num_pages), num_pages, chosen)
                page_mask = torch.zeros(t, num_groups, num_pages + 1, dtype=torch.bool,
                                        device=q.device)
                page_mask.scatter_(-1, chosen, True)
                token_mask = page_mask[..., key_pos // BLOCK_SIZE]  # [t, Hkv, S']
                visible = visible & token_mask.transpose(0, 1)  # [Hkv, t, S']
            queries = q[start:end].to(acc).view(t, num_groups, group_size, head_dim)
            queries = queries.permute(1, 2, 0, 3)  # [Hkv, G, t, D]
            k = keys[:, :, :key_end].expand(-1, group_size, -1, -1)
            v = values[:, :, :key_end].expand(-1, group_size, -1, -1)
            chunk_out = torch.nn.functional.scaled_dot_product_attention(
                queries, k, v, attn_mask=visible[:, None], scale=scale)
            # A row that sees nothing (only possible with malformed selections) yields 0.
            chunk_out = chunk_out.nan_to_num(0.0)
            out[start:end] = chunk_out.permute(2, 0, 1, 3).reshape(t, num_heads, head_dim).to(q.dtype)
            if lse is not None:
                scores = (queries @ k.transpose(-1, -2)) * scale
                row_lse = scores.masked_fill(~visible[:, None], -math.inf).logsumexp(dim=-1)
                lse[start:end] = row_lse.permute(2, 0, 1).reshape(t, num_heads).float()
    return out, lse


def sparse_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_table: torch.Tensor, seq_lens: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, blocks: torch.Tensor,
                     softmax_scale: float | None = None, return_lse: bool = False):
    """Main branch: exact softmax attention over the tokens of each group's selected blocks."""
    out, lse = _attention(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, blocks,
                          softmax_scale, return_lse)
    return (out, lse) if return_lse else out


def dense_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_table: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    softmax_scale: float | None = None, return_lse: bool = False):
    """Dense causal attention over the same paged layout (dense layers, fallback, tests)."""
    out, lse = _attention(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, None,
                          softmax_scale, return_lse)
    return (out, lse) if return_lse else out
