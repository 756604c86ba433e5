"""Chained page hashes: the one definition of "this page's KV can be reused".

The hash of page i covers page i-1's hash, so equal hashes mean equal prefixes. The chain starts
from a salt (the model's fingerprint), and multimodal items mix their content hash into every
page their placeholder tokens occupy, so neither another model nor another image can collide.
The engine's BlockManager and the serving layer's router both call this function.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from worker.wire import BLOCK_SIZE, MultimodalSpan


def chain_page_hashes(token_ids: Sequence[int], salt: str,
                      mm_spans: Sequence[MultimodalSpan] = (),
                      known: Sequence[str] = ()) -> list[str]:
    """Hex digests of every full page of token_ids; `known` leading hashes are reused."""
    hashes = list(known)
    parent = bytes.fromhex(hashes[-1]) if hashes else hashlib.blake2b(
        salt.encode(), digest_size=16).digest()
    for page in range(len(hashes), len(token_ids) // BLOCK_SIZE):
        start, end = page * BLOCK_SIZE, (page + 1) * BLOCK_SIZE
        digest = hashlib.blake2b(parent, digest_size=16)
        digest.update(np.asarray(token_ids[start:end], dtype=np.int64).tobytes())
        for span in mm_spans:
            if span.offset < end and span.offset + span.length > start:
                digest.update(f"{span.offset}:{span.length}:{span.content_hash}".encode())
        parent = digest.digest()
        hashes.append(digest.hexdigest())
    return hashes
