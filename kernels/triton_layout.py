"""Launch-side helpers shared by the Triton kernels: query tiles, positions, grid sizing."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton


@dataclass
class QueryTiles:
    """Tiles of consecutive query rows that never cross a sequence boundary."""

    seq: torch.Tensor  # int32 [num_tiles]: the tile's sequence
    start: torch.Tensor  # int32 [num_tiles]: first packed query row
    end: torch.Tensor  # int32 [num_tiles]: one past the last row
    rows_per_tile: int

    @property
    def num_tiles(self) -> int:
        return self.seq.shape[0]

    @classmethod
    def build(cls, cu_seqlens_q: torch.Tensor, max_rows: int) -> "QueryTiles":
        # One small host copy: the grid size depends on it.
        cu = cu_seqlens_q.tolist()
        q_lens = [b - a for a, b in zip(cu, cu[1:])]
        rows = min(max_rows, triton.next_power_of_2(max(q_lens, default=1)))
        seqs, starts, ends = [], [], []
        for b, (begin, q_len) in enumerate(zip(cu, q_lens)):
            for first in range(begin, begin + q_len, rows):
                seqs.append(b)
                starts.append(first)
                ends.append(min(first + rows, begin + q_len))
        device = cu_seqlens_q.device

        def tensor(values):
            return torch.tensor(values, dtype=torch.int32, device=device)

        return cls(tensor(seqs), tensor(starts), tensor(ends), rows)


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


def target_programs(device: torch.device) -> int:
    """Enough programs to fill the GPU a few times over (few under the CPU interpreter)."""
    if device.type != "cuda":
        return 8
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs keep full precision (tf32 would cost ~1e-3 relative error).
    return "ieee" if dtype == torch.float32 else "tf32"
