"""The other ranks of a tensor-parallel replica: Ray actors beside the engine's process.

Rank 0 is the engine's own process (the Serve replica, or an offline `LLMEngine`): it
schedules, owns the block manager and samples. Ranks 1..N-1 are `RankWorker` actors, each with
its slice of the model and its shard of the KV cache. Each step rank 0 broadcasts the step's
inputs once (host tensors, over gloo): the step's page copies to and from the host tier (a list
of `PageTransfer`, when there are any), then `StepInputs` for an eager step, `DecodeInputs` for
a decode step every rank replays from its own CUDA graphs (captured at the same step on every
rank, NCCL calls included). Every rank runs the same forward and the layers' all-reduces join
them; no per-layer call crosses a process boundary. Between steps, a pull from or to a peer
replica sends a `PageRead` or `PageWrite`, and the ranks' shards of those pages are gathered to
or scattered from rank 0.

Inside a Serve replica whose deployment reserved a placement group of N bundles (STRICT_PACK,
one GPU each), the replica holds bundle 0 and the workers take bundles 1..N-1; offline they
are plain actors asking for one GPU (CPU: one core) each.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from worker import parallel
from worker.config import EngineConfig
from worker.errors import EngineDeadError, PageTransferError
from worker.ports import free_port

if TYPE_CHECKING:
    from worker.engine.page_exchange import PageRead, PageWrite

logger = logging.getLogger(__name__)

# A collective that waits longer than this has lost a rank: the step fails instead of hanging.
COLLECTIVE_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class CacheSetup:
    """What rank 0 decides after loading and every rank needs for its cache and graphs."""

    num_pages: int
    index_key_dtype: torch.dtype | None
    topk: int
    max_model_len: int
    host_slots: int  # pages of the host KV tier (0: none)


class RankWorker:
    """Ranks 1..N-1: load this rank's slice, then run every step rank 0 broadcasts until it
    broadcasts None."""

    def __init__(self, config: EngineConfig, rank: int, init_method: str):
        self.config = config
        self.rank = rank
        self.init_method = init_method

    def serve_steps(self) -> int:
        """Returns the number of steps run, once rank 0 closes the group."""
        from worker.engine.cuda_graphs import DecodeGraphs, DecodeInputs, max_graph_batch
        from worker.engine.kv_cache import HostKVCache, KVCache
        from worker.engine.llm_engine import resolve_device_and_dtype
        from worker.engine.model_runner import FedTokens, forward_step
        from worker.engine.page_exchange import PageRead, PageWrite, read_pages, write_pages
        from worker.loader import load_model

        config = self.config
        device, dtype = resolve_device_and_dtype(config)
        parallel.initialize(self.rank, config.tensor_parallel_size, config.expert_parallel,
                            self.init_method, device, COLLECTIVE_TIMEOUT_S)
        try:
            model = load_model(config.model, dtype, device, config.served_model_name,
                               config.load_format, config.mxfp8_mode).model
            setup: CacheSetup = parallel.broadcast_from_rank0()
            cache = KVCache(model.config, setup.num_pages, dtype, device, setup.index_key_dtype)
            host_cache = HostKVCache(cache, setup.host_slots) if setup.host_slots else None
            graphs = None
            steps = 0
            with torch.inference_mode():
                while (inputs := parallel.broadcast_from_rank0()) is not None:
                    if isinstance(inputs, PageRead):  # a peer replica pulls these pages
                        parallel.gather_to_rank0(self._shards(read_pages, host_cache,
                                                              inputs.locations))
                        continue
                    if isinstance(inputs, PageWrite):  # pages pulled from a peer replica
                        shards = parallel.scatter_from_rank0()
                        written = self._shards(write_pages, host_cache, inputs.slots, shards)
                        parallel.gather_to_rank0(written is not None)
                        continue
                    try:
                        if isinstance(inputs, list):  # page copies to and from the host tier
                            host_cache.apply(inputs)
                            continue
                        fed = FedTokens.receive(inputs.fed_rows, device)
                        if isinstance(inputs, DecodeInputs):
                            graphs = graphs or DecodeGraphs(
                                model, cache, setup.topk, max_graph_batch(config),
                                setup.max_model_len, capture=device.type == "cuda")
                            graphs.replay(inputs, fed)
                        else:
                            forward_step(model, cache, inputs, config.topk, config.debug_checks,
                                         fed=fed)
                    except Exception:  # rank 0 raised on the same inputs and reports it
                        logger.exception("rank %d: step failed", self.rank)
                    steps += 1
            return steps
        finally:
            parallel.shutdown()

    def _shards(self, move, *args):
        """`move(*args)` for a page exchange, or None when it failed here: rank 0 gives the
        pull up (the puller recomputes the pages) and this rank stays in step."""
        try:
            return move(*args)
        except Exception:
            logger.exception("rank %d: page exchange failed", self.rank)
            return None


class RankWorkers:
    """Rank 0's handle on ranks 1..N-1: starts them, sends each step, notices one dying."""

    def __init__(self, config: EngineConfig, device: torch.device):
        """device: rank 0's, as the engine resolved it; each other rank takes one alike."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not ray.is_initialized():
            ray.init(log_to_driver=False, configure_logging=False)
        size = config.tensor_parallel_size
        rendezvous_port = free_port(host="")  # every address: the ranks may run on other nodes
        init_method = f"tcp://{ray.util.get_node_ip_address()}:{rendezvous_port}"
        group = ray.util.get_current_placement_group()
        on_gpu = device.type == "cuda"
        actor = ray.remote(RankWorker)
        # Named after the actor that owns them (a Serve replica), so operators can find them.
        owner = ray.get_runtime_context().get_actor_id()
        self.ranks = []
        for rank in range(1, size):
            options = {"num_gpus": 1 if on_gpu else 0, "num_cpus": 1}
            if owner is not None:
                options["name"] = rank_worker_name(owner, rank)
            if group is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    group, placement_group_bundle_index=rank)
            self.ranks.append(actor.options(**options).remote(config, rank, init_method))
        self.done = [worker.serve_steps.remote() for worker in self.ranks]
        parallel.initialize(0, size, config.expert_parallel, init_method, device,
                            COLLECTIVE_TIMEOUT_S)
        self.closed = False

    def start_caches(self, setup: CacheSetup) -> None:
        """Rank 0 sized the KV cache (the ranks' devices are alike): the others follow."""
        parallel.broadcast_from_rank0(setup)

    def send(self, inputs) -> None:
        parallel.broadcast_from_rank0(inputs)

    def read_pages(self, request: PageRead) -> list[list[list[torch.Tensor]]]:
        """Ranks 1..N-1's tensors of the pages of a `PageRead`, each rank's a list per page."""
        self.send(request)
        shards = parallel.gather_to_rank0(None)[1:]
        if any(shard is None for shard in shards):
            raise PageTransferError("a tensor-parallel rank of the holder could not read its "
                                    "shard of the pages (its log says why)")
        return shards

    def write_pages(self, request: PageWrite,
                    shards: list[list[list[torch.Tensor]]]) -> None:
        """Hands ranks 1..N-1 their tensors of each page of a `PageWrite`, in rank order."""
        self.send(request)
        parallel.scatter_from_rank0([None, *shards])
        if not all(parallel.gather_to_rank0(True)[1:]):
            raise PageTransferError("a tensor-parallel rank could not store its shard of the "
                                    "pulled pages (its log says why)")

    def stopped_rank(self) -> tuple[int, str] | None:
        """(rank, why) of a rank that has stopped (its actor died or its loop failed), or None."""
        import ray

        stopped, _ = ray.wait(self.done, num_returns=1, timeout=0)
        if not stopped:
            return None
        try:
            ray.get(stopped[0])
            reason = "it left the group"
        except Exception as exc:  # the actor's death or its loop's error, as Ray reports it
            reason = str(exc).strip().splitlines()[0]
        return self.done.index(stopped[0]) + 1, reason

    def check_alive(self) -> None:
        """Raises EngineDeadError when a rank has stopped: the replica cannot step any more."""
        stopped = None if self.closed else self.stopped_rank()
        if stopped is not None:
            raise EngineDeadError(f"rank {stopped[0]} of this replica's tensor-parallel group "
                                  f"stopped: {stopped[1]}")

    def close(self, graceful: bool = True) -> None:
        """Ends the workers' loops and the group; idempotent. Not graceful (rank 0 failed
        mid-start, so the ranks may be anywhere but in the step loop): kill them outright."""
        import ray

        if self.closed:
            return
        self.closed = True
        try:
            # A broadcast to a rank that is dead, or not listening, would wait for it.
            if graceful and self.stopped_rank() is None:
                self.send(None)
                ray.get(self.done, timeout=30)
        except Exception:  # a rank already gone: nothing left to stop cleanly
            logger.warning("tensor-parallel ranks did not stop cleanly", exc_info=True)
        finally:
            for worker in self.ranks:
                ray.kill(worker)
            parallel.shutdown()


def rank_worker_name(owner_actor_id: str, rank: int) -> str:
    return f"msa-rank{rank}-of-{owner_actor_id}"
