"""Random paged batches for kernel tests, and a slow float64 loop oracle of the MSA spec.

The oracle is written independently of `kernels.reference` (plain loops over tokens, heads and
blocks) so that the two can disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BLOCK = 128


@dataclass
class PagedBatch:
    q: torch.Tensor  # [T, Hq, D]
    q_idx: torch.Tensor  # [T, Hkv, Di]
    k_cache: torch.Tensor  # [P, 128, Hkv, D]
    v_cache: torch.Tensor
    k_idx_cache: torch.Tensor  # [P, 128, H_ik, Di]
    block_table: torch.Tensor  # int32 [B, max_pages]
    seq_lens: torch.Tensor  # int32 [B]
    cu_seqlens_q: torch.Tensor  # int32 [B + 1]

    def layout(self):
        return self.block_table, self.seq_lens, self.cu_seqlens_q

    def to(self, **kwargs) -> "PagedBatch":
        floats = {k: getattr(self, k).to(**kwargs) for k in
                  ("q", "q_idx", "k_cache", "v_cache", "k_idx_cache")}
        ints = {k: getattr(self, k).to(device=kwargs.get("device")) for k in
                ("block_table", "seq_lens", "cu_seqlens_q")}
        return PagedBatch(**floats, **ints)


def make_batch(seq_lens: list[int], q_lens: list[int], num_heads: int, num_kv_heads: int,
               head_dim: int, index_dim: int, index_key_heads: int, seed: int = 0,
               dtype: torch.dtype = torch.float32, spare_pages: int = 3) -> PagedBatch:
    """Sequences whose pages are scattered over a shuffled pool with unused pages in between."""
    g = torch.Generator().manual_seed(seed)
    pages_per_seq = [-(-n // BLOCK) for n in seq_lens]
    num_pages = sum(pages_per_seq) + spare_pages
    perm = torch.randperm(num_pages, generator=g)
    max_pages = max(pages_per_seq) + 1  # an unused column must be ignored
    block_table = torch.full((len(seq_lens), max_pages), -7, dtype=torch.int32)
    offset = 0
    for b, n in enumerate(pages_per_seq):
        block_table[b, :n] = perm[offset: offset + n].to(torch.int32)
        offset += n
    total_q = sum(q_lens)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    return PagedBatch(
        q=rand(total_q, num_heads, head_dim),
        q_idx=rand(total_q, num_kv_heads, index_dim),
        k_cache=rand(num_pages, BLOCK, num_kv_heads, head_dim),
        v_cache=rand(num_pages, BLOCK, num_kv_heads, head_dim),
        k_idx_cache=rand(num_pages, BLOCK, index_key_heads, index_dim),
        block_table=block_table,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        cu_seqlens_q=cu,
    )


def _sequence_tokens(cache: torch.Tensor, batch: PagedBatch, b: int) -> torch.Tensor:
    """[seq_len, H, D] float64, copied token by token through the block table."""
    seq_len = int(batch.seq_lens[b])
    return torch.stack([cache[int(batch.block_table[b, j // BLOCK]), j % BLOCK]
                        for j in range(seq_len)]).double()


def _query_rows(batch: PagedBatch):
    """(row, sequence, position) of every packed query."""
    cu = batch.cu_seqlens_q.tolist()
    for b, seq_len in enumerate(batch.seq_lens.tolist()):
        q_len = cu[b + 1] - cu[b]
        for i in range(q_len):
            yield cu[b] + i, b, seq_len - q_len + i


def oracle_block_scores(batch: PagedBatch) -> dict[tuple[int, int], list[float]]:
    """(row, group) -> score of every block up to and including the local one."""
    num_groups, index_dim = batch.q_idx.shape[1], batch.q_idx.shape[2]
    scores = {}
    keys = {}
    for row, b, pos in _query_rows(batch):
        if b not in keys:
            keys[b] = _sequence_tokens(batch.k_idx_cache, batch, b)
        for grp in range(num_groups):
            head = grp if batch.k_idx_cache.shape[2] > 1 else 0
            token_scores = (keys[b][: pos + 1, head] @ batch.q_idx[row, grp].double()).tolist()
            scores[row, grp] = [max(token_scores[blk * BLOCK:(blk + 1) * BLOCK]) / math.sqrt(index_dim)
                                for blk in range(pos // BLOCK + 1)]
    return scores


def oracle_attention(batch: PagedBatch, blocks: torch.Tensor | None,
                     scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 softmax attention, looping over every query row and head."""
    total_q, num_heads, head_dim = batch.q.shape
    group_size = num_heads // batch.k_cache.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    out = torch.zeros(total_q, num_heads, head_dim, dtype=torch.float64)
    lse = torch.zeros(total_q, num_heads, dtype=torch.float64)
    kv = {}
    for row, b, pos in _query_rows(batch):
        if b not in kv:
            kv[b] = (_sequence_tokens(batch.k_cache, batch, b),
                     _sequence_tokens(batch.v_cache, batch, b))
        keys, vals = kv[b]
        for h in range(num_heads):
            grp = h // group_size
            allowed = (set(range(pos // BLOCK + 1)) if blocks is None
                       else {int(x) for x in blocks[row, grp] if int(x) >= 0})
            visible = [j for j in range(pos + 1) if j // BLOCK in allowed]
            logits = (keys[visible, grp] @ batch.q[row, h].double()) * scale
            out[row, h] = torch.softmax(logits, 0) @ vals[visible, grp]
            lse[row, h] = torch.logsumexp(logits, 0)
    return out, lse


def check_selection(blocks: torch.Tensor, batch: PagedBatch, topk: int,
                    tie_rtol: float = 1e-3) -> None:
    """Asserts the spec's row layout and that the chosen set is a correct top-(k-1)."""
    scores = oracle_block_scores(batch)
    for (row, grp), per_block in scores.items():
        got = [int(x) for x in blocks[row, grp]]
        local = len(per_block) - 1
        expected_valid = min(topk - 1, local) + 1
        assert all(x >= 0 for x in got[:expected_valid]), (row, grp, got)
        assert all(x == -1 for x in got[expected_valid:]), (row, grp, got)
        assert got[expected_valid - 1] == local, f"local block not last valid: {got}"
        historical = got[: expected_valid - 1]
        assert len(set(historical)) == len(historical), f"duplicate blocks: {got}"
        assert all(0 <= x < local for x in historical), f"non-historical block chosen: {got}"
        if len(historical) < local:
            ranked = sorted(per_block[:local], reverse=True)
            cutoff = ranked[len(historical) - 1] if historical else math.inf
            for x in historical:  # every chosen block is at least as good as the cutoff
                assert per_block[x] >= cutoff - tie_rtol * abs(cutoff), (row, grp, got)
            for x in set(range(local)) - set(historical):  # every dropped one no better
                assert per_block[x] <= cutoff + tie_rtol * abs(cutoff), (row, grp, got)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())
