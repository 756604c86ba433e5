"""Attention over the paged KV cache, made sparse by the MSA index branch."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import kernels
from worker.config import ModelConfig
from worker.engine.kv_cache import AttentionMetadata, KVCache


class GQAProjections(nn.Module):
    """A GQA attention layer's shape and its q/k/v/o projections (no biases); each model
    family adds its norms, rotary embedding and index branch, then calls `paged_attention`."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.config = config
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dense = config.is_dense_attention_layer(layer_index)
        hidden, q_width = config.hidden_size, self.num_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, q_width, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(q_width, hidden, bias=False)


def paged_attention(layer_index: int, dense: bool, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, k_idx: torch.Tensor | None,
                    index_queries: Callable[[], torch.Tensor], attn: AttentionMetadata,
                    cache: KVCache, topk: int) -> torch.Tensor:
    """Writes this step's K/V (and index keys) into the paged cache, then attends: exactly over
    every visible block in dense layers and short contexts, else over the index branch's picks.

    q [T, Hq, D]; k, v [T, Hkv, D]; index_queries() -> q_idx [T, Hkv, Di], only called when
    attention is sparse. Returns [T, Hq, D]."""
    cache.write(layer_index, attn.slot_mapping, k, v, k_idx)
    k_cache, v_cache, k_idx_cache = cache.layer(layer_index)
    layout = (attn.block_table, attn.seq_lens, attn.cu_seqlens_q)
    checks = {"check_indices": attn.check_indices}
    # With at most topk blocks visible, MSA selects everything and equals dense attention.
    if dense or attn.max_seq_len <= topk * kernels.BLOCK_SIZE:
        if attn.all_blocks is None:
            return kernels.dense_attention(q, k_cache, v_cache, *layout, **checks)
        # A CUDA-graph step: the same dense attention, as the paged kernel.
        width = attn.all_blocks.shape[1] if dense else topk
        blocks = attn.all_blocks[:, None, :width].expand(-1, k.shape[1], -1)
        return kernels.sparse_attention(q, k_cache, v_cache, *layout, blocks, **checks)
    blocks = kernels.select_blocks(index_queries(), k_idx_cache, *layout, topk=topk, **checks)
    return kernels.sparse_attention(q, k_cache, v_cache, *layout, blocks, **checks)
