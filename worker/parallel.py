"""Tensor and expert parallelism: which slice of the model this process holds, and the
collectives that join the slices.

One model replica spans `tensor_parallel_size` processes (ranks), one per GPU (or CPU process
with gloo). Every rank runs every layer on every token of the step: attention heads, MLP columns
and the vocabulary are split across ranks (Megatron-style), and with expert parallelism each
rank holds whole experts instead of a slice of every expert. Rank 0 schedules and samples;
`worker.engine.rank_workers` runs the others.

The state is per process (as the default torch.distributed group is): layers read it when they
are built, so a model built outside `initialize` is the whole, single-process model.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from worker.errors import ModelLoadError


@dataclass(frozen=True)
class ParallelState:
    rank: int = 0
    size: int = 1
    expert_parallel: bool = False

    def part(self, count: int, what: str) -> tuple[int, int]:
        """(start, length) of this rank's equal share of `count` things."""
        if count % self.size:
            raise ModelLoadError(f"{what} ({count}) does not divide among "
                                 f"tensor_parallel_size {self.size} ranks")
        length = count // self.size
        return self.rank * length, length

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """(first KV head, KV heads) this rank holds. Up to num_kv_heads ranks split them;
        beyond that each rank holds the one KV head its query heads read (replicated)."""
        if self.size <= num_kv_heads:
            return self.part(num_kv_heads, "num_key_value_heads")
        if self.size % num_kv_heads:
            raise ModelLoadError(f"tensor_parallel_size {self.size} must divide or be a multiple "
                                 f"of num_key_value_heads ({num_kv_heads})")
        return self.rank * num_kv_heads // self.size, 1


_state = ParallelState()
_metadata_group: dist.ProcessGroup | None = None


def state() -> ParallelState:
    return _state


def initialize(rank: int, size: int, expert_parallel: bool, init_method: str,
               device: torch.device, timeout_s: float) -> None:
    """Joins this process to its replica's group: NCCL between GPUs (gloo on CPU) for the
    model's collectives, plus a gloo group for the step metadata rank 0 broadcasts."""
    global _state, _metadata_group
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    _metadata_group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    _state = ParallelState(rank, size, expert_parallel)


def shutdown() -> None:
    global _state, _metadata_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _state, _metadata_group = ParallelState(), None


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sums the ranks' partial results (after a row-parallel projection)."""
    if _state.size > 1:
        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenates the ranks' column slices (the LM head's vocabulary shards)."""
    if _state.size == 1:
        return x
    pieces = [torch.empty_like(x) for _ in range(_state.size)]
    dist.all_gather(pieces, x.contiguous())
    return torch.cat(pieces, dim=-1)


def broadcast_tensor(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's `x` into every rank's `x` (same shape and dtype), over the model's group: on
    GPUs an NCCL broadcast queued on the device, which the host does not wait for."""
    dist.broadcast(x, src=0)
    return x


def broadcast_from_rank0(payload: object = None) -> object:
    """Rank 0 sends `payload` (any picklable object: CPU tensors travel whole); the other ranks
    pass nothing and get it."""
    box = [payload]
    dist.broadcast_object_list(box, src=0, group=_metadata_group)
    return box[0]


def gather_to_rank0(payload: object) -> list | None:
    """Every rank's `payload` (picklable), in rank order, on rank 0; None on the others."""
    gathered = [None] * _state.size if _state.rank == 0 else None
    dist.gather_object(payload, gathered, dst=0, group=_metadata_group)
    return gathered


def scatter_from_rank0(payloads: list | None = None) -> object:
    """Rank r gets `payloads[r]` (rank 0 passes one per rank, the others nothing)."""
    box = [None]
    dist.scatter_object_list(box, payloads, src=0, group=_metadata_group)
    return box[0]


@dataclass(frozen=True)
class ShardSpec:
    """How a checkpoint tensor becomes this rank's piece of a parameter: along parameter dim
    `dim`, the checkpoint's extent splits into `parts` equal pieces and this rank holds piece
    `part`; `experts` (dim 0 indexes experts) says this rank holds experts
    [expert_start, expert_start + the parameter's dim 0)."""

    dim: int | None = None
    parts: int = 1
    part: int = 0
    expert_start: int | None = None

    def localize(self, index: tuple, tensor: torch.Tensor, param_shape: torch.Size
                 ) -> tuple[tuple, torch.Tensor] | None:
        """(index into the local parameter, the tensor's piece), or None when the tensor
        belongs to another rank's experts. `index` addresses the whole parameter: ints pick
        along leading dims (removing them from the tensor), slices keep them (fused tensors,
        such as w1 over w3, are equal segments each split the same way)."""
        index = list(index)
        if self.expert_start is not None and index:
            local = index[0] - self.expert_start
            if not 0 <= local < param_shape[0]:
                return None
            index[0] = local
        if self.dim is None or self.parts == 1:
            return tuple(index), tensor
        tensor_dim = self.dim - sum(isinstance(i, int) for i in index[: self.dim])
        if self.dim < len(index):  # a segment of a fused dimension
            segment = index[self.dim]
            width = (segment.stop - segment.start) // self.parts
            index[self.dim] = slice(segment.start // self.parts,
                                    segment.start // self.parts + width)
        else:
            width = tensor.shape[tensor_dim] // self.parts
        return tuple(index), tensor.narrow(tensor_dim, self.part * width, width)


def set_shard(module: torch.nn.Module, param_name: str, spec: ShardSpec) -> None:
    """Records how `module.<param_name>` is sharded (on the module: parameters are replaced
    when a model built on the meta device is materialised)."""
    if spec.parts > 1 or spec.expert_start is not None:
        module.__dict__.setdefault("shard_specs", {})[param_name] = spec


def shard_specs(model: torch.nn.Module) -> dict[str, ShardSpec]:
    """Every sharded parameter of `model` by its full name."""
    return {f"{prefix}.{name}" if prefix else name: spec
            for prefix, module in model.named_modules()
            for name, spec in module.__dict__.get("shard_specs", {}).items()}
