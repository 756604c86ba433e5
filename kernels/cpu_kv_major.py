"""KV-block-major prefill attention on CPU: the Triton prefill kernel's plan ("KV outer, gather
Q") in PyTorch ops, so a CPU prefill does MSA's sparse work and not the dense work under a mask.

For one sequence's prefill chunk, each query row attends to its own (local) block causally and
to its chosen historical blocks entirely. So:
- the local part is one causal flash attention over the chunk's query blocks as a batch: a row
  sits at its offset inside its block, so the top-left causal mask is the right one;
- the historical part gathers, for each (KV group, block), the rows that chose it, with the
  group's query heads folded into the rows (no mask is needed), and runs flash attention over
  that block's 128 keys once for all of them;
- the partial outputs merge by log-sum-exp per row.
The work is the selected blocks' and nothing else, and every product runs in PyTorch's CPU
flash attention. Dense attention needs no picks: the chunk's own keys causally and every earlier
key entirely, two flash calls and one merge.

PyTorch's CPU flash attention takes fewer key heads than query heads (GQA: query head h reads
key head h // (Hq / Hkv)), so keys are never repeated per query head.

The math is `reference.sparse_attention` / `reference.dense_attention`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.reference import BLOCK_SIZE

# PyTorch's CPU flash attention, called directly for its log-sum-exp (the public SDPA returns
# only the output), which the merge of partial outputs needs.
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def prefill_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      first_position: int, blocks: torch.Tensor | None,
                      scale: float) -> torch.Tensor:
    """One sequence's chunk: q [t, Hq, D] at positions first_position.., keys/values
    [seq_len, Hkv, D] (the sequence's whole context, the chunk's own keys last), blocks
    [t, Hkv, topk] logical block ids (-1 pads) or None for dense. Returns [t, Hq, D]."""
    if blocks is None:
        return _dense(q, keys, values, first_position, scale)
    rows, num_heads, _ = q.shape
    num_groups = keys.shape[1]
    group_size = num_heads // num_groups
    local = torch.arange(first_position, first_position + rows, device=q.device) // BLOCK_SIZE
    out_local, lse_local = _local_blocks(q, keys, values, first_position, scale)
    key_blocks, value_blocks = _blocks_by_group(keys), _blocks_by_group(values)
    picks = [_historical_picks(blocks[:, group].long(), local) for group in range(num_groups)]
    # The groups take turns in one workspace: on CPU, first-touch page faults on fresh buffers
    # this large cost about as much as the copies into them.
    workspace = _Workspace.for_pairs(max(len(pair_rows) for pair_rows, _ in picks), group_size, q)
    out = torch.empty_like(q)
    for group, (chosen_rows, chosen_blocks) in enumerate(picks):
        heads = slice(group * group_size, (group + 1) * group_size)
        partial_out, partial_lse = _historical_blocks(
            q[:, heads], key_blocks[group], value_blocks[group], chosen_rows, chosen_blocks,
            scale, workspace)
        out[:, heads] = _merge(out_local[:, heads], lse_local[:, heads], partial_out,
                               partial_lse, chosen_rows)
    return out


@dataclass
class _Workspace:
    """Flat buffers the groups' (row, block) pairs take turns in: the gathered query rows,
    their outputs and their log-sum-exps."""

    gathered: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor

    @classmethod
    def for_pairs(cls, pairs: int, group_size: int, q: torch.Tensor) -> _Workspace:
        rows = pairs * group_size
        return cls(q.new_empty(rows * q.shape[-1]), q.new_empty(rows * q.shape[-1]),
                   q.new_empty(rows, dtype=torch.float32))

    def views(self, pairs: int, group_size: int, head_dim: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """gathered and out [pairs, G, D], lse [pairs, G]: contiguous views."""
        rows = pairs * group_size
        return (self.gathered[:rows * head_dim].view(pairs, group_size, head_dim),
                self.out[:rows * head_dim].view(pairs, group_size, head_dim),
                self.lse[:rows].view(pairs, group_size))


def _blocks_by_group(cache: torch.Tensor) -> torch.Tensor:
    """[seq_len, Hkv, D] -> [Hkv, blocks, 128, D], each block's keys contiguous for the flash
    calls (the last block zero-padded: its keys past the end are never visible)."""
    padded_len = -(-cache.shape[0] // BLOCK_SIZE) * BLOCK_SIZE
    padded = F.pad(cache, (0, 0, 0, 0, 0, padded_len - cache.shape[0]))
    return padded.view(-1, BLOCK_SIZE, *cache.shape[1:]).permute(2, 0, 1, 3).contiguous()


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """[t, H, D] -> the flash layout [1, H, t, D]."""
    return x.transpose(0, 1)[None]


def _rows_first(x: torch.Tensor) -> torch.Tensor:
    """The flash layout [1, H, t, ...] -> [t, H, ...]."""
    return x[0].transpose(0, 1)


def _dense(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first_position: int,
           scale: float) -> torch.Tensor:
    """Each row over every key up to itself: the chunk's own keys causally (as many keys as
    rows, so the top-left causal mask is the right one), the keys before the chunk entirely."""
    queries = _heads_first(q)
    out, lse = _flash(queries, _heads_first(keys[first_position:]),
                      _heads_first(values[first_position:]), is_causal=True, scale=scale)
    out, lse = _rows_first(out), _rows_first(lse)
    if first_position == 0:
        return out
    earlier_out, earlier_lse = _flash(queries, _heads_first(keys[:first_position]),
                                      _heads_first(values[:first_position]), scale=scale)
    # Both lse are finite (each part sees at least one key): a two-way softmax merge.
    earlier_out, earlier_lse = _rows_first(earlier_out), _rows_first(earlier_lse)
    weight = torch.sigmoid(lse.float() - earlier_lse.float())[..., None]
    return torch.lerp(earlier_out.float(), out.float(), weight).to(q.dtype)


def _local_blocks(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  first_position: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row over its own block's keys up to itself: [t, Hq, D] and lse [t, Hq]."""
    rows, num_heads, head_dim = q.shape
    first_block = first_position // BLOCK_SIZE
    last_block = (first_position + rows - 1) // BLOCK_SIZE
    num_blocks = last_block - first_block + 1
    start = first_block * BLOCK_SIZE
    offset = first_position - start
    # Rows at their offsets inside their blocks; the slots around the chunk stay zero and
    # their outputs are dropped.
    padded = q.new_zeros(num_blocks * BLOCK_SIZE, num_heads, head_dim)
    padded[offset:offset + rows] = q
    padded = padded.view(num_blocks, BLOCK_SIZE, num_heads, head_dim).transpose(1, 2)
    kv = []
    for cache in (keys, values):
        block_keys = cache[start:(last_block + 1) * BLOCK_SIZE]
        # The last block's slots past the sequence's end: zeros, hidden by the causal mask.
        block_keys = F.pad(block_keys, (0, 0, 0, 0, 0, num_blocks * BLOCK_SIZE
                                        - block_keys.shape[0]))
        kv.append(block_keys.view(num_blocks, BLOCK_SIZE, -1, head_dim).transpose(1, 2))
    out, lse = _flash(padded, *kv, is_causal=True, scale=scale)
    out = out.transpose(1, 2).reshape(-1, num_heads, head_dim)[offset:offset + rows]
    lse = lse.transpose(1, 2).reshape(-1, num_heads)[offset:offset + rows]
    return out, lse


def _historical_picks(chosen: torch.Tensor,
                      local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, block) pairs of the blocks each row chose ([t, n] ids, -1 pads) before its own,
    sorted by block: rows [P], blocks [P]."""
    historical = (chosen >= 0) & (chosen < local[:, None])
    rows, slots = historical.nonzero(as_tuple=True)
    picked = chosen[rows, slots]
    order = picked.argsort(stable=True)
    return rows[order], picked[order]


def _historical_blocks(q: torch.Tensor, key_blocks: torch.Tensor, value_blocks: torch.Tensor,
                       rows: torch.Tensor, blocks: torch.Tensor, scale: float,
                       workspace: _Workspace) -> tuple[torch.Tensor, torch.Tensor]:
    """Each (row, block) pair's attention over the block's keys ([blocks, 128, D]), all of
    them visible: [P, G, D] and lse [P, G] for a group of G query heads, in the workspace."""
    pairs = rows.shape[0]
    _, group_size, head_dim = q.shape
    gathered, out, lse = workspace.views(pairs, group_size, head_dim)
    if pairs == 0:
        return out, lse
    # The rows of one block sit together (sorted by block); their heads fold into the rows.
    torch.index_select(q, 0, rows, out=gathered)
    gathered = gathered.view(1, 1, pairs * group_size, head_dim)
    blocks_in_order, counts = torch.unique_consecutive(blocks, return_counts=True)
    start = 0
    for block, count in zip(blocks_in_order.tolist(), counts.tolist()):
        span = slice(start * group_size, (start + count) * group_size)
        block_out, block_lse = _flash(gathered[:, :, span], key_blocks[block][None, None],
                                      value_blocks[block][None, None], scale=scale)
        out[start:start + count] = block_out.view(count, group_size, head_dim)
        lse[start:start + count] = block_lse.view(count, group_size)
        start += count
    return out, lse


def _merge(out_local: torch.Tensor, lse_local: torch.Tensor, partial_out: torch.Tensor,
           partial_lse: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Softmax-weighted sum of each row's partial outputs: its local block's and its
    historical blocks' ([P, G, D] at `rows`). The local lse is finite (a row sees itself)."""
    group_size = lse_local.shape[1]
    lse_local = lse_local.float()
    row_max = lse_local.clone()
    row_max.scatter_reduce_(0, rows[:, None].expand(-1, group_size), partial_lse, "amax")
    local_weight = (lse_local - row_max).exp_()
    weight = (partial_lse - row_max[rows]).exp_()
    total = out_local.float() * local_weight[..., None]
    total.index_add_(0, rows, partial_out.float().mul_(weight[..., None]))
    normalizer = local_weight.index_add_(0, rows, weight)
    return total.div_(normalizer[..., None]).to(out_local.dtype)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     pages: torch.Tensor, seq_len: int, blocks: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """One sequence's decode row: q [Hq, D] at position seq_len - 1 over its pages (logical
    order) of the paged caches [pages, 128, Hkv, D], blocks [Hkv, topk] (-1 pads) or None for
    dense. Every chosen key is visible, so it is one flash call with no mask: a group's query
    heads fold into rows over that group's chosen blocks. Returns [Hq, D]."""
    num_heads, head_dim = q.shape
    num_groups = k_cache.shape[2]
    # Pages are gathered with index_select (whole pages, memcpy-sized rows): about twice as
    # fast as one advanced index over pages and groups, which a decode step pays every layer.
    if blocks is None:  # dense: every group reads every page, so one gather serves them all
        keys, values = (sequence_tokens(cache, pages, seq_len, q.dtype).transpose(0, 1)
                        for cache in (k_cache, v_cache))
    else:
        # Every group chose as many blocks (all of them, or topk); its own block is the last.
        count = int((blocks[0] >= 0).sum())
        chosen_pages = pages[blocks[:, :count].long()]  # [Hkv, count]
        # The own (last) block holds the keys up to the sequence's end and nothing after.
        visible = (count - 1) * BLOCK_SIZE + seq_len - (seq_len - 1) // BLOCK_SIZE * BLOCK_SIZE
        keys, values = (_pages_by_group(cache, chosen_pages)[:, :visible].to(q.dtype)
                        for cache in (k_cache, v_cache))
    out, _ = _flash(q.view(num_groups, -1, head_dim)[None], keys[None], values[None],
                    scale=scale)
    return out.view(num_heads, head_dim)


def sequence_tokens(cache: torch.Tensor, pages: torch.Tensor, seq_len: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """A sequence's seq_len tokens of a paged cache [pages, 128, Hkv, D], its pages given in
    logical order: [seq_len, Hkv, D]."""
    return torch.index_select(cache, 0, pages).flatten(0, 1)[:seq_len].to(dtype)


def _pages_by_group(cache: torch.Tensor, chosen_pages: torch.Tensor) -> torch.Tensor:
    """Each group's chosen pages of a paged cache [pages, 128, Hkv, D]: [Hkv, count * 128, D],
    one page gather per group straight into its rows."""
    num_groups, count = chosen_pages.shape
    out = cache.new_empty(num_groups, count, BLOCK_SIZE, cache.shape[-1])
    for group, group_pages in enumerate(chosen_pages):
        torch.index_select(cache[:, :, group], 0, group_pages, out=out[group])
    return out.flatten(1, 2)
