"""Images and videos inside prompts: the items a sequence carries and their embeddings.

An item occupies a span of placeholder tokens; the vision tower's output replaces those
tokens' embeddings. Items are encoded when a prefill chunk first reaches their span (a prefix
cache hit past the span skips the tower entirely) and kept, by content hash, in a small LRU so
the same image in later requests (or in later chunks of one long video) is encoded once.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from worker.errors import InvalidRequestError
from worker.models.minimax_m3_vision import M3VisionTower
from worker.models.vision import VisionTower
from worker.wire import MultimodalInput

# Either tower takes (pixel_values, grid_thw) and carries its VisionConfig as `.config`.
AnyVisionTower = VisionTower | M3VisionTower


def validate_inputs(items: tuple[MultimodalInput, ...], token_ids: list[int],
                    tower: AnyVisionTower | None, model_name: str) -> None:
    """Placeholders and pixels agree, or the request is refused (before it touches the cache)."""
    if not items:
        return
    if tower is None:
        raise InvalidRequestError(f"{model_name} has no vision tower; send text only")
    config = tower.config
    placeholders = config.placeholder_token_ids
    merge = config.spatial_merge_size
    for item in items:
        t, h, w = item.grid_thw
        if min(t, h, w) < 1 or h % merge or w % merge:
            raise InvalidRequestError(f"grid {item.grid_thw} is not whole {merge}x{merge} windows")
        if tuple(item.pixel_values.shape) != (t * h * w, config.patch_dim):
            raise InvalidRequestError(
                f"pixel_values of shape {tuple(item.pixel_values.shape)} do not match grid "
                f"{item.grid_thw} (expected [{t * h * w}, {config.patch_dim}])")
        if not item.spans or item.num_tokens != t * h * w // merge ** 2:
            raise InvalidRequestError(f"an item of grid {item.grid_thw} fills "
                                      f"{t * h * w // merge ** 2} tokens, not {item.num_tokens}")
    covered = 0
    end = 0
    for span in sorted((s for i in items for s in i.spans), key=lambda s: s.offset):
        if span.length < 1 or span.offset < end or span.offset + span.length > len(token_ids):
            raise InvalidRequestError("multimodal spans are empty, overlap or run past the prompt")
        tokens = set(token_ids[span.offset:span.offset + span.length])
        if len(tokens) != 1 or tokens.pop() not in placeholders:
            raise InvalidRequestError("a multimodal span must cover placeholder tokens only")
        end = span.offset + span.length
        covered += span.length
    if sum(token_ids.count(p) for p in placeholders) != covered:
        raise InvalidRequestError("the prompt has placeholder tokens that no image or video fills")


class VisionEncoder:
    """The model's vision tower behind an LRU of item embeddings keyed by content hash."""

    def __init__(self, tower: AnyVisionTower, cache_bytes: int = 256 * 2**20):
        self.tower = tower
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cached_bytes = 0
        self.items_encoded = 0  # tower runs (cache misses), for tests and stats

    @torch.inference_mode()
    def embeddings(self, item: MultimodalInput) -> torch.Tensor:
        key = item.content_hash
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        device = next(self.tower.parameters()).device
        pixels = torch.as_tensor(item.pixel_values).to(device)
        out = self.tower(pixels, item.grid_thw)
        self.items_encoded += 1
        size = out.numel() * out.element_size()
        if size <= self.cache_bytes:
            self._cache[key] = out
            self._cached_bytes += size
            while self._cached_bytes > self.cache_bytes:
                _, evicted = self._cache.popitem(last=False)
                self._cached_bytes -= evicted.numel() * evicted.element_size()
        return out

    def for_chunk(self, items: tuple[MultimodalInput, ...], start: int, end: int,
                  first_row: int) -> tuple[list[int], list[torch.Tensor]]:
        """(packed rows, their embeddings) for the placeholder tokens in [start, end) of a
        sequence whose token `start` sits at packed row `first_row`."""
        rows, embeds = [], []
        for item in items:
            item_row = 0  # the item's embedding rows fill its spans in order
            for span in item.spans:
                lo = max(start, span.offset)
                hi = min(end, span.offset + span.length)
                if lo < hi:
                    rows.extend(range(first_row + lo - start, first_row + hi - start))
                    first = item_row + lo - span.offset
                    embeds.append(self.embeddings(item)[first:first + hi - lo])
                item_row += span.length
        return rows, embeds
