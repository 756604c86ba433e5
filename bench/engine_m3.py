"""Engine on CUDA with an M3-shaped model: MSA against the same model with dense attention.

A random-weight checkpoint with MiniMax-M3's attention at full width (4 layers, Hq 64, Hkv 4,
D = Di = 128, learned index branch, topk 16; dense MLPs) runs through the whole engine (paged
cache, chunked prefill of 16K-token chunks, Triton kernels) in bf16. For each context length:
prefill seconds of one prompt, and decode tokens/s of 8 such requests generating together.
"Dense" is the same engine and weights with topk large enough that every block is visible,
which routes attention to the dense path (flash SDPA for fresh prompts, the paged query-tiled
kernel over all pages otherwise).

Usage (CUDA): python bench/engine_m3.py [--out-dir DIR] [--contexts 32768 131072]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import markdown_table, write_results  # noqa: E402
from deployments.bench_engine import random_prompts, time_to_first_token  # noqa: E402
from worker.config import EngineConfig  # noqa: E402
from worker.engine import LLMEngine  # noqa: E402
from worker.sequence import SamplingParams  # noqa: E402
from worker.tiny_model import m3_shaped_config_dict, make_random_checkpoint  # noqa: E402

DENSE_TOPK = 1 << 20  # every block of a 128M-token context: attention is dense
BATCH = 8
DECODE_STEPS = 32


def decode_tokens_per_s(engine: LLMEngine, prompts: list[list[int]]) -> float:
    """Prefills all prompts, then times DECODE_STEPS steps of the whole batch."""
    # Early requests decode while later ones still prefill: leave them room, abort after.
    params = SamplingParams(temperature=0, max_tokens=4096, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    while any(engine.requests[i].num_output_tokens == 0 for i in ids):
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    generated = 0
    for _ in range(DECODE_STEPS):
        generated += len(engine.step())
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    for request_id in ids:
        engine.abort(request_id)
    return generated / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    args = parser.parse_args()
    assert torch.cuda.is_available(), "bench/engine_m3.py needs a CUDA GPU"
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_random_checkpoint(tmp, m3_shaped_config_dict(0), device="cuda",
                                            dtype=torch.bfloat16)
        engine = LLMEngine(EngineConfig(
            model=str(checkpoint), device="cuda", dtype="bfloat16", kv_cache_memory="24GiB",
            max_num_batched_tokens=16384, max_num_seqs=BATCH, enable_prefix_caching=False,
            max_model_len=max(args.contexts) + 256))
    vocab = engine.model_config.vocab_size
    graphs = engine.runner.decode_graphs
    # Dense: PyTorch's SDPA per sequence, eager (it reads lengths on the host, so it cannot be
    # captured); MSA with eager steps; MSA with decode steps replayed from CUDA graphs.
    modes = {"dense": (DENSE_TOPK, None), "MSA eager": (None, None), "MSA": (None, graphs)}

    def use(mode: str) -> None:  # the same loaded engine, attention and step mode switched
        engine.runner.topk, engine.runner.decode_graphs = modes[mode]

    # Compile and warm up every kernel variant of every mode (prefill chunks and batch-8
    # decode) at every context measured: some kernels specialize on the block table's width.
    for context in args.contexts:
        for mode in modes:
            use(mode)
            decode_tokens_per_s(engine, random_prompts(vocab, BATCH, context, context, seed=1))
    rows = []
    for context in args.contexts:
        prompts = random_prompts(vocab, BATCH, context, context, seed=context)
        prefill, decode = {}, {}
        for mode in modes:
            use(mode)
            if mode != "MSA eager":  # CUDA graphs only change decode steps
                prefill[mode] = time_to_first_token(engine, prompts[0])
            decode[mode] = decode_tokens_per_s(engine, prompts)
            print(f"{context} {mode}: decode {decode[mode]:.1f} tok/s", flush=True)
        rows.append([f"{context // 1024}K", f"{prefill['dense']:.3f}", f"{prefill['MSA']:.3f}",
                     f"{prefill['dense'] / prefill['MSA']:.2f}x", f"{decode['dense']:.1f}",
                     f"{decode['MSA eager']:.1f}", f"{decode['MSA']:.1f}",
                     f"{decode['MSA eager'] / decode['dense']:.2f}x",
                     f"{decode['MSA'] / decode['dense']:.2f}x"])
    table = markdown_table(["context", "dense prefill (s)", "MSA prefill (s)", "prefill speedup",
                            f"dense decode tok/s (batch {BATCH})", "MSA eager decode tok/s",
                            "MSA graph decode tok/s", "eager vs dense", "graphs vs dense"],
                           rows)
    notes = ("M3-shaped random model: 4 layers, hidden 6144, Hq 64, Hkv 4, D 128, learned index "
             "branch (1 index-key head, Di 128), topk 16, dense MLP 8192, bf16; whole engine "
             "(scheduler, paged cache, 16K-token prefill chunks). Dense = same engine, every "
             "block visible: flash SDPA for the first chunk of a prompt, the paged query-tiled "
             "kernel over all visible pages for later chunks and decode, eager steps. MSA eager = every step eager; MSA graph = decode steps replayed from "
             "CUDA graphs (worker/cuda_graphs.py).")
    write_results("engine_m3_h100" if "H100" in torch.cuda.get_device_name() else "engine_m3_gpu",
                  "Engine on GPU: M3-shaped model, MSA vs dense attention", table, notes,
                  directory=Path(args.out_dir) if args.out_dir else None)


if __name__ == "__main__":
    main()
