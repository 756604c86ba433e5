"""The decoder: GQA attention made sparse by MSA, SwiGLU or mixture-of-experts MLPs.

Parameter names follow the Hugging Face Llama / Qwen3-MoE layout so checkpoints load with a
plain `load_state_dict`; the MSA index branch adds `self_attn.index_q_proj` and
`self_attn.index_k_proj`. Activations are packed: [total_tokens, hidden], no padding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from worker.config import ModelConfig
from worker.kv_cache import AttentionMetadata, KVCache
from worker.vision import VisionTower


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim, in fp32 (the norms differ only in how they scale it)."""
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * rms_normalize(x, self.eps).to(x.dtype)


@functools.lru_cache(maxsize=8)
def rope_tables(dim: int, theta: float, max_positions: int, device: torch.device):
    """(cos, sin) [max_positions, dim / 2] float32, computed once per shape and device."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float,
               max_positions: int) -> torch.Tensor:
    """Half-split ("rotate_half") RoPE, the Hugging Face Llama convention; x [T, heads, dim]."""
    cos, sin = rope_tables(x.shape[-1], theta, max_positions, x.device)
    cos, sin = cos[positions][:, None, :], sin[positions][:, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class MSAAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.config = config
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dense = config.is_dense_attention_layer(layer_index)
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        msa = config.msa
        self.learned_indexer = msa.indexer == "learned"
        if self.learned_indexer:
            self.index_q_proj = nn.Linear(hidden, self.num_kv_heads * msa.index_head_dim, bias=False)
            self.index_k_proj = nn.Linear(hidden, msa.index_key_heads * msa.index_head_dim,
                                          bias=False)

    def _index_keys(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """New index keys [T, H_ik, Di] to cache; None when the index keys are the K cache."""
        if not self.learned_indexer:
            return None
        msa = self.config.msa
        k_idx = self.index_k_proj(x).view(-1, msa.index_key_heads, msa.index_head_dim)
        return self._rope(k_idx, positions)

    def _index_queries(self, x: torch.Tensor, q: torch.Tensor,
                       positions: torch.Tensor) -> torch.Tensor:
        """q_idx [T, Hkv, Di]: only computed when attention is actually sparse."""
        if not self.learned_indexer:
            # Derived indexer: a group's mean post-RoPE query scores that group's own keys.
            return q.view(q.shape[0], self.num_kv_heads, -1, self.head_dim).mean(dim=2)
        q_idx = self.index_q_proj(x).view(-1, self.num_kv_heads, self.config.msa.index_head_dim)
        return self._rope(q_idx, positions)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return apply_rope(x, positions, self.config.rope_theta, self.config.max_position_embeddings)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                cache: KVCache, topk: int) -> torch.Tensor:
        tokens = x.shape[0]
        q = self._rope(self.q_proj(x).view(tokens, self.num_heads, self.head_dim), positions)
        k = self._rope(self.k_proj(x).view(tokens, self.num_kv_heads, self.head_dim), positions)
        v = self.v_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        out = paged_attention(self.layer_index, self.dense, q, k, v,
                              self._index_keys(x, positions),
                              lambda: self._index_queries(x, q, positions), attn, cache, topk)
        return self.o_proj(out.reshape(tokens, self.num_heads * self.head_dim))


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


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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
            return x + self.mlp(h, in_cuda_graph=attn.all_blocks is not None)
        return x + self.mlp(h)


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class PagedCausalLM(nn.Module):
    """What every served model is around its decoder: token embeddings, optional image
    embeddings in place of placeholder tokens, the layers over the paged cache, the final norm
    and the LM head. A model family gives its decoder (`embed_tokens`, `layers`, `norm`), its
    vision tower, and what its layers take for positions (`layer_positions`)."""

    def __init__(self, config: ModelConfig, decoder: nn.Module, visual: nn.Module | None):
        super().__init__()
        self.config = config
        self.model = decoder
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.visual = visual

    def layer_positions(self, positions: torch.Tensor):
        return positions

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                cache: KVCache, topk: int | None = None,
                mm_embeds: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Hidden states [T, hidden] of the packed tokens; writes their K/V into the cache.

        mm_embeds: (packed rows, embeddings) that replace those rows' token embeddings (the
        placeholder tokens of images and videos)."""
        topk = self.config.msa.topk if topk is None else topk
        layer_positions = self.layer_positions(positions)
        x = self.model.embed_tokens(input_ids)
        if mm_embeds is not None:
            rows, embeds = mm_embeds
            x = x.index_put((rows,), embeds.to(x.dtype))
        for layer in self.model.layers:
            x = layer(x, layer_positions, attn, cache, topk)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


class MSAForCausalLM(PagedCausalLM):
    def __init__(self, config: ModelConfig):
        super().__init__(config, DecoderModel(config),
                         VisionTower(config.vision) if config.vision else None)
