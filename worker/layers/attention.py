"""Attention over the paged KV cache, made sparse by the MSA index branch."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import kernels
from worker import parallel
from worker.config import ModelConfig
from worker.engine.kv_cache import AttentionMetadata, KVCache
from worker.layers.linear import ColumnParallelLinear, RowParallelLinear, stack_projections


class GQAProjections(nn.Module):
    """A GQA attention layer's shape and its q/k/v/o projections (no biases); each model
    family adds its norms, rotary embedding and index branch, then calls `paged_attention`
    and `output`. Under tensor parallelism `num_heads`/`num_kv_heads` are this rank's.

    Loaded, q, k, v and the family's index projections (`input_projections`) become one GEMM,
    `qkv_proj`, which returns their outputs in that order."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.config = config
        self.layer_index = layer_index
        state = parallel.state()
        _, self.num_heads = state.part(config.num_attention_heads, "num_attention_heads")
        first_kv_head, self.num_kv_heads = state.kv_heads(config.num_key_value_heads)
        # How the per-KV-head weights (k, v, one index query head per group) split: into
        # kv_parts pieces, this rank holding piece kv_part (shared by ranks past the KV heads).
        self.kv_parts = config.num_key_value_heads // self.num_kv_heads
        self.kv_part = first_kv_head // self.num_kv_heads
        self.head_dim = config.head_dim
        self.dense = config.is_dense_attention_layer(layer_index)
        hidden, q_width = config.hidden_size, config.num_attention_heads * self.head_dim
        kv_width = config.num_key_value_heads * self.head_dim
        self.q_proj = ColumnParallelLinear(hidden, q_width)
        self.k_proj = self.per_kv_head(hidden, kv_width)
        self.v_proj = self.per_kv_head(hidden, kv_width)
        self.o_proj = RowParallelLinear(q_width, hidden)

    def input_projections(self) -> list[str]:
        """The projections of the layer's input, in the order `qkv_proj` returns them."""
        return ["q_proj", "k_proj", "v_proj"]

    def stack_projections(self) -> None:
        stack_projections(self, self.input_projections(), into="qkv_proj")

    def per_kv_head(self, in_features: int, out_features: int) -> ColumnParallelLinear:
        """A projection with one block of rows per KV head, split as the KV heads are."""
        return ColumnParallelLinear(in_features, out_features, self.kv_parts, self.kv_part)

    def output_layout(self, q: torch.Tensor) -> kernels.ActivationLayout | None:
        """How o_proj's FP8 GEMM takes the heads' outputs (shaped as q [T, heads, D]) quantized,
        for the attention kernel to quantize them as it writes them (`paged_attention`)."""
        return self.o_proj.input_layout(q.flatten(1))

    def output(self, attention: torch.Tensor | kernels.QuantizedRows) -> torch.Tensor:
        """o_proj of the heads' outputs [T, heads, D] (or as `output_layout` quantized them),
        summed over the ranks' heads."""
        if isinstance(attention, torch.Tensor):
            attention = attention.reshape(attention.shape[0], -1)
        return parallel.all_reduce(self.o_proj(attention))


def paged_attention(layer_index: int, dense: bool, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, k_idx: torch.Tensor | None,
                    index_queries: Callable[[], torch.Tensor], attn: AttentionMetadata,
                    cache: KVCache, topk: int,
                    quantized: kernels.ActivationLayout | None = None,
                    ) -> torch.Tensor | kernels.QuantizedRows:
    """Writes this step's K/V (and index keys) into the paged cache, then attends: exactly over
    every visible block in dense layers and short contexts, else over the index branch's picks.

    q [T, Hq, D]; k, v [T, Hkv, D]; index_queries() -> q_idx [T, Hkv, Di], only called when
    attention is sparse. Returns [T, Hq, D], or given o_proj's layout
    (`GQAProjections.output_layout`) that output quantized for o_proj where the paged sparse
    kernel runs (the eager dense path, SDPA over gathered pages, hands it as it is)."""
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
        return kernels.sparse_attention(q, k_cache, v_cache, *layout, blocks, **checks,
                                        quantized=quantized)
    blocks = kernels.select_blocks(index_queries(), k_idx_cache, *layout, topk=topk, **checks)
    return kernels.sparse_attention(q, k_cache, v_cache, *layout, blocks, **checks,
                                    quantized=quantized)
