"""The dense GQA family (Llama, Mistral, our `msa` type): attention made sparse by MSA with a
learned index branch or one derived from the queries, SwiGLU or mixture-of-experts MLPs.

Parameter names follow the Hugging Face Llama / Qwen3-MoE layout so checkpoints load with a
plain `load_state_dict`; the MSA index branch adds `self_attn.index_q_proj` and
`self_attn.index_k_proj`. Activations are packed: [total_tokens, hidden], no padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worker import parallel
from worker.config import ModelConfig
from worker.engine.kv_cache import AttentionMetadata, KVCache, local_index_key_heads
from worker.errors import ModelLoadError
from worker.layers.attention import GQAProjections, paged_attention
from worker.layers.linear import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    stack_projections,
)
from worker.layers.norms import RMSNorm
from worker.layers.rotary import apply_rope
from worker.models.base import PagedCausalLM
from worker.models.vision import VisionTower


class MSAAttention(GQAProjections):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__(config, layer_index)
        hidden = config.hidden_size
        msa = config.msa
        self.learned_indexer = msa.indexer == "learned"
        if not self.learned_indexer and parallel.state().size > config.num_key_value_heads:
            # A derived index query is the mean of a group's query heads: they must share a rank.
            raise ModelLoadError(f"a derived indexer needs tensor_parallel_size <= "
                                 f"num_key_value_heads ({config.num_key_value_heads})")
        if self.learned_indexer:
            self.index_q_proj = self.per_kv_head(hidden, config.num_key_value_heads
                                                 * msa.index_head_dim)
            # Index keys: one head per KV group (split with them) or one shared head.
            self.index_key_heads = local_index_key_heads(config)
            width = msa.index_key_heads * msa.index_head_dim
            self.index_k_proj = (self.per_kv_head(hidden, width) if msa.index_key_heads > 1
                                 else nn.Linear(hidden, width, bias=False))

    def input_projections(self) -> list[str]:
        return super().input_projections() + (["index_k_proj", "index_q_proj"]
                                              if self.learned_indexer else [])

    def _index_keys(self, index: list[torch.Tensor],
                    positions: torch.Tensor) -> torch.Tensor | None:
        """New index keys [T, H_ik, Di] to cache; None when the index keys are the K cache."""
        if not self.learned_indexer:
            return None
        k_idx = index[0].view(-1, self.index_key_heads, self.config.msa.index_head_dim)
        return self._rope(k_idx, positions)

    def _index_queries(self, index: list[torch.Tensor], q: torch.Tensor,
                       positions: torch.Tensor) -> torch.Tensor:
        """q_idx [T, Hkv, Di]: only computed when attention is actually sparse."""
        if not self.learned_indexer:
            # Derived indexer: a group's mean post-RoPE query scores that group's own keys.
            return q.view(q.shape[0], self.num_kv_heads, -1, self.head_dim).mean(dim=2)
        q_idx = index[1].view(-1, self.num_kv_heads, self.config.msa.index_head_dim)
        return self._rope(q_idx, positions)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return apply_rope(x, positions, self.config.rope_theta, self.config.max_position_embeddings)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                cache: KVCache, topk: int) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v, *index = self.qkv_proj(x)
        q = self._rope(q.view(tokens, self.num_heads, self.head_dim), positions)
        k = self._rope(k.view(tokens, self.num_kv_heads, self.head_dim), positions)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        out = paged_attention(self.layer_index, self.dense, q, k, v,
                              self._index_keys(index, positions),
                              lambda: self._index_queries(index, q, positions), attn, cache,
                              topk, self.output_layout(q))
        return self.output(out)


class MLP(nn.Module):
    """Its output is this rank's partial sum (the decoder layer all-reduces)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = ColumnParallelLinear(hidden, intermediate)
        self.up_proj = ColumnParallelLinear(hidden, intermediate)
        self.down_proj = RowParallelLinear(intermediate, hidden)

    def stack_projections(self) -> None:
        stack_projections(self, ["gate_proj", "up_proj"], into="gate_up_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class MoE(nn.Module):
    """Top-k routed SwiGLU experts (Qwen3-MoE layout: mlp.gate, mlp.experts.N.*)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.normalize = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(config.hidden_size, config.moe_intermediate_size)
                                     for _ in range(config.num_experts))

    def forward(self, x: torch.Tensor, in_cuda_graph: bool = False) -> torch.Tensor:
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [T, k]
        if self.normalize:
            weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        if in_cuda_graph:
            # A graph cannot read which experts were chosen on the host: every expert runs on
            # every token (decode batches are small), weighted by zero where it was not chosen.
            dense_weights = torch.zeros_like(probs).scatter_(1, chosen, weights).to(x.dtype)
            for expert_id, expert in enumerate(self.experts):
                out += expert(x) * dense_weights[:, expert_id, None]
            return out
        # Loop over experts (few) rather than tokens (many): each expert runs on its tokens only.
        for expert_id in chosen.unique().tolist():
            token_ids, slot = (chosen == expert_id).nonzero(as_tuple=True)
            expert_out = self.experts[expert_id](x[token_ids])
            out.index_add_(0, token_ids, expert_out * weights[token_ids, slot, None].to(x.dtype))
        return out


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MSAAttention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = (MoE(config) if config.is_moe_layer(layer_index)
                    else MLP(config.hidden_size, config.intermediate_size))

    def forward(self, x, positions, attn, cache, topk):
        x = x + self.self_attn(self.input_layernorm(x), positions, attn, cache, topk)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            return x + parallel.all_reduce(self.mlp(h, in_cuda_graph=attn.all_blocks is not None))
        return x + parallel.all_reduce(self.mlp(h))


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MSAForCausalLM(PagedCausalLM):
    def __init__(self, config: ModelConfig):
        super().__init__(config, DecoderModel(config),
                         VisionTower(config.vision) if config.vision else None)
