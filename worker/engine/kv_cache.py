"""The paged KV cache of one replica and the per-step metadata that addresses it.

One page = one MSA block = 128 tokens, shared by K, V and the index keys of every layer, so one
page id from the BlockManager names the same slot range in all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import to_index_key_dtype
from worker import parallel
from worker.config import ModelConfig
from worker.engine.host_tier import PageTransfer
from worker.wire import BLOCK_SIZE


@dataclass
class AttentionMetadata:
    """The spec's paged metadata for one mixed step (prefill chunks and decodes packed)."""

    cu_seqlens_q: torch.Tensor  # int32 [B + 1]
    seq_lens: torch.Tensor  # int32 [B], this step's tokens included
    block_table: torch.Tensor  # int32 [B, max_pages]
    slot_mapping: torch.Tensor  # int64 [total_q]: page * 128 + offset of each new token
    max_seq_len: int  # host copy, so layers can pick dense attention without a device sync
    # Set in CUDA-graph decode steps (one query row per sequence): every visible logical block
    # of each row, int32 [rows, max_pages], -1 past the row's last page. Layers that would run
    # dense attention (per-sequence SDPA, which reads lengths on the host and cannot be
    # captured) run the paged sparse kernel over all blocks instead: the same exact attention.
    all_blocks: torch.Tensor | None = None
    # Re-validate indices in every kernel call: for debugging the engine; it costs time (and
    # device syncs on a GPU) on metadata the ModelRunner built itself.
    check_indices: bool = False


def local_kv_heads(config: ModelConfig) -> int:
    """KV heads on this rank (all of them without tensor parallelism)."""
    return parallel.state().kv_heads(config.num_key_value_heads)[1]


def local_index_key_heads(config: ModelConfig) -> int:
    """Index-key heads on this rank: one per KV group are split with the KV heads, one shared
    head is replicated."""
    if config.msa.index_key_heads == 1:
        return 1
    return local_kv_heads(config)


class KVCache:
    """K, V and (for a learned indexer) index-key pages for every layer: this rank's KV heads
    under tensor parallelism, with the same page ids on every rank."""

    def __init__(self, config: ModelConfig, num_pages: int, dtype: torch.dtype,
                 device: torch.device, index_key_dtype: torch.dtype | None = None):
        self.config = config
        self.num_pages = num_pages
        # One page past those the BlockManager hands out: the padding rows of a CUDA-graph
        # batch write their throwaway K/V there.
        self.scratch_page = num_pages
        shape = (config.num_hidden_layers, num_pages + 1, BLOCK_SIZE, local_kv_heads(config),
                 config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.k_idx = None
        if config.msa.indexer == "learned":
            self.k_idx = torch.zeros(config.num_hidden_layers, num_pages + 1, BLOCK_SIZE,
                                     local_index_key_heads(config), config.msa.index_head_dim,
                                     dtype=index_key_dtype or dtype, device=device)

    @staticmethod
    def bytes_per_page(config: ModelConfig, dtype: torch.dtype,
                       index_key_dtype: torch.dtype | None = None) -> int:
        def size(t: torch.dtype) -> int:
            return torch.empty((), dtype=t).element_size()

        per_token = 2 * local_kv_heads(config) * config.head_dim * size(dtype)
        if config.msa.indexer == "learned":
            per_token += (local_index_key_heads(config) * config.msa.index_head_dim
                          * size(index_key_dtype or dtype))
        return config.num_hidden_layers * BLOCK_SIZE * per_token

    def tensors(self) -> list[torch.Tensor]:
        """K, V and the index keys (if stored apart from K), each [layers, pages, ...]."""
        return [self.k, self.v] + ([] if self.k_idx is None else [self.k_idx])

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache, k_idx_cache) of one layer, each [num_pages, 128, H, dim].

        A derived indexer scores with the layer's own keys, so its index cache *is* k_cache.
        """
        k, v = self.k[index], self.v[index]
        return k, v, (k if self.k_idx is None else self.k_idx[index])

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              k_idx: torch.Tensor | None) -> None:
        """Stores this step's new tokens at their slots (page * 128 + offset)."""
        k_cache, v_cache, k_idx_cache = self.layer(layer)
        k_cache.view(-1, *k_cache.shape[2:])[slots] = k.to(k_cache.dtype)
        v_cache.view(-1, *v_cache.shape[2:])[slots] = v.to(v_cache.dtype)
        if k_idx is not None:
            k_idx_cache.view(-1, *k_idx_cache.shape[2:])[slots] = to_index_key_dtype(
                k_idx, k_idx_cache.dtype)


class HostKVCache:
    """The host-memory tier's bytes: slots of whole pages (every layer's K, V and index keys),
    slot-major so that one page is one contiguous block per tensor. Pinned beside a CUDA cache,
    so copies in and out do not block the host (they are ordered on the device's stream)."""

    def __init__(self, device_cache: KVCache, num_slots: int):
        self.device_cache = device_cache
        self.pinned = device_cache.k.device.type == "cuda"
        self.slots = [torch.empty((num_slots, t.shape[0], *t.shape[2:]), dtype=t.dtype,
                                  pin_memory=self.pinned) for t in device_cache.tensors()]

    def apply(self, transfers: list[PageTransfer]) -> None:
        """Executes a step's recorded copies, in their order (`host_tier`)."""
        for transfer in transfers:
            if transfer.to_host:
                self.copy_out(transfer.page, transfer.slot)
            else:
                self.copy_in(transfer.slot, transfer.page)

    def copy_out(self, page: int, slot: int) -> None:
        for host, device in zip(self.slots, self.device_cache.tensors()):
            host[slot].copy_(device[:, page], non_blocking=self.pinned)

    def copy_in(self, slot: int, page: int) -> None:
        for host, device in zip(self.slots, self.device_cache.tensors()):
            device[:, page].copy_(host[slot], non_blocking=self.pinned)

    def settle(self) -> None:
        """Waits for the queued copies: call it before the host reads or writes pages
        directly (`read_slot`, `read_device_page`, `write_slot`)."""
        if self.pinned:
            torch.cuda.current_stream(self.device_cache.k.device).synchronize()

    def read_slot(self, slot: int) -> list[torch.Tensor]:
        return [host[slot].clone() for host in self.slots]

    def read_device_page(self, page: int) -> list[torch.Tensor]:
        return [device[:, page].cpu() for device in self.device_cache.tensors()]

    def slot_layout(self) -> list[tuple[torch.dtype, tuple[int, ...]]]:
        return [(host.dtype, tuple(host.shape[1:])) for host in self.slots]

    def write_slot(self, slot: int, tensors: list[torch.Tensor]) -> None:
        for host, tensor in zip(self.slots, tensors, strict=True):
            host[slot].copy_(tensor)
