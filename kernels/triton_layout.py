"""Launch-side helpers shared by the Triton kernels: query tiles, positions, grid sizing."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Scores are scaled by log2(e) so the kernels' softmax runs on exp2.
LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class AttentionShape:
    """The sizes every sparse-attention launcher needs, read off its arguments."""

    total_q: int
    num_heads: int
    head_dim: int
    num_groups: int
    group: int  # query heads per KV head
    topk: int
    scale: float

    @classmethod
    def of(cls, q: torch.Tensor, k_cache: torch.Tensor, blocks: torch.Tensor,
           softmax_scale: float | None) -> "AttentionShape":
        total_q, num_heads, head_dim = q.shape
        num_groups = k_cache.shape[2]
        return cls(total_q, num_heads, head_dim, num_groups, num_heads // num_groups,
                   blocks.shape[2], head_dim ** -0.5 if softmax_scale is None else softmax_scale)


@dataclass
class QueryTiles:
    """Tiles of consecutive query rows that never cross a sequence boundary.

    Built on the device without a host sync (so a decode step can be captured in a CUDA graph):
    the grid is an upper bound on the tile count, and spare tiles are empty (start == end).
    """

    seq: torch.Tensor  # int32 [num_tiles]: the tile's sequence
    start: torch.Tensor  # int32 [num_tiles]: first packed query row
    end: torch.Tensor  # int32 [num_tiles]: one past the last row

    @property
    def num_tiles(self) -> int:
        return self.seq.shape[0]

    @staticmethod
    def rows_for(total_q: int, batch: int, max_rows: int) -> int:
        """Query rows per tile for a step of total_q rows over `batch` sequences."""
        # Shapes are all the host knows: uniform decode (q_len 1..16 everywhere) gets tiles of
        # its q_len; anything longer gets full tiles.
        return min(max_rows, triton.next_power_of_2(triton.cdiv(max(total_q, 1), max(batch, 1))))

    @classmethod
    def build(cls, cu_seqlens_q: torch.Tensor, total_q: int, rows: int) -> "QueryTiles":
        batch = cu_seqlens_q.shape[0] - 1
        if total_q == 0 or batch == 0:
            empty = torch.zeros(0, dtype=torch.int32, device=cu_seqlens_q.device)
            return cls(empty, empty, empty)
        upper = triton.cdiv(total_q, rows) + batch
        cu = cu_seqlens_q.long()
        tiles_per_seq = (cu[1:] - cu[:-1] + rows - 1) // rows
        tiles_end = torch.cumsum(tiles_per_seq, 0)
        index = torch.arange(upper, device=cu.device)
        seq = torch.searchsorted(tiles_end, index, right=True)
        real = seq < batch
        seq = seq.clamp(max=batch - 1)
        start = cu[seq] + (index - (tiles_end[seq] - tiles_per_seq[seq])) * rows
        end = torch.minimum(start + rows, cu[seq + 1])
        start, end = torch.where(real, start, 0), torch.where(real, end, 0)
        return cls(seq.to(torch.int32), start.to(torch.int32), end.to(torch.int32))


def row_sequences(cu_seqlens_q: torch.Tensor, total_q: int) -> torch.Tensor:
    """The sequence of every packed query row (int32 [total_q])."""
    cu = cu_seqlens_q.long()
    return torch.repeat_interleave(torch.arange(cu.shape[0] - 1, device=cu.device),
                                   cu[1:] - cu[:-1], output_size=total_q).to(torch.int32)


def query_positions(seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    total_q: int) -> torch.Tensor:
    """Position of every packed query row: seq_lens[b] - q_len[b] + i (int64 [total_q])."""
    cu = cu_seqlens_q.long()
    first = seq_lens.long() - cu[1:]  # position of row r of sequence b is first[b] + r
    return first[row_sequences(cu_seqlens_q, total_q).long()] + torch.arange(total_q,
                                                                              device=cu.device)


@triton.jit
def sequence_of_row(cu_seqlens_q, row, num_seqs, SEARCH_STEPS: tl.constexpr):
    """The last sequence b with cu_seqlens_q[b] <= row: the one that owns packed row `row`.

    A binary search inside the kernel replaces a per-row metadata tensor (and the handful of
    small launches that would build it on every step). Decode (one row per sequence) is
    answered by one pair of independent loads: the search's chain of dependent ones is a
    few microseconds at the start of every program."""
    lo = tl.minimum(row, num_seqs - 1)
    hit = (tl.load(cu_seqlens_q + lo) <= row) & (row < tl.load(cu_seqlens_q + lo + 1))
    if not hit:
        lo = row * 0  # same type as row
        hi = lo + num_seqs
        for _ in tl.static_range(SEARCH_STEPS):
            mid = (lo + hi) // 2
            right = tl.load(cu_seqlens_q + mid) <= row
            lo = tl.where(right, mid, lo)
            hi = tl.where(right, hi, mid)
    return lo


@triton.jit
def online_softmax_step(s, v, acc, running_max, running_sum, PRECISION: tl.constexpr):
    """Folds one page of log2-scaled scores s [M, PAGE] (-inf where masked) and its values
    v [PAGE, D] into the running (acc, max, sum) of rows that attend page by page."""
    new_max = tl.maximum(running_max, tl.max(s, axis=1))
    # A row that has seen nothing yet keeps a finite reference point (no inf - inf).
    ref = tl.where(new_max == float("-inf"), 0.0, new_max)
    p = tl.exp2(s - ref[:, None])
    alpha = tl.exp2(running_max - ref)
    running_sum = running_sum * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, new_max, running_sum


@triton.jit
def finish_softmax(acc, max_log2, total):
    """(acc / total, natural-log LSE) of rows whose scores were log2(e)-scaled; a row that saw
    no key (total 0) gives 0 and -inf. Shared by both sparse-attention kernels."""
    seen = total > 0
    safe_total = tl.where(seen, total, 1.0)
    lse = tl.where(seen, max_log2 * 0.6931471805599453 + tl.log(safe_total), float("-inf"))
    return acc / safe_total[:, None], lse


def search_steps(num_seqs: int) -> int:
    """Iterations of `sequence_of_row`'s binary search. A constant for any batch below 256
    sequences, so batch sizes changing step to step never trigger a recompilation."""
    return max(8, num_seqs.bit_length())


@functools.lru_cache(maxsize=None)
def multiprocessors(device: torch.device) -> int:
    """The device's SM count (2 under the CPU interpreter, so tests still split work)."""
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs keep full precision (tf32 would cost ~1e-3 relative error).
    return "ieee" if dtype == torch.float32 else "tf32"


# Programmatic dependent launch (Hopper+): the kernels of a decode step's chain (index scan ->
# selection rule -> attention -> merge) are launched so that each one's launch and prologue
# overlap the tail of the one before; each waits for its predecessor's memory before its first
# load and store (any input may be the predecessor's output, and its outputs may reuse memory
# the predecessor reads).
@functools.lru_cache(maxsize=None)
def dependent_launch(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


@triton.jit
def wait_for_previous_kernel(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def release_next_kernel(USE_PDL: tl.constexpr):
    """Lets the next dependent kernel launch: called once a program's heavy work is done."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
