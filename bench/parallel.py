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

`--profile` instead lists each kernel's GPU time in one batch-64 x 32K decode step at TP 1 and
at TP `--gpus` (bf16 and FP8): what does not shrink as the ranks grow.

`--fp8 mxfp8` runs the FP8 rows with the released checkpoint's MXFP8 weights as served
(regrouped into 1 x 128 blocks, `mxfp8_mode: w8a8`) instead of 128 x 128 block scales, beside
bf16 at each split, and writes parallel_mxfp8_<gpu>.md (the expert-parallel and eager-glue rows,
which do not depend on the FP8 layout, stay in parallel_<gpu>.md).

Rows marked "eager glue" run the norms, rotary embeddings and activations as separate torch ops
(`MSA_SERVE_COMPILE=0`), as before `worker/layers/fused.py`: the fusion's effect, same run.

Usage (CUDA): python -m bench.parallel [--gpus 2] [--moe-layers 2] [--skip-expert-parallel]
                                       [--fp8 block|mxfp8] [--profile] [--out-dir DIR]
                                       [--resume FILE]
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
from bench.common import kernel_times_us, markdown_table, write_results  # noqa: E402
from bench.engine_m3 import write_config  # noqa: E402
from worker import parallel  # noqa: E402
from worker.engine.block_table import BlockTables  # noqa: E402
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
PROFILE_SHAPE = (64, 32768)
PROFILE_ROWS = 30  # the costliest kernels at TP N, one row each


@dataclass(frozen=True)
class FP8Layout:
    label: str  # the rows' name for these weights
    quantization_config: dict  # the checkpoint's
    note: str  # what the results file says of them


# --fp8 -> the FP8 rows' weights
FP8_LAYOUTS = {
    "block": FP8Layout(
        "FP8", {"quant_method": "fp8", "fmt": "float8_e4m3fn", "weight_block_size": [128, 128]},
        "FP8: e4m3 weights with 128 x 128 fp32 block scales, activations quantized per token "
        "group, by the kernel before each GEMM (the norm before q/k/v, the dense MLP and the "
        "shared expert, "
        "decode attention's merge before o_proj, SwiGLU before down_proj; dense decode GEMMs "
        "on cuBLASLt's "
        "block-scaled FP8 GEMM with the scales' per-row copy, prefill chunks with the blocks, "
        "the experts on the Triton grouped GEMM; each GEMM against bf16: "
        "bench/results/fp8_picks_<gpu>.md, fp8_chains_<gpu>.md)."),
    "mxfp8": FP8Layout(
        "MXFP8", {"quant_method": "mxfp8", "fmt": "float8_e4m3fn", "weight_block_size": [1, 32],
                  "scale_fmt": "ue8m0"},
        "MXFP8: e4m3 weights with an e8m0 scale per 32 along K, as the released M3 checkpoint "
        "stores them, served as `mxfp8_mode: w8a8` does: regrouped into 1 x 128 blocks once "
        "loaded, activations quantized per token group, by the norm before q/k/v and the "
        "dense MLP (dense GEMMs on cuBLASLt's 1 x 128 "
        "block scaling, the experts on the Triton grouped GEMM; each GEMM against bf16: "
        "bench/results/fp8_picks_<gpu>.md, 'MXFP8 regrouped 1x128'). The expert-parallel and "
        "eager-glue rows: parallel_<gpu>.md."),
}


@dataclass(frozen=True)
class Setup:
    size: int  # tensor-parallel ranks
    expert_parallel: bool
    fp8: bool
    compiled: bool = True  # the elementwise glue fused by torch.compile (worker/layers/fused.py)
    fp8_layout: str = "block"  # a key of FP8_LAYOUTS

    @property
    def name(self) -> str:
        weights = FP8_LAYOUTS[self.fp8_layout].label if self.fp8 else "bf16"
        return (f"TP {self.size}" + (" + EP" if self.expert_parallel else "") + f" {weights}"
                + ("" if self.compiled else ", eager glue"))


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
    inputs = graphs.prepare(batch, BlockTables(len(batch), graphs.max_pages))
    graphs.replay(inputs)  # captures this step's graph and fills its buffers
    graph = graphs.graphs[inputs.bucket, inputs.short]
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


def _decode_graphs(model, cache, topk: int, requests: int, context: int):
    batch = ScheduledBatch()
    for r in range(requests):
        batch.add(_sequence(context, r), 1)
    max_len = max(c for _, c in DECODE_SHAPES) + BLOCK
    return DecodeGraphs(model, cache, topk, requests, max_len), batch


def _measure(model, cache, topk: int) -> dict:
    row = {}
    _prefill_s(model, cache, topk)  # compiles the prefill kernels
    row["prefill_s"] = _prefill_s(model, cache, topk)
    for requests, context in DECODE_SHAPES:
        graphs, batch = _decode_graphs(model, cache, topk, requests, context)
        row[f"decode_ms_{requests}x{context}"] = _replay_ms(graphs, batch)
        saved = _without_collectives()
        try:
            local, _ = _decode_graphs(model, cache, topk, requests, context)
            row[f"local_ms_{requests}x{context}"] = _replay_ms(local, batch)
        finally:
            parallel.all_reduce, parallel.all_gather_last_dim = saved
        del graphs, local
    return row


def _profile(model, cache, topk: int) -> dict:
    graphs, batch = _decode_graphs(model, cache, topk, *PROFILE_SHAPE)
    step_ms = _replay_ms(graphs, batch)
    graph = next(iter(graphs.graphs.values()))
    return {"kernels_us": kernel_times_us(graph.replay, REPLAYS), "step_us": 1000 * step_ms}


def _rank_main(rank: int, setup: Setup, model_dir: str, port: int, results: dict,
               profile: bool) -> None:
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    parallel.initialize(rank, setup.size, setup.expert_parallel, f"tcp://127.0.0.1:{port}",
                        device, timeout_s=600)
    try:
        loaded = load_model(model_dir, torch.bfloat16, device, load_format="dummy")
        model, topk = loaded.model, loaded.config.msa.topk
        cache = KVCache(loaded.config, POOL_PAGES, torch.bfloat16, device,
                        kernels.INDEX_KEY_FP8)
        # Buffers too: the per-row copy of block scales (`fp8.spread_block_scales_`) is weight
        # memory a replica holds.
        weights_gib = sum(t.numel() * t.element_size()
                          for t in [*model.parameters(), *model.buffers()]) / 2**30
        with torch.inference_mode():
            row = (_profile if profile else _measure)(model, cache, topk)
        if rank == 0:
            results[setup] = {"weights_gib": weights_gib, **row}
    finally:
        parallel.shutdown()


def run_setup(setup: Setup, model_dir: Path, port: int, profile: bool = False) -> dict:
    os.environ["MSA_SERVE_COMPILE"] = "1" if setup.compiled else "0"  # read by the ranks
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_main, args=(setup, str(model_dir), port, results, profile),
                 nprocs=setup.size)
        return dict(results[setup])


def _write_configs(tmp: Path, moe_layers: int, fp8_layout: str) -> dict[bool, Path]:
    """The bf16 and FP8 model directories, keyed by `fp8`."""
    dirs = {}
    for fp8 in (False, True):
        dirs[fp8] = tmp / ("fp8" if fp8 else "bf16")
        dirs[fp8].mkdir()
        write_config(dirs[fp8], moe_layers)
        config = json.loads((dirs[fp8] / "config.json").read_text())
        # Padded, as released vocabularies are, so it splits over the ranks.
        text = config["text_config"]
        text["vocab_size"] = -(-text["vocab_size"] // 64) * 64
        if fp8:
            config["quantization_config"] = FP8_LAYOUTS[fp8_layout].quantization_config
        (dirs[fp8] / "config.json").write_text(json.dumps(config))
    return dirs


def _model_note(moe_layers: int) -> str:
    return (f"MiniMax-M3 at full width, {1 + moe_layers} layers (layer 0 dense attention + "
            "dense MLP 12288; the rest MSA topk 16 + MoE: 128 experts of 3072, top 4, shared "
            "expert), random weights.")


def _results_name(kind: str, fp8_layout: str) -> str:
    """parallel[_profile][_mxfp8]_<gpu>: each FP8 layout's runs in files of their own."""
    layout = "" if fp8_layout == "block" else f"_{fp8_layout}"
    return f"{kind}{layout}_{torch.cuda.get_device_name().split()[-1].lower()}"


def _steps_report(results: dict, moe_layers: int, fp8_layout: str,
                  out_dir: Path | None) -> None:
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
    notes = (_model_note(moe_layers) + " Decode: GPU time of one CUDA-graph step (NCCL "
             f"captured), {REPLAYS} replays; 'vs TP 1 bf16' is the step time's ratio (lower is "
             "faster; the goals: TP 2 <= 0.6x, TP 4 <= 0.35x at batch 64). 'collectives' is "
             "1 - (the same step captured without its collectives) / (the step). Prefill: one "
             "128K prompt in 16K chunks, eager, second run. " + FP8_LAYOUTS[fp8_layout].note)
    notes += _expert_parallel_note(results)
    write_results(_results_name("parallel", fp8_layout),
                  "MiniMax-M3 across GPUs: tensor and expert parallel, "
                  f"{FP8_LAYOUTS[fp8_layout].label} weights",
                  f"## Steps\n\n{markdown_table(header, rows)}", notes, out_dir)


def _expert_parallel_note(results: dict) -> str:
    """How expert parallel ('TP N + EP') fares against tensor parallel inside the experts at the
    same ranks, counted over every decode shape and the prefill: the measurement behind
    `model.expert_parallel`'s default (off)."""
    keys = ["prefill_s"] + [f"decode_ms_{r}x{c}" for r, c in DECODE_SHAPES]
    pairs = [(results[setup], results[Setup(setup.size, False, False)])
             for setup in results if setup.expert_parallel
             and Setup(setup.size, False, False) in results]
    if not pairs:
        return ""
    ratios = [ep[key] / tp[key] for ep, tp in pairs for key in keys]
    faster = sum(ratio < 1 for ratio in ratios)
    return (" 'TP N + EP' deals whole experts to ranks (bf16); against tensor parallel inside "
            f"the experts ('TP N bf16', same ranks) it is faster at {faster} of {len(ratios)} "
            f"step shapes, its steps taking {min(ratios):.2f}-{max(ratios):.2f}x as long.")


def _short_kernel_name(name: str) -> str:
    for noise in ("void ", "at::native::", "(anonymous namespace)::", "at_cuda_detail::"):
        name = name.replace(noise, "")
    return name[:110].replace("|", "/")


def _profile_report(results: dict, moe_layers: int, fp8_layout: str,
                    out_dir: Path | None) -> None:
    sections = []
    for fp8 in (False, True):
        one, *split = [(s, r["kernels_us"]) for s, r in results.items() if s.fp8 == fp8]
        names = sorted(set(one[1]).union(*(k for _, k in split)),
                       key=lambda n: -max(k.get(n, 0.0) for _, k in split))
        header = ["kernel", f"{one[0].name} (us)"]
        for setup, _ in split:
            header += [f"{setup.name} (us)", f"x {setup.size} / TP 1"]
        rows = []
        shown, rest = names[:PROFILE_ROWS], names[PROFILE_ROWS:]
        groups = [(_short_kernel_name(n), [n]) for n in shown]
        groups.append((f"the other {len(rest)} kernels", rest))
        for label, members in groups:
            base = sum(one[1].get(n, 0.0) for n in members)
            line = [label, f"{base:.1f}"]
            for setup, kernels_us in split:
                ours = sum(kernels_us.get(n, 0.0) for n in members)
                line += [f"{ours:.1f}", f"{ours * setup.size / base:.2f}" if base else "-"]
            rows.append(line)
        for label, totals in (("all kernels", {s: sum(r["kernels_us"].values())
                                               for s, r in results.items()}),
                              ("graph step (kernels and the gaps between)",
                               {s: r["step_us"] for s, r in results.items()})):
            line = [label, f"{totals[one[0]]:.1f}"]
            for setup, _ in split:
                line += [f"{totals[setup]:.1f}",
                         f"{totals[setup] * setup.size / totals[one[0]]:.2f}"]
            rows.append(line)
        label = FP8_LAYOUTS[fp8_layout].label if fp8 else "bf16"
        sections.append(f"## {label}\n\n{markdown_table(header, rows)}")
    requests, context = PROFILE_SHAPE
    notes = (_model_note(moe_layers) + f" GPU time of each kernel in one {requests} x "
             f"{context // 1024}K CUDA-graph decode step on rank 0 (torch.profiler, "
             f"{REPLAYS} replays). 'x N / TP 1' is the kernel's time at TP N times N over its "
             "time at TP 1: 1.00 means it splits perfectly, N means it does not shrink at all.")
    write_results(_results_name("parallel_profile", fp8_layout),
                  "MiniMax-M3 decode kernels across GPUs: what does not split",
                  "\n\n".join(sections), notes, out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    parser.add_argument("--moe-layers", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--skip-expert-parallel", action="store_true")
    parser.add_argument("--fp8", choices=sorted(FP8_LAYOUTS), default="block",
                        help="the FP8 rows' weights: 128 x 128 block scales, or MXFP8 as the "
                             "released checkpoint stores them, served regrouped")
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--resume", type=Path, default=None,
                        help="JSON of finished setups: read first (those are not run again), "
                             "written after each setup, so a run cut short goes on from there")
    args = parser.parse_args()
    sizes = (1, args.gpus) if args.profile else [s for s in (1, 2, 4) if s <= args.gpus]
    setups = ([Setup(s, False, False) for s in sizes]
              + [Setup(s, False, True, fp8_layout=args.fp8) for s in sizes])
    if not args.profile and args.fp8 == "block":
        if not args.skip_expert_parallel:
            setups += [Setup(s, True, False) for s in sizes if s > 1]
        setups += [Setup(s, False, False, compiled=False) for s in (1, sizes[-1])]
    finished = json.loads(args.resume.read_text()) if args.resume and args.resume.exists() else {}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = _write_configs(Path(tmp), args.moe_layers, args.fp8)
        for i, setup in enumerate(setups):
            if setup.name in finished and not args.profile:
                results[setup] = finished[setup.name]
                continue
            results[setup] = run_setup(setup, dirs[setup.fp8], 29500 + i, args.profile)
            if not args.profile:
                print(setup.name, results[setup], flush=True)
                if args.resume:
                    finished[setup.name] = results[setup]
                    args.resume.write_text(json.dumps(finished, indent=1))
    report = _profile_report if args.profile else _steps_report
    report(results, args.moe_layers, args.fp8, args.out_dir)


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # the device notes: multicast off
    main()
