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
`--copies` times the host-tier page copies alone instead, batched (`HostKVCache.apply`) against
page by page, at M3's and SmolLM2's page layouts.

Usage (CUDA): python -m bench.host_tier [--smol-shapes DIR | --copies] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from bench.common import markdown_table, write_results
from bench.engine_m3 import write_config
from kernels import BLOCK_SIZE
from worker.config import EngineConfig
from worker.engine.host_tier import PageTransfer
from worker.engine.kv_cache import HostKVCache
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


# (name, layers, KV heads, head dim, index-key heads, index head dim) of the page layouts timed
# by --copies: M3 at full depth (60 layers, 4 KV heads, one shared 128-wide index key) and
# SmolLM2-135M (30 layers, 3 KV heads of 64, no separate index keys).
COPY_LAYOUTS = (("MiniMax-M3, 60 layers", 60, 4, 128, 1, 128), ("SmolLM2-135M", 30, 3, 64, 0, 0))
COPY_PAGES, COPY_POOL, COPY_REPEATS = 64, 256, 5


def page_by_page(host: HostKVCache, transfers: list[PageTransfer]) -> None:
    """The baseline: each page copied alone, strided across the layers (the method
    `HostKVCache.apply` replaced)."""
    for t in transfers:
        for slots, device in zip(host.slots, host.device_cache.tensors()):
            if t.to_host:
                slots[t.slot].copy_(device[:, t.page], non_blocking=True)
            else:
                device[:, t.page].copy_(slots[t.slot], non_blocking=True)


def copy_rows() -> list[list[object]]:
    """Moving COPY_PAGES pages out to the host tier and back, batched against page by page."""
    rows = []
    rng = random.Random(0)
    for name, layers, heads, dim, index_heads, index_dim in COPY_LAYOUTS:
        shapes = [(layers, COPY_POOL, BLOCK_SIZE, heads, dim)] * 2
        if index_heads:
            shapes.append((layers, COPY_POOL, BLOCK_SIZE, index_heads, index_dim))
        tensors = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for shape in shapes]
        host = HostKVCache(SimpleNamespace(k=tensors[0], tensors=lambda t=tensors: t),
                           COPY_POOL)
        page_bytes = sum(slot[0].nbytes for slot in host.slots)
        pages = rng.sample(range(COPY_POOL), COPY_PAGES)
        for slots_name, slots in (("consecutive", list(range(COPY_PAGES))),
                                  ("scattered", rng.sample(range(COPY_POOL), COPY_PAGES))):
            for direction in (True, False):
                transfers = [PageTransfer(direction, p, s) for p, s in zip(pages, slots)]
                times = {}
                for method, run in (("page by page", page_by_page),
                                    ("batched", HostKVCache.apply)):
                    samples = []
                    for _ in range(COPY_REPEATS + 1):  # the first warms the allocator up
                        torch.cuda.synchronize()
                        started = time.perf_counter()
                        run(host, transfers)
                        torch.cuda.synchronize()
                        samples.append(time.perf_counter() - started)
                    times[method] = sorted(samples[1:])[COPY_REPEATS // 2]
                gbps = COPY_PAGES * page_bytes / times["batched"] / 1e9
                rows.append([name, f"{page_bytes / 2**20:.1f}", slots_name,
                             "out (device -> host)" if direction else "in (host -> device)",
                             f"{times['page by page'] * 1e3:.2f}",
                             f"{times['batched'] * 1e3:.2f}", f"{gbps:.1f}",
                             f"{times['page by page'] / times['batched']:.1f}x"])
                print(rows[-1], flush=True)
        del host, tensors
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smol-shapes", default=None)
    parser.add_argument("--lengths", default="8192,32768")
    parser.add_argument("--device-pages", type=int, default=640)
    parser.add_argument("--copies", action="store_true",
                        help="time the host-tier copies alone (host_tier_copies_<gpu>.md)")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args()
    gpu = torch.cuda.get_device_name().split()[-1].lower()
    out_dir = Path(args.out_dir) if args.out_dir else None
    if args.copies:
        table = markdown_table(["page layout", "MiB a page", "host slots", "direction",
                                "page by page ms", "batched ms", "batched GB/s",
                                "page by page / batched"], copy_rows())
        write_results(f"host_tier_copies_{gpu}", "Host KV tier: page copies, batched against "
                      "page by page", table,
                      f"{COPY_PAGES} pages of a {COPY_POOL}-page bf16 device cache moved to or "
                      f"from pinned host slots, wall time until the GPU is done, median of "
                      f"{COPY_REPEATS}. 'page by page': each page copied alone per tensor, "
                      "strided across the layers (the method before); 'batched': "
                      "`HostKVCache.apply`.", out_dir)
        return
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
    write_results(f"host_tier_{gpu}", "Host KV tier: a prefix copied back against recomputed",
                  table, notes, out_dir)


if __name__ == "__main__":
    main()
