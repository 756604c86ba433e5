"""Engine overhead: a decode step's wall time against the GPU time of its kernels, with
overlapped scheduling on and off (off, `overlap_scheduling: false`, is the baseline measured
in the same run on the same prefilled batch), and the default model's offline throughput.

Method: the whole LLMEngine with CUDA-graph decode. B requests are prefilled to a context of C
tokens; then STEPS decode steps are timed on the wall (`LLMEngine.step` in a loop, synchronized
at both ends) and STEPS more are profiled (torch.profiler, CUDA activity): the sum of the
kernels' GPU time per step. wall / GPU = 1.0 means the GPU never waited for the host.

Models: MiniMax-M3 at full width with 4 layers (random weights; bench/engine_m3.py's config,
3 MoE layers) and SmolLM2-135M-Instruct (the embedded default). Throughput: prompts of
256-2,048 tokens, 128 output tokens each, greedy, EOS ignored (deployments/bench_engine.py); a first pass over the same
prompts in each mode compiles the kernel variants its steps need, then both modes are timed.

Usage (CUDA): python -m bench.engine_overhead [--out-dir DIR] [--skip-m3]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import torch

from bench.common import kernel_times_us, markdown_table, write_results
from bench.engine_m3 import write_config
from deployments.bench_engine import offline_throughput, random_prompts
from worker.config import EngineConfig
from worker.engine.llm_engine import LLMEngine
from worker.wire import SamplingParams

STEPS = 32
WARM_STEPS = 4
# (context, batches measured at it): the largest batch is prefilled once, then trimmed.
M3_SHAPES = ((4096, (64, 8)), (32768, (64, 8)))
SMOL_SHAPES = ((4096, (64, 8)),)
THROUGHPUT_REQUESTS = (16, 64, 256)
MODES = {"serial (--no-overlap)": False, "overlapped": True}


def decode_rows(engine: LLMEngine, model: str, context: int, batches: tuple[int, ...]
                ) -> list[list[object]]:
    """Prefills max(batches) requests of `context` tokens, then for each batch size (largest
    first, aborting the surplus) measures both modes on the same sequences."""
    vocab = engine.model_config.vocab_size
    prompts = random_prompts(vocab, max(batches), context, context, seed=context)
    params = SamplingParams(temperature=0, max_tokens=1 << 20, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    while any(engine.requests[i][0].num_output_tokens == 0 for i in ids):
        engine.step()
    rows = []
    for batch in sorted(batches, reverse=True):
        for request_id in ids[batch:]:
            if request_id in engine.requests:
                engine.abort(request_id)
        for mode, overlap in MODES.items():
            engine.overlap = overlap
            for _ in range(WARM_STEPS):
                engine.step()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(STEPS):
                engine.step()
            torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - start) * 1e3 / STEPS
            gpu_ms = sum(kernel_times_us(engine.step, STEPS).values()) / 1e3
            rows.append([model, f"{batch} x {context // 1024}K", mode, f"{wall_ms:.2f}",
                         f"{gpu_ms:.2f}", f"{wall_ms / gpu_ms:.2f}"])
            print(rows[-1], flush=True)
    for request_id in ids:
        if request_id in engine.requests:
            engine.abort(request_id)
    return rows


def tokens_per_s(engine: LLMEngine, prompts: list[list[int]], overlap: bool) -> float:
    engine.overlap = overlap
    result = offline_throughput(engine, prompts, output_tokens=128)
    return result.output_tokens / result.seconds


def throughput_rows(engine: LLMEngine) -> list[list[object]]:
    """Per request count: the first (cold) pass, overlapped, an untimed serial pass, then
    both modes timed on the same prompts. A first pass pays for the Triton kernel variants the
    start-up warm-up did not compile (new batch-size and tile classes of mixed steps)."""
    rows = []
    vocab = engine.model_config.vocab_size
    for count in THROUGHPUT_REQUESTS:
        prompts = random_prompts(vocab, count, 256, 2048, seed=count)
        # The two modes batch differently, so each first compiles its own kernel variants.
        cold, _, serial, overlapped = (tokens_per_s(engine, prompts, overlap)
                                       for overlap in (True, False, False, True))
        rows.append([count, f"{cold:.0f}", f"{serial:.0f}", f"{overlapped:.0f}",
                     f"{overlapped / serial:.2f}x"])
        print(rows[-1], flush=True)
    return rows


def m3_rows() -> list[list[object]]:
    with tempfile.TemporaryDirectory() as tmp:
        write_config(Path(tmp), moe_layers=3)
        engine = LLMEngine(EngineConfig(
            model=tmp, load_format="dummy", device="cuda", dtype="bfloat16",
            max_num_batched_tokens=16384, max_num_seqs=64, enable_prefix_caching=False,
            max_model_len=max(c for c, _ in M3_SHAPES) + 1024))
    return [row for context, batches in M3_SHAPES
            for row in decode_rows(engine, "M3, 4 layers", context, batches)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--skip-m3", action="store_true")
    parser.add_argument("--smol-shapes", default=None, metavar="DIR",
                        help="a directory with SmolLM2-135M's config.json and tokenizer: its "
                             "shapes with random weights (load_format dummy), where the "
                             "embedded GGUF cannot be installed")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "bench/engine_overhead.py needs a CUDA GPU"
    directory = Path(args.out_dir) if args.out_dir else None
    decode = [] if args.skip_m3 else m3_rows()
    write_tables(decode, [], "", directory)  # a partial file, should the rest not finish
    gc.collect()  # the M3 engine's weights and cache go before SmolLM2 loads
    torch.cuda.empty_cache()
    smol = LLMEngine(EngineConfig(model=args.smol_shapes, device="cuda", max_num_seqs=256,
                                  load_format="dummy" if args.smol_shapes else "auto"))
    smol_source = ("its shapes with random weights (load_format dummy); with EOS ignored "
                   "every step computes the same as with the real weights" if args.smol_shapes
                   else "the embedded GGUF")
    for context, batches in SMOL_SHAPES:
        decode += decode_rows(smol, "SmolLM2-135M", context, batches)
    write_tables(decode, [], smol_source, directory)
    write_tables(decode, throughput_rows(smol), smol_source, directory)


def write_tables(decode: list[list[object]], throughput: list[list[object]], smol_source: str,
                 directory: Path | None) -> None:
    tables = (
        "## Decode step: wall time against GPU kernel time\n\n"
        + markdown_table(["model", "batch x context", "scheduling", "wall ms/step",
                          "GPU kernel ms/step", "wall / GPU"], decode)
        + "\n\n## SmolLM2-135M offline output throughput (tokens/s)\n\n"
        + markdown_table(["requests", "first pass, overlapped (compiles kernels)",
                          "serial (--no-overlap)", "overlapped", "overlapped vs serial"],
                         throughput))
    notes = (f"Decode: {STEPS} timed steps after {WARM_STEPS} warm ones, then {STEPS} profiled "
             "steps, both modes on the same prefilled sequences (the serial rows first), "
             "CUDA-graph decode, bf16. Throughput: prompts of 256-2,048 tokens, 128 output "
             "tokens each, greedy, EOS ignored, prefill included, max_num_seqs 256; the "
             "serial and overlapped columns follow a first pass over the same prompts in each mode. "
             f"SmolLM2-135M: {smol_source}.")
    gpu = torch.cuda.get_device_name()
    write_results("engine_overhead_" + next((g.lower() for g in ("H100", "H200") if g in gpu),
                                            "gpu"),
                  "Engine overhead: overlapped scheduling", tables, notes, directory=directory)

if __name__ == "__main__":
    main()
