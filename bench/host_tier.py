"""The host KV tier against recomputation: time to first token of a long prompt whose prefix is
computed (the baseline), found in the device cache, or found only in the host tier (copied back
on the step's stream). Measured in one run, on the same engine and prompt.

Method: one LLMEngine (CUDA graphs on), a device cache of `--device-pages` pages and a host tier
big enough for every prompt. Per prompt length: an untimed prompt of that length, computed and
then hit, compiles the kernels of both; the prompt is computed (timed), asked again (a device hit), then other prompts push its
pages out of the device cache (to the host tier) and it is asked again (a host hit). Each TTFT
is `generate` of one output token, whose result the host has read.

Models: MiniMax-M3 at full width with 4 layers (random weights, bench/engine_m3.py's config) and,
with --smol-shapes DIR (a config.json and tokenizer of SmolLM2-135M), SmolLM2's shapes.
Usage (CUDA): python -m bench.host_tier [--smol-shapes DIR] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from bench.common import markdown_table, write_results
from bench.engine_m3 import write_config
from kernels import BLOCK_SIZE
from worker.config import EngineConfig
from worker.engine.llm_engine import LLMEngine
from worker.prefix_hash import chain_page_hashes
from worker.wire import SamplingParams

ONE_TOKEN = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


def ttft_ms(engine: LLMEngine, prompt: list[int]) -> float:
    started = time.perf_counter()
    engine.generate([prompt], ONE_TOKEN, use_tqdm=False)
    return (time.perf_counter() - started) * 1e3


def rows_for(model: str, name: str, lengths: list[int], device_pages: int) -> list[list[str]]:
    probe = LLMEngine(EngineConfig(model=model, load_format="dummy", kv_cache_memory="64MiB",
                                   warm_up=False))
    page = probe.page_bytes
    vocab = probe.model_config.vocab_size
    del probe
    host_pages = 4 * max(lengths) // BLOCK_SIZE + 64
    engine = LLMEngine(EngineConfig(model=model, load_format="dummy",
                                    kv_cache_memory=device_pages * page,
                                    kv_host_memory=host_pages * page,
                                    max_num_batched_tokens=8192))
    rng = random.Random(0)
    rows = []

    def prompt(length: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(length)]

    for length in (min(n, engine.max_model_len - 2) for n in lengths):
        warm = prompt(length)  # compiles this length's kernel variants, cached or not
        ttft_ms(engine, warm)
        ttft_ms(engine, warm)
        session = prompt(length)
        computed = ttft_ms(engine, session)
        device_hit = ttft_ms(engine, session)
        first_page = chain_page_hashes(session[:BLOCK_SIZE], engine.block_manager.salt)[0]
        while engine.block_manager.device_page(first_page) is not None:
            engine.generate([prompt(length)], ONE_TOKEN, use_tqdm=False)
        copied_before = engine.block_manager.num_pages_from_host
        host_hit = ttft_ms(engine, session)
        copied = engine.block_manager.num_pages_from_host - copied_before
        rows.append([name, length, f"{computed:.1f}", f"{device_hit:.1f}", f"{host_hit:.1f}",
                     copied, f"{computed / host_hit:.1f}x"])
    engine.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smol-shapes", default=None)
    parser.add_argument("--lengths", default="8192,32768")
    parser.add_argument("--device-pages", type=int, default=640)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        write_config(Path(tmp), moe_layers=3)
        rows = rows_for(tmp, "MiniMax-M3, 4 layers", lengths, args.device_pages)
    if args.smol_shapes:
        rows += rows_for(args.smol_shapes, "SmolLM2-135M", [n for n in lengths if n <= 8192],
                         args.device_pages)
    table = markdown_table(["model", "prompt tokens", "computed (baseline) ms",
                            "device-cache hit ms", "host-tier hit ms", "pages copied back",
                            "computed / host hit"], rows)
    notes = (f"TTFT of one output token; the whole prompt but its last partial page is the "
             f"cached prefix. Device cache of {args.device_pages} pages; the host tier holds "
             f"every prompt. bf16, CUDA-graph decode, overlapped scheduling, chunked prefill "
             f"of 8,192 tokens per step.")
    write_results(f"host_tier_{torch.cuda.get_device_name().split()[-1].lower()}",
                  "Host KV tier: a prefix copied back against recomputed", table, notes,
                  Path(args.out_dir) if args.out_dir else None)


if __name__ == "__main__":
    main()
