"""The shell every served model shares around its family's decoder."""

from __future__ import annotations

import torch
from torch import nn

from worker.config import ModelConfig
from worker.engine.kv_cache import AttentionMetadata, KVCache
from worker.layers.linear import ParallelLMHead


class PagedCausalLM(nn.Module):
    """What every served model is around its decoder: token embeddings, optional image
    embeddings in place of placeholder tokens, the layers over the paged cache, the final norm
    and the LM head. A model family gives its decoder (`embed_tokens`, `layers`, `norm`), its
    vision tower, and what its layers take for positions (`layer_positions`)."""

    def __init__(self, config: ModelConfig, decoder: nn.Module, visual: nn.Module | None):
        super().__init__()
        self.config = config
        self.model = decoder
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size)
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
        return self.lm_head.logits(hidden)
