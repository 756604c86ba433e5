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
flash attention. Dense attention is the same with every historical block chosen.

The math is `reference.sparse_attention` / `reference.dense_attention`."""

from __future__ import annotations

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
    rows, num_heads, head_dim = q.shape
    num_groups = keys.shape[1]
    group_size = num_heads // num_groups
    positions = torch.arange(first_position, first_position + rows, device=q.device)
    local = positions // BLOCK_SIZE
    out_local, lse_local = _local_blocks(q, keys, values, first_position, scale)
    if blocks is None:  # dense: every block before a row's own, the same for every group
        every_earlier = torch.arange(int(local.max()), device=q.device)[None, :].expand(rows, -1)
        dense_picks = _historical_picks(every_earlier, local)
    out = torch.empty_like(q)
    for group in range(num_groups):
        heads = slice(group * group_size, (group + 1) * group_size)
        chosen_rows, chosen_blocks = (dense_picks if blocks is None else
                                      _historical_picks(blocks[:, group].long(), local))
        partial_out, partial_lse = _historical_blocks(
            q[:, heads], keys[:, group], values[:, group], chosen_rows, chosen_blocks, scale)
        out[:, heads] = _merge(out_local[:, heads], lse_local[:, heads], partial_out,
                               partial_lse, chosen_rows)
    return out


def _local_blocks(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  first_position: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row over its own block's keys up to itself: [t, Hq, D] and lse [t, Hq]."""
    rows, num_heads, head_dim = q.shape
    num_groups = keys.shape[1]
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
        block_keys = block_keys.view(num_blocks, BLOCK_SIZE, num_groups, 1, head_dim)
        block_keys = block_keys.expand(-1, -1, -1, num_heads // num_groups, -1)
        kv.append(block_keys.reshape(num_blocks, BLOCK_SIZE, num_heads, head_dim).transpose(1, 2))
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


def _historical_blocks(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       rows: torch.Tensor, blocks: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each (row, block) pair's attention over the block's keys, all of them visible:
    [P, G, D] and lse [P, G] for a group of G query heads."""
    pairs = rows.shape[0]
    _, group_size, head_dim = q.shape
    out = q.new_empty(pairs, group_size, head_dim)
    lse = q.new_empty(pairs, group_size, dtype=torch.float32)
    if pairs == 0:
        return out, lse
    # The rows of one block sit together (sorted by block); their heads fold into the rows.
    gathered = q.index_select(0, rows).view(1, 1, pairs * group_size, head_dim)
    counts = torch.bincount(blocks).tolist()
    start = 0
    for block, count in enumerate(counts):
        if count == 0:
            continue
        span = slice(start * group_size, (start + count) * group_size)
        keys_of_block = keys[block * BLOCK_SIZE:(block + 1) * BLOCK_SIZE][None, None]
        values_of_block = values[block * BLOCK_SIZE:(block + 1) * BLOCK_SIZE][None, None]
        block_out, block_lse = _flash(gathered[:, :, span], keys_of_block, values_of_block,
                                      scale=scale)
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
