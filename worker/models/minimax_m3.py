"""MiniMax-M3's text model on the paged MSA cache (transformers' `minimax_m3_vl` is the reference).

What sets it apart from the Llama-shaped decoder in `worker/model.py`:
- Gemma-style RMSNorm everywhere (`x * (1 + w)`, in fp32), also per head on q and k;
- partial RoPE: only the first `rotary_dim` channels of a head rotate;
- the lightning indexer on `minimax_m3_sparse` layers: one index query head per KV group and
  one shared index key head, each with its own RMSNorm and the same partial RoPE;
- SwiGLU-OAI MLPs (`(clamp(up) + 1) * gate * sigmoid(alpha * gate)`, clamps at `swiglu_limit`),
  dense on some layers, mixture of experts on the others: a sigmoid router whose correction
  bias only chooses, the chosen weights renormalised and scaled, plus a shared expert.

Parameter names are the released checkpoint's, without its `language_model.` prefix; the
routed experts are stacked per layer (`w13` [E, 2I, H] = w1 over w3, `w2` [E, H, I]), filled
from the checkpoint's per-expert tensors by `checkpoint_target`, and run by
`kernels.routed_experts` (grouped GEMMs on CUDA).
"""

from __future__ import annotations

import re

import torch
from torch import nn

import kernels
from kernels import reference
from worker import parallel
from worker.config import ModelConfig
from worker.engine.kv_cache import AttentionMetadata, KVCache
from worker.layers import fp8
from worker.layers.attention import GQAProjections, paged_attention
from worker.layers.fused import fused
from worker.layers.linear import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    stack_projections,
)
from worker.layers.norms import GemmaRMSNorm, gemma_rms_norm
from worker.layers.rotary import apply_partial_rope, rotary_tables
from worker.models.base import PagedCausalLM
from worker.models.minimax_m3_vision import M3VisionTower
from worker.parallel import ShardSpec, set_shard

# The vision tower's and projectors' tensors (loaded into `visual`), and the multi-token
# prediction head, which serving does not use (transformers skips it too).
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "patch_merge_mlp.")
SKIPPED_PREFIXES = ("mtp.",)
_EXPERT_RE = re.compile(
    r"(model\.layers\.\d+\.block_sparse_moe)\.experts\.(\d+)\.w([123])\.weight(_scale_inv)?")


@fused
def norm_and_rotate(heads: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor,
                    sin: torch.Tensor) -> torch.Tensor:
    """A per-head Gemma RMSNorm, then partial RoPE: one kernel on CUDA."""
    return apply_partial_rope(gemma_rms_norm(heads, weight, eps), cos, sin)


class M3Attention(GQAProjections):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__(config, layer_index)
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.q_norm = GemmaRMSNorm(self.head_dim, eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, eps)
        if not self.dense:  # the lightning indexer exists on MSA layers only
            index_dim = config.msa.index_head_dim
            # One index query head per KV group (split with them), one shared key head.
            self.index_q_proj = self.per_kv_head(hidden, config.num_key_value_heads * index_dim)
            self.index_k_proj = ColumnParallelLinear(hidden, index_dim, parts=1, part=0)
            self.index_q_norm = GemmaRMSNorm(index_dim, eps)
            self.index_k_norm = GemmaRMSNorm(index_dim, eps)

    def input_projections(self) -> list[str]:
        return super().input_projections() + ([] if self.dense
                                              else ["index_k_proj", "index_q_proj"])

    @staticmethod
    def _heads(projected: torch.Tensor, norm: GemmaRMSNorm,
               rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """A projection's output split into heads, normed per head, then partially rotated."""
        heads = projected.view(projected.shape[0], -1, norm.weight.shape[0])
        return norm_and_rotate(heads, norm.weight, norm.eps, *rope)

    def forward(self, x: torch.Tensor | kernels.QuantizedRows,
                rope: tuple[torch.Tensor, torch.Tensor], attn: AttentionMetadata, cache: KVCache,
                topk: int) -> torch.Tensor:
        q, k, v, *index = self.qkv_proj(x)
        q = self._heads(q, self.q_norm, rope)
        k = self._heads(k, self.k_norm, rope)
        v = v.view(v.shape[0], self.num_kv_heads, self.head_dim)
        k_idx = None if self.dense else self._heads(index[0], self.index_k_norm, rope)
        out = paged_attention(
            self.layer_index, self.dense, q, k, v, k_idx,
            lambda: self._heads(index[1], self.index_q_norm, rope), attn, cache, topk,
            self.output_layout(q))
        return self.output(out)


swiglu_oai = fused(reference.swiglu_oai)


@fused
def swiglu_oai_stacked(projected: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """swiglu_oai of a stacked projection [.., 2I]: the gate's columns over the up's."""
    gate, up = projected.chunk(2, dim=-1)
    return swiglu_oai(gate, up, alpha, limit)


@fused
def sigmoid_route(logits: torch.Tensor, correction_bias: torch.Tensor,
                  top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] fp32, experts [T, k]): sigmoid scores; the correction bias only decides
    which experts, and the chosen scores are renormalised."""
    scores = torch.sigmoid(logits.float())
    _, chosen = torch.topk(scores + correction_bias.float(), top_k, dim=-1, sorted=False)
    weights = scores.gather(1, chosen)
    return weights / weights.sum(dim=-1, keepdim=True), chosen


class M3DenseMLP(nn.Module):
    """Its output is this rank's partial sum (the decoder layer all-reduces)."""

    def __init__(self, config: ModelConfig, intermediate: int):
        super().__init__()
        self.alpha, self.limit = config.m3.swiglu_alpha, config.m3.swiglu_limit
        self.gate_proj = ColumnParallelLinear(config.hidden_size, intermediate)
        self.up_proj = ColumnParallelLinear(config.hidden_size, intermediate)
        self.down_proj = RowParallelLinear(intermediate, config.hidden_size)

    def stack_projections(self) -> None:
        stack_projections(self, ["gate_proj", "up_proj"], into="gate_up_proj")

    def forward(self, x: torch.Tensor | kernels.QuantizedRows) -> torch.Tensor:
        gate, up = self.gate_up_proj(x)
        # With an FP8 down_proj the activation hands it x quantized, in the activation's kernel.
        layout = self.down_proj.input_layout(gate)
        if layout is None:
            return self.down_proj(swiglu_oai(gate, up, self.alpha, self.limit))
        return self.down_proj(kernels.swiglu_oai_quantized(gate, up, self.alpha, self.limit,
                                                           layout))


class M3MoE(nn.Module):
    """Sigmoid-routed experts plus a shared expert (`block_sparse_moe` in the checkpoint).

    Across ranks the router is replicated and every rank sees every token; the experts are
    either sliced (tensor parallel: each rank holds 1/N of every expert's intermediate width)
    or dealt out whole (expert parallel: each rank holds 1/N of the experts and runs only the
    choices that fall on them). Either way the output is a partial sum, all-reduced once with
    the shared expert's by the decoder layer."""

    fp8_weights = {"w13": 2, "w2": 1}  # w13 stacks w1 over w3

    def __init__(self, config: ModelConfig):
        super().__init__()
        m3 = config.m3
        self.top_k = config.num_experts_per_tok
        self.scaling = m3.routed_scaling_factor
        self.alpha, self.limit = m3.swiglu_alpha, m3.swiglu_limit
        experts, hidden, inter = config.num_experts, config.hidden_size, config.intermediate_size
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(experts), requires_grad=False)
        state = parallel.state()
        self.expert_start = 0
        if state.expert_parallel:
            self.expert_start, experts = state.part(experts, "num_experts")
            w13_spec = w2_spec = ShardSpec(expert_start=self.expert_start)
        else:
            _, inter = state.part(inter, "the experts' intermediate_size")
            w13_spec = ShardSpec(dim=1, parts=state.size, part=state.rank)
            w2_spec = ShardSpec(dim=2, parts=state.size, part=state.rank)
        self.w13 = nn.Parameter(torch.empty(experts, 2 * inter, hidden))
        self.w2 = nn.Parameter(torch.empty(experts, hidden, inter))
        set_shard(self, "w13", w13_spec)
        set_shard(self, "w2", w2_spec)
        self.shared_experts = M3DenseMLP(config, m3.shared_intermediate_size)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sigmoid_route(self.gate(x.to(self.gate.weight.dtype)),
                             self.e_score_correction_bias, self.top_k)

    def activation(self, projected: torch.Tensor) -> torch.Tensor:
        return swiglu_oai_stacked(projected, self.alpha, self.limit)  # w13: w1 (gate) over w3

    def forward(self, x: torch.Tensor,
                shared_x: kernels.QuantizedRows | None = None) -> torch.Tensor:
        """`shared_x`: x quantized for an FP8 shared expert by the norm before (else it takes
        x, as the router and the routed experts do)."""
        weights, chosen = self.route(x)
        if parallel.state().expert_parallel:
            # Choices of other ranks' experts become the id one past ours: the kernels skip it.
            num_local = self.w13.shape[0]
            chosen = chosen - self.expert_start
            chosen = torch.where((chosen >= 0) & (chosen < num_local), chosen, num_local)
        # Grouped GEMMs on CUDA (graph-safe: the layout needs no host sync); on CPU the
        # reference runs each chosen expert once on its tokens.
        routed = kernels.routed_experts(x, self.w13, self.w2, weights, chosen, self.activation,
                                        fp8.scales(self, "w13"), fp8.scales(self, "w2"))
        shared = self.shared_experts(x if shared_x is None else shared_x)
        return torch.add(shared, routed, alpha=self.scaling)


class M3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.self_attn = M3Attention(config, layer_index)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        if config.is_moe_layer(layer_index):
            self.block_sparse_moe = M3MoE(config)
        else:
            self.mlp = M3DenseMLP(config, config.m3.dense_intermediate_size)

    def forward(self, x, rope, attn: AttentionMetadata, cache: KVCache, topk: int):
        # With FP8 q/k/v (and dense MLP) weights the norms hand their projections x quantized
        # (`GemmaRMSNorm.forward`).
        normed = self.input_layernorm(x, self.self_attn.qkv_proj.input_layout(x))
        x = x + self.self_attn(normed, rope, attn, cache, topk)
        return x + parallel.all_reduce(self._mlp(x))

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "block_sparse_moe"):
            layout = self.mlp.gate_up_proj.input_layout(x)
            return self.mlp(self.post_attention_layernorm(x, layout))
        # The router and the routed experts take the normed x as it is; an FP8 shared expert
        # takes it quantized too, from the norm's kernel.
        moe = self.block_sparse_moe
        layout = moe.shared_experts.gate_up_proj.input_layout(x)
        if layout is None:
            return moe(self.post_attention_layernorm(x))
        return moe(*self.post_attention_layernorm.normed_and_quantized(x, layout))


class M3TextModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(M3DecoderLayer(config, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)


class MiniMaxM3ForCausalLM(PagedCausalLM):
    """Its layers take the (cos, sin) tables of the positions, computed once per step."""

    def __init__(self, config: ModelConfig):
        super().__init__(config, M3TextModel(config),
                         M3VisionTower(config.vision) if config.vision else None)

    def layer_positions(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary_tables(positions, self.config.m3.rotary_dim, self.config.rope_theta)

    def checkpoint_target(self, name: str) -> tuple[str, tuple] | None:
        """Where a released-checkpoint tensor goes: (parameter name, index into it), or None for
        tensors this model does not use."""
        name = name.removeprefix("language_model.")
        if name.startswith(SKIPPED_PREFIXES):
            return None
        if name.startswith(VISION_PREFIXES):
            return (f"visual.{name}", ()) if self.visual is not None else None
        expert = _EXPERT_RE.fullmatch(name)
        if expert is None:
            return name, ()
        moe, index, which = expert.group(1), int(expert.group(2)), expert.group(3)
        suffix = expert.group(4) or ""  # FP8 checkpoints: the block scales beside the weight
        if which == "2":
            return f"{moe}.w2{suffix}", (index,)
        # w1's rows, then w3's (of the scales: one row per block_n weight rows).
        inter = self.config.intermediate_size
        if suffix:
            inter //= self.config.fp8.block_n
        rows = slice(0, inter) if which == "1" else slice(inter, 2 * inter)
        return f"{moe}.w13{suffix}", (index, rows)
