"""The Triton backend of the `kernels` functions (CUDA; CPU under TRITON_INTERPRET=1)."""

from kernels.query_major import sparse_attention
from kernels.reference import dense_attention  # dense layers: the reference (SDPA) path
from kernels.index_scoring import select_blocks

__all__ = ["select_blocks", "sparse_attention", "dense_attention"]
