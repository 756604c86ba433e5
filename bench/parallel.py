"""MiniMax-M3 split across GPUs: decode and prefill step times under tensor parallel 1/2/4 and
expert parallel, the collectives' share of a step, and FP8 against bf16 weights (the FP8 GEMMs
alone: bench/fp8_tiles.py).

The model is M3 at full width with fewer layers (random weights, `load_format: dummy`, the
layers of `bench/engine_m3.py`): layer 0 dense attention with its dense MLP, then MSA layers
with the 128-expert MoE. Each configuration runs one process per GPU (torch.multiprocessing,
NCCL): the forward the engine's rank workers run, without Ray. Decode steps are the engine's
CUDA-graph decode (`DecodeGraphs`, NCCL all-reduces captured in the graph); their GPU time is
timed with CUDA events over graph replays. "Without collectives" captures the same step with
the all-reduces and the vocabulary all-gather skipped: the difference is the collectives'
share. Contexts share a pool of KV pages (rows read different pages, each as many bytes as a
private context), so 64 x 128K fits beside the weights. Prefill: one 128K prompt in 16K-token
chunks, eager.

Usage (CUDA): python bench/parallel.py [--gpus 2] [--moe-layers 2] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import kernels  # noqa: E402
from bench.common import markdown_table, write_results  # noqa: E402
from bench.engine_m3 import write_config  # noqa: E402
from worker import parallel  # noqa: E402
from worker.engine.cuda_graphs import DecodeGraphs  # noqa: E402
from worker.engine.kv_cache import KVCache  # noqa: E402
from worker.engine.model_runner import StepInputs, forward_step  # noqa: E402
from worker.engine.scheduler import ScheduledBatch  # noqa: E402
from worker.engine.sequence import Sequence  # noqa: E402
from worker.loader import load_model  # noqa: E402
from worker.wire import SamplingParams  # noqa: E402

BLOCK = kernels.BLOCK_SIZE
DECODE_SHAPES = ((8, 32768), (8, 131072), (64, 32768), (64, 131072))  # (requests, context)
PREFILL_TOKENS, PREFILL_CHUNK = 131072, 16384
POOL_PAGES = 2048  # shared by every decode row: 256K tokens per layer
REPLAYS = 20
FP8_BLOCK = {"quant_method": "fp8", "fmt": "float8_e4m3fn", "weight_block_size": [128, 128]}


@dataclass(frozen=True)
class Setup:
    size: int  # tensor-parallel ranks
    expert_parallel: bool
    fp8: bool

    @property
    def name(self) -> str:
        return (f"TP {self.size}" + (" + EP" if self.expert_parallel else "")
                + (" FP8" if self.fp8 else " bf16"))


def _sequence(context: int, row: int) -> Sequence:
    """A decode row: `context` tokens, the newest to compute, pages spread over the pool. Its
    newest token differs from row to row, so the rows route to different experts as real
    traffic does (identical rows would all read the same four)."""
    seq = Sequence(f"r{row}", [1] * (context - 1), SamplingParams(max_tokens=2), None)
    seq.token_ids.append(10 + 3 * row)  # inside the bench tokenizer's byte vocabulary
    seq.num_computed_tokens = context - 1
    seq.page_ids = [(row * 131 + i) % POOL_PAGES for i in range(-(-context // BLOCK))]
    return seq


def _replay_ms(graphs: DecodeGraphs, batch: ScheduledBatch) -> float:
    graphs.run(batch)  # captures this bucket's graph and fills its buffers
    graph = next(iter(graphs.graphs.values()))
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / REPLAYS


def _without_collectives():
    """Swaps the layers' collectives for local stand-ins of the same shapes."""
    saved = parallel.all_reduce, parallel.all_gather_last_dim
    size = parallel.state().size
    parallel.all_reduce = lambda x: x
    parallel.all_gather_last_dim = lambda x: x.repeat_interleave(size, dim=-1)
    return saved


def _prefill_s(model, cache, topk: int) -> float:
    pages = torch.arange(PREFILL_TOKENS // BLOCK, dtype=torch.int32)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for begin in range(0, PREFILL_TOKENS, PREFILL_CHUNK):
        end = begin + PREFILL_CHUNK
        positions = torch.arange(begin, end)
        inputs = StepInputs(
            input_ids=torch.ones(PREFILL_CHUNK, dtype=torch.long), positions=positions,
            cu_seqlens_q=torch.tensor([0, PREFILL_CHUNK], dtype=torch.int32),
            seq_lens=torch.tensor([end], dtype=torch.int32), block_table=pages[None],
            slot_mapping=pages.long()[positions // BLOCK] * BLOCK + positions % BLOCK,
            logit_rows=[PREFILL_CHUNK - 1], mm_embeds=None)
        forward_step(model, cache, inputs, topk, check_indices=False)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def _rank_main(rank: int, setup: Setup, model_dir: str, port: int, results: dict) -> None:
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    parallel.initialize(rank, setup.size, setup.expert_parallel, f"tcp://127.0.0.1:{port}",
                        device, timeout_s=600)
    try:
        loaded = load_model(model_dir, torch.bfloat16, device, load_format="dummy")
        model, topk = loaded.model, loaded.config.msa.topk
        cache = KVCache(loaded.config, POOL_PAGES, torch.bfloat16, device,
                        kernels.INDEX_KEY_FP8)
        weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
        row = {"weights_gib": weights_gib}
        with torch.inference_mode():
            _prefill_s(model, cache, topk)  # compiles the prefill kernels
            row["prefill_s"] = _prefill_s(model, cache, topk)
            for requests, context in DECODE_SHAPES:
                batch = ScheduledBatch()
                for r in range(requests):
                    batch.add(_sequence(context, r), 1)
                max_len = max(c for _, c in DECODE_SHAPES) + BLOCK
                graphs = DecodeGraphs(model, cache, topk, requests, max_len)
                row[f"decode_ms_{requests}x{context}"] = _replay_ms(graphs, batch)
                saved = _without_collectives()
                try:
                    local = DecodeGraphs(model, cache, topk, requests, max_len)
                    row[f"local_ms_{requests}x{context}"] = _replay_ms(local, batch)
                finally:
                    parallel.all_reduce, parallel.all_gather_last_dim = saved
                del graphs, local
        if rank == 0:
            results[setup] = row
    finally:
        parallel.shutdown()


def run_setup(setup: Setup, model_dir: Path, port: int) -> dict:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_main, args=(setup, str(model_dir), port, results), nprocs=setup.size)
        return dict(results[setup])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    parser.add_argument("--moe-layers", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args()
    sizes = [s for s in (1, 2, 4) if s <= args.gpus]
    setups = [Setup(s, False, False) for s in sizes]
    setups += [Setup(s, True, False) for s in sizes if s > 1]
    setups += [Setup(s, False, True) for s in sizes]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        for fp8 in (False, True):
            dirs[fp8] = Path(tmp) / ("fp8" if fp8 else "bf16")
            dirs[fp8].mkdir()
            write_config(dirs[fp8], args.moe_layers)
            config = json.loads((dirs[fp8] / "config.json").read_text())
            # Padded, as released vocabularies are, so it splits over the ranks.
            text = config["text_config"]
            text["vocab_size"] = -(-text["vocab_size"] // 64) * 64
            if fp8:
                config["quantization_config"] = FP8_BLOCK
            (dirs[fp8] / "config.json").write_text(json.dumps(config))
        for i, setup in enumerate(setups):
            results[setup] = run_setup(setup, dirs[setup.fp8], 29500 + i)
            print(setup.name, results[setup], flush=True)
    baseline = results[Setup(1, False, False)]
    header = ["setup", "weights/GPU (GiB)", "prefill 128K (s)", "vs TP 1 bf16"]
    for requests, context in DECODE_SHAPES:
        header += [f"decode {requests} x {context // 1024}K (ms)", "vs TP 1 bf16",
                   "collectives"]
    rows = []
    for setup, row in results.items():
        line = [setup.name, f"{row['weights_gib']:.1f}", f"{row['prefill_s']:.2f}",
                f"{row['prefill_s'] / baseline['prefill_s']:.2f}x"]
        for requests, context in DECODE_SHAPES:
            key = f"{requests}x{context}"
            step, local = row[f"decode_ms_{key}"], row[f"local_ms_{key}"]
            line += [f"{step:.2f}", f"{step / baseline[f'decode_ms_{key}']:.2f}x",
                     f"{max(0.0, 1 - local / step):.0%}"]
        rows.append(line)
    steps = markdown_table(header, rows)
    layers = 1 + args.moe_layers
    notes = (f"MiniMax-M3 at full width, {layers} layers (layer 0 dense attention + dense MLP "
             f"12288; the rest MSA topk 16 + MoE: 128 experts of 3072, top 4, shared expert), "
             "random weights. Decode: GPU time of one CUDA-graph step (NCCL captured), "
             f"{REPLAYS} replays; 'vs TP 1 bf16' is the step time's ratio (lower is faster; "
             "the goals: TP 2 <= 0.6x, TP 4 <= 0.35x at batch 64). 'collectives' is "
             "1 - (the same step captured without its collectives) / (the step). Prefill: one "
             "128K prompt in 16K chunks, eager, second run. FP8: e4m3 weights with 128 x 128 "
             "fp32 block scales, activations quantized per token group (W8A8 Triton GEMMs; "
             "each GEMM against bf16: bench/results/fp8_tiles_<gpu>.md). 'TP 2 + EP' deals whole experts to "
             "ranks; tensor parallel inside the experts ('TP 2') is faster at every shape "
             "here, so it stays the default.")
    write_results(f"parallel_{torch.cuda.get_device_name().split()[-1].lower()}",
                  "MiniMax-M3 across GPUs: tensor and expert parallel, FP8 weights",
                  f"## Steps\n\n{steps}", notes, args.out_dir)


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # the device notes: multicast off
    main()
