"""GPU benchmark of the MSA kernels against dense attention and the bandwidth/MMA ceilings.

Shapes from shared/workloads.md: the M3-like per-GPU shard (Hq 16, Hkv 2) and the full layer
(Hq 64, Hkv 4), D = Di = 128, one shared index-key head, topk 16, bf16. Every figure is a median
of CUDA-event timings (triton.testing.do_bench) over inputs rotated so each call reads data
that is not in L2. Ceilings (device-to-device copy bandwidth, bf16 matmul rate) are measured in
the same run.

Usage (on a CUDA machine): python bench/kernels.py [--out-dir DIR] [--quick]
                           [--only decode|prefill|flex]
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import kernels  # noqa: E402
from bench.common import markdown_table, write_results  # noqa: E402
from kernels import (  # noqa: E402
    index_scoring,
    prefill_kv_major,
    prefill_query_tiled,
    query_major,
)

PAGE = 128
TOPK = 16
L2_ROTATION_BYTES = 512 << 20  # rotate among input sets until each call's data is out of L2


@dataclass(frozen=True)
class Heads:
    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int = 128
    index_dim: int = 128


SHARD = Heads("shard Hq16/Hkv2", 16, 2)
FULL = Heads("full Hq64/Hkv4", 64, 4)


def bench(fn, rep_ms: int = 200) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median") / 1e3


def ceilings() -> tuple[float, float]:
    """(copy bandwidth B/s counting read + write, bf16 matmul FLOP/s) on random data."""
    src = torch.randn(1 << 30, dtype=torch.bfloat16, device="cuda")  # 2 GiB
    dst = torch.empty_like(src)
    copy_s = bench(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_s = bench(lambda: a @ b)
    return 2 * src.numel() * 2 / copy_s, 2 * 8192**3 / mm_s


class PagedInputs:
    """One set of paged caches + queries for a batch of (q_len, seq_len) sequences."""

    def __init__(self, heads: Heads, seq_lens: list[int], q_lens: list[int], seed: int,
                 table_pages: int = 0):
        """table_pages: a block table at least this wide (a CUDA graph's is as wide as the
        longest context it serves)."""
        g = torch.Generator(device="cuda").manual_seed(seed)
        pages = [math.ceil(n / PAGE) for n in seq_lens]
        num_pages = sum(pages)
        perm = torch.randperm(num_pages, generator=g, device="cuda").to(torch.int32)
        self.block_table = torch.zeros(len(seq_lens), max(max(pages), table_pages),
                                       dtype=torch.int32, device="cuda")
        offset = 0
        for b, n in enumerate(pages):
            self.block_table[b, :n] = perm[offset:offset + n]
            offset += n

        def rand(*shape):
            return torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16)

        total_q = sum(q_lens)
        self.q = rand(total_q, heads.num_heads, heads.head_dim)
        self.q_idx = rand(total_q, heads.num_kv_heads, heads.index_dim)
        self.k_cache = rand(num_pages, PAGE, heads.num_kv_heads, heads.head_dim)
        self.v_cache = rand(num_pages, PAGE, heads.num_kv_heads, heads.head_dim)
        self.k_idx_cache = rand(num_pages, PAGE, 1, heads.index_dim)
        self.k_idx_fp8 = kernels.to_index_key_dtype(self.k_idx_cache, kernels.INDEX_KEY_FP8)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
        cu = [0]
        for n in q_lens:
            cu.append(cu[-1] + n)
        self.cu_seqlens_q = torch.tensor(cu, dtype=torch.int32, device="cuda")
        self.layout = (self.block_table, self.seq_lens, self.cu_seqlens_q)
        self.bytes = sum(t.numel() * t.element_size() for t in
                         (self.q, self.k_cache, self.v_cache, self.k_idx_cache))

    # check_indices=False: as the engine calls them on CUDA (no device syncs, graph-capturable).
    def select(self, fp8: bool = False):
        keys = self.k_idx_fp8 if fp8 else self.k_idx_cache
        return kernels.select_blocks(self.q_idx, keys, *self.layout, topk=TOPK,
                                     backend="triton", check_indices=False)

    def scan(self, fp8: bool = False):
        """The index-scoring half of `select` alone (the bandwidth-bound scan)."""
        keys = self.k_idx_fp8 if fp8 else self.k_idx_cache
        return index_scoring.index_block_scores(self.q_idx, keys, *self.layout)

    def attend(self, blocks):
        return kernels.sparse_attention(self.q, self.k_cache, self.v_cache, *self.layout, blocks,
                                        backend="triton", check_indices=False)

    def attend_with(self, impl, blocks):
        """One attention kernel forced (the public function dispatches between them)."""
        return impl.sparse_attention(self.q, self.k_cache, self.v_cache, *self.layout, blocks)


def rotated(make, per_set_bytes: int, max_sets: int = 6) -> list:
    count = max(1, min(max_sets, math.ceil(L2_ROTATION_BYTES / max(per_set_bytes, 1))))
    return [make(seed) for seed in range(count)]


def time_rotating(sets: list, fn) -> float:
    state = {"i": 0}

    def step():
        fn(sets[state["i"] % len(sets)])
        state["i"] += 1

    return bench(step)


def graph_time(sets: list, fn) -> float:
    """Median time of fn replayed as one captured CUDA graph per input set (no launch gaps)."""
    graphs = []
    for inputs in sets:
        fn(inputs)  # compile and warm up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(inputs)
        graphs.append(graph)
    return time_rotating(graphs, lambda graph: graph.replay())


def replay_floor() -> tuple[float, float]:
    """Seconds a CUDA-graph replay of 1, and of 4 chained, one-element kernels takes: the floor
    under a decode step (a chain of 4 kernels: scan, rule, attention, merge), bytes aside."""
    counter = torch.zeros(1, device="cuda")
    return tuple(graph_time([counter], lambda c, n=n: [c.add_(1) for _ in range(n)])
                 for n in (1, 4))


def decode_inputs(heads: Heads, contexts: list[int], q_len: int, alike: bool,
                  table_pages: int = 0) -> list:
    """Rotated input sets of a decode step with their selections (`.blocks`). alike: the q_len
    tokens of a request share one index query, so they choose the same blocks, as a trained
    model's consecutive (speculative) tokens mostly do; otherwise random picks are unrelated."""
    q_lens = [q_len] * len(contexts)
    per_set = sum(contexts) * (2 * heads.num_kv_heads * heads.head_dim + heads.index_dim) * 2
    sets = rotated(lambda s: PagedInputs(heads, contexts, q_lens, s, table_pages), per_set)
    for s in sets:
        if alike:
            s.q_idx = s.q_idx[q_len - 1::q_len].repeat_interleave(q_len, dim=0).contiguous()
        s.blocks = s.select()
    return sets


def selected_pages(blocks: torch.Tensor, q_len: int) -> int:
    """Distinct (request, KV group, page) picks: the K/V pages a step must read once each."""
    requests = torch.arange(blocks.shape[0], device=blocks.device) // q_len
    groups = torch.arange(blocks.shape[1], device=blocks.device)
    keys = (requests[:, None, None] * blocks.shape[1] + groups[None, :, None]) * (1 << 24) + blocks
    return torch.unique(keys[blocks >= 0]).numel()


def graph_step_figures(sets: list, heads: Heads, index_tokens: int, q_len: int,
                       copy_bw: float) -> list[tuple[float, float, float]]:
    """A decode step replayed as a CUDA graph, bf16 then fp8 index keys: (step seconds, step
    over its bandwidth ideal, the index scan's share of copy bandwidth) each. The ideal moves
    every index key once and each selected K/V page of a request's group once (however many
    of its tokens chose it)."""
    pages = selected_pages(sets[0].blocks, q_len)
    kv_bytes = pages * PAGE * heads.head_dim * 2 * 2
    figures = []
    for fp8 in (False, True):
        t_step = graph_time(sets, lambda s, fp8=fp8: s.attend(s.select(fp8=fp8)))
        t_scan = graph_time(sets, lambda s, fp8=fp8: s.scan(fp8=fp8))
        index_bytes = index_tokens * heads.index_dim * (1 if fp8 else 2)
        figures.append((t_step, t_step * copy_bw / (index_bytes + kv_bytes),
                        index_bytes / t_scan / copy_bw))
    return figures


def step_columns(t_step: float, ratio: float, scan_share: float, vs_dense: float | None = None,
                 ) -> list[str]:
    return ([f"{t_step * 1e6:.0f}"] + ([] if vs_dense is None else [f"{vs_dense:.2f}x"])
            + [f"{ratio:.2f}", f"{scan_share:.0%}"])


def decode_case(heads: Heads, batch: int, context: int, q_len: int, copy_bw: float,
                alike: bool = False) -> list:
    sets = decode_inputs(heads, [context] * batch, q_len, alike)
    t_select = time_rotating(sets, lambda s: s.select())
    t_attend = time_rotating(sets, lambda s: s.attend(s.blocks))
    t_step = time_rotating(sets, lambda s: s.attend(s.select()))
    bf16, fp8 = graph_step_figures(sets, heads, batch * context, q_len, copy_bw)
    del sets

    # Dense baseline: SDPA over contiguous K/V (the most favourable layout for it).
    def dense_set(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)

        def rand(*shape):
            return torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16)

        return (rand(batch, heads.num_heads, q_len, heads.head_dim),
                rand(batch, heads.num_kv_heads, context, heads.head_dim),
                rand(batch, heads.num_kv_heads, context, heads.head_dim))

    dense_bytes = batch * context * 2 * heads.num_kv_heads * heads.head_dim * 2
    dense_sets = rotated(dense_set, dense_bytes)
    t_dense = time_rotating(dense_sets, lambda s: F.scaled_dot_product_attention(
        *s, enable_gqa=True))
    del dense_sets
    return [heads.name, decode_label(batch, context, q_len, alike),
            f"{t_dense * 1e6:.0f}", f"{t_select * 1e6:.0f}", f"{t_attend * 1e6:.0f}",
            f"{t_step * 1e6:.0f}", *step_columns(*bf16, t_dense / bf16[0]),
            *step_columns(*fp8, t_dense / fp8[0])]


def mixed_decode_case(heads: Heads, contexts: list[int], table_pages: int, label: str,
                      copy_bw: float) -> list:
    """A decode step over rows of unlike contexts, or in a block table wider than its rows
    need (a CUDA graph's): the index scan must still keep every SM streaming."""
    sets = decode_inputs(heads, contexts, 1, False, table_pages)
    bf16, fp8 = graph_step_figures(sets, heads, sum(contexts), 1, copy_bw)
    del sets
    return [heads.name, label, *step_columns(*bf16), *step_columns(*fp8)]


def decode_label(batch: int, context: int, q_len: int, alike: bool) -> str:
    tokens = f" x q{q_len}" + (" alike" if alike else "") if q_len > 1 else ""
    return f"{batch} x {context // 1024}K{tokens}"


def multi_token_case(heads: Heads, batch: int, context: int, q_len: int, alike: bool) -> list:
    """Multi-token decode attention: the dispatched query-tiled kernel (a tile per request,
    each chosen page loaded once for all its tokens) against query-major (once per token)."""
    sets = decode_inputs(heads, [context] * batch, q_len, alike)
    t_query_major = graph_time(sets, lambda s: s.attend_with(query_major, s.blocks))
    t_dispatched = graph_time(sets, lambda s: s.attend(s.blocks))
    per_request = selected_pages(sets[0].blocks, q_len) / (batch * heads.num_kv_heads)
    return [heads.name, decode_label(batch, context, q_len, alike), f"{per_request:.0f}",
            f"{t_query_major * 1e6:.0f}", f"{t_dispatched * 1e6:.0f}",
            f"{t_query_major / t_dispatched:.2f}x"]


def dense_time(heads: Heads, q_len: int, seq_len: int) -> float:
    """The dense baseline: flash SDPA, causal with bottom-right alignment (queries after the
    prefix), every query head with its own K/V."""
    from torch.nn.attention.bias import causal_lower_right

    q = torch.randn(1, heads.num_heads, q_len, heads.head_dim, dtype=torch.bfloat16,
                    device="cuda")
    k = torch.randn(1, heads.num_heads, seq_len, heads.head_dim, dtype=torch.bfloat16,
                    device="cuda")
    v = torch.randn_like(k)
    mask = causal_lower_right(q_len, seq_len)
    return bench(functools.partial(F.scaled_dot_product_attention, q, k, v, attn_mask=mask),
                 rep_ms=400)


def prefill_case(heads: Heads, chunks: list[tuple[int, int]], label: str) -> list:
    """chunks: (new query tokens, cached prefix tokens) per sequence."""
    q_lens = [q for q, _ in chunks]
    seq_lens = [q + p for q, p in chunks]
    inputs = PagedInputs(heads, seq_lens, q_lens, seed=0)
    blocks = inputs.select()
    # Replayed as CUDA graphs: a short chunk's few hundred microseconds of kernels would
    # otherwise be timed as the host's launch overhead, which varies run to run.
    inputs.blocks = blocks
    sets = [inputs]
    t_select = graph_time(sets, lambda s: s.select())
    t_query_major = graph_time(sets, lambda s: s.attend_with(query_major, s.blocks))
    t_kv_major = graph_time(sets, lambda s: s.attend_with(prefill_kv_major, s.blocks))
    t_tiled = graph_time(sets, lambda s: s.attend_with(prefill_query_tiled, s.blocks))
    t_attend = graph_time(sets, lambda s: s.attend(s.blocks))
    # Achieved rate over the selected blocks: 4 * D flops per (query head, visible key).
    visible = sum(min(TOPK * PAGE, p + q) * q for q, p in chunks)  # upper bound on keys/row
    t_best = min(t_kv_major, t_tiled)
    tflops = 4 * heads.head_dim * heads.num_heads * visible / t_best / 1e12
    del inputs, blocks, sets  # free the paged inputs before the dense baseline allocates
    t_dense = sum(dense_time(heads, q_len, seq_len) for q_len, seq_len in zip(q_lens, seq_lens))
    t_msa = t_select + t_attend
    return [heads.name, label, f"{t_dense * 1e3:.2f}", f"{t_select * 1e3:.2f}",
            f"{t_query_major * 1e3:.2f}", f"{t_kv_major * 1e3:.2f}", f"{t_tiled * 1e3:.2f}",
            f"{t_query_major / t_kv_major:.2f}x", f"{t_query_major / t_tiled:.2f}x",
            f"{tflops:.0f}", f"{t_attend * 1e3:.2f}", f"{t_dense / t_msa:.2f}x"]


def flex_case(heads: Heads, length: int, mma: float) -> list:
    """A fresh prompt where every 128-query block keeps one selection (that of its last query),
    handed to our dispatched sparse attention and to FlexAttention as the same block mask:
    selected history blocks as full blocks, the query block's own block as a causal one."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    inputs = PagedInputs(heads, [length], [length], seed=0)
    num_blocks = length // PAGE
    coarse = inputs.select()[torch.arange(num_blocks, device="cuda") * PAGE + PAGE - 1]
    ours_blocks = coarse.repeat_interleave(PAGE, 0)  # [length, Hkv, topk]
    t_ours = bench(functools.partial(inputs.attend, ours_blocks), rep_ms=400)
    t_tiled = bench(functools.partial(inputs.attend_with, prefill_query_tiled, ours_blocks),
                    rep_ms=400)
    ours = inputs.attend(ours_blocks)
    # Exact count of the keys attended: the chosen history blocks whole, the own block up to
    # the query (4 * D flops per query head and key).
    history = ((ours_blocks >= 0).sum(-1) - 1).clamp(min=0)  # [length, Hkv]
    own = torch.arange(length, device="cuda") % PAGE + 1
    keys = int((history * PAGE + own[:, None]).sum()) * (heads.num_heads // heads.num_kv_heads)
    tflops = 4 * heads.head_dim * keys / t_tiled / 1e12

    # FlexAttention reads contiguous [1, H, L, D] tensors: the paged K/V in logical order.
    pages = inputs.block_table[0, :num_blocks].long()

    def contiguous(cache):
        return cache[pages].reshape(length, heads.num_kv_heads, heads.head_dim).transpose(0, 1)[None]

    q = inputs.q.transpose(0, 1)[None]
    k, v = contiguous(inputs.k_cache), contiguous(inputs.v_cache)
    group = heads.num_heads // heads.num_kv_heads
    own = torch.arange(num_blocks, device="cuda")[:, None, None]
    history = (coarse >= 0) & (coarse != own)  # selected blocks come first in each row

    def per_head(t):  # [Q blocks, Hkv, n] -> [1, Hq, Q blocks, n], padded to all KV blocks
        t = t.permute(1, 0, 2).repeat_interleave(group, 0)[None]
        return torch.nn.functional.pad(t, (0, num_blocks - t.shape[-1])).to(torch.int32)

    block_mask = BlockMask.from_kv_blocks(
        per_head(torch.ones_like(own).expand(-1, heads.num_kv_heads, 1))[..., 0],
        per_head(own.expand(-1, heads.num_kv_heads, 1)),
        per_head(history.sum(-1, keepdim=True))[..., 0],
        per_head(torch.where(history, coarse, 0)),
        BLOCK_SIZE=PAGE, mask_mod=lambda b, h, q_idx, kv_idx: q_idx >= kv_idx)
    flex = torch.compile(flex_attention)
    run_flex = functools.partial(flex, q, k, v, block_mask=block_mask, enable_gqa=True)
    theirs = run_flex()[0].transpose(0, 1)
    difference = float((theirs.float() - ours.float()).norm() / ours.float().norm())
    t_flex = bench(run_flex, rep_ms=400)
    t_select = bench(inputs.select, rep_ms=400)
    del inputs, ours_blocks, q, k, v, block_mask, run_flex, ours, theirs
    t_dense = dense_time(heads, length, length)
    return [heads.name, f"{length // 1024}K prompt", f"{t_flex * 1e3:.2f}",
            f"{t_ours * 1e3:.2f}", f"{t_flex / t_ours:.2f}x", f"{t_tiled * 1e3:.2f}",
            f"{t_flex / t_tiled:.2f}x", f"{tflops:.0f} ({tflops * 1e12 / mma:.0%})",
            f"{difference:.1e}", f"{t_dense * 1e3:.2f}", f"{t_select * 1e3:.2f}",
            f"{t_dense / (t_select + t_ours):.2f}x"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-dir", default=None, help="where to write kernels_<gpu>.md")
    parser.add_argument("--quick", action="store_true", help="a few cases only")
    parser.add_argument("--only", choices=["decode", "prefill", "flex"], default=None)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "bench/kernels.py needs a CUDA GPU"
    torch.manual_seed(0)
    copy_bw, mma = ceilings()
    floor_one, floor_chain = replay_floor()
    print(f"ceilings: copy {copy_bw / 1e12:.2f} TB/s, bf16 matmul {mma / 1e12:.0f} TFLOP/s; "
          f"graph replay floor {floor_one * 1e6:.1f} us (1 kernel), {floor_chain * 1e6:.1f} us (4)",
          flush=True)

    decode_cases = [(SHARD, 8, 4096, 1), (SHARD, 64, 4096, 1), (SHARD, 8, 32768, 1),
                    (SHARD, 32, 32768, 1), (SHARD, 8, 131072, 1), (SHARD, 1, 1 << 20, 1),
                    (FULL, 8, 131072, 1), (SHARD, 8, 32768, 8), (SHARD, 8, 32768, 8, True)]
    if not args.quick:
        decode_cases += [(SHARD, 32, 4096, 1), (SHARD, 128, 4096, 1), (SHARD, 64, 32768, 1),
                         (SHARD, 32, 131072, 1), (FULL, 32, 32768, 1)]
    if args.only in ("prefill", "flex"):
        decode_cases = []
    decode_rows = []
    for heads, batch, context, q_len, *alike in decode_cases:
        decode_rows.append(decode_case(heads, batch, context, q_len, copy_bw, *alike))
        print(" | ".join(decode_rows[-1]), flush=True)
        torch.cuda.empty_cache()
    mixed_rows = []
    for heads, contexts, table_pages, label in ([] if args.only in ("prefill", "flex") else [
            (FULL, [131072, 65536, 32768, 16384, 8192, 4096, 4096, 4096], 0,
             "8 rows, 128K down to 4K"),
            (SHARD, [262144, 131072] + [32768] * 6 + [4096] * 8 + [1024] * 16, 0,
             "32 rows, 256K down to 1K"),
            (SHARD, [4096] * 8, 1024, "8 x 4K, table 128K wide"),
            (SHARD, [32768] * 32, 1024, "32 x 32K, table 128K wide")]):
        mixed_rows.append(mixed_decode_case(heads, contexts, table_pages, label, copy_bw))
        print(" | ".join(mixed_rows[-1]), flush=True)
        torch.cuda.empty_cache()
    multi_token_rows = []
    for heads, batch, context, q_len, alike in ([] if args.only in ("prefill", "flex") else [
            (SHARD, 8, 32768, 8, False), (SHARD, 8, 32768, 8, True), (SHARD, 32, 32768, 4, True),
            (FULL, 8, 131072, 4, True), (SHARD, 64, 4096, 2, True)]):
        multi_token_rows.append(multi_token_case(heads, batch, context, q_len, alike))
        print(" | ".join(multi_token_rows[-1]), flush=True)
        torch.cuda.empty_cache()

    prefill_cases = [(SHARD, [(171, 55_000)], "171 + 55K prefix"),
                     (SHARD, [(1626, 91_000)], "1,626 + 91K"),
                     (SHARD, [(9844, 39_000)], "9,844 + 39K"),
                     (SHARD, [(16384, 68_000)], "16,384 + 68K"),
                     (SHARD, [(350, 55_000)] * 8, "8 x (350 + 55K)")]
    if not args.quick:
        prefill_cases += [(SHARD, [(16384, 158_000)], "16,384 + 158K"),
                          (FULL, [(16384, 68_000)], "16,384 + 68K"),
                          (SHARD, [(512, 30_000)], "512 + 30K"),
                          (SHARD, [(1024, 30_000)], "1,024 + 30K"),
                          (SHARD, [(4096, 30_000)], "4,096 + 30K"),
                          (SHARD, [(131_072, 0)], "plain 128K prompt")]
    if args.only in ("decode", "flex"):
        prefill_cases = []
    prefill_rows = []
    for heads, chunks, label in prefill_cases:
        prefill_rows.append(prefill_case(heads, chunks, label))
        print(" | ".join(prefill_rows[-1]), flush=True)
        torch.cuda.empty_cache()

    flex_rows = []
    for length in ([] if args.only in ("decode", "prefill") else [32768, 131072]):
        flex_rows.append(flex_case(SHARD, length, mma))
        print(" | ".join(flex_rows[-1]), flush=True)
        torch.cuda.empty_cache()

    decode_table = markdown_table(
        ["shape", "batch x context", "dense SDPA (us)", "select (us)", "attend (us)",
         "MSA step eager (us)", "MSA step graph (us)", "graph vs dense",
         "graph / bandwidth ideal", "index scan (graph) % of copy BW",
         "fp8 index keys: step graph (us)", "fp8 vs dense", "fp8 / bandwidth ideal",
         "fp8 index scan % of copy BW"],
        decode_rows)
    mixed_table = markdown_table(
        ["shape", "rows", "MSA step graph (us)", "graph / bandwidth ideal",
         "index scan (graph) % of copy BW", "fp8 index keys: step graph (us)",
         "fp8 / bandwidth ideal", "fp8 index scan % of copy BW"], mixed_rows)
    multi_token_table = markdown_table(
        ["shape", "batch x context x tokens", "K/V pages a request's group needs",
         "query-major: per token (us)", "dispatched: query-tiled per request (us)",
         "dispatched vs query-major"], multi_token_rows)
    prefill_table = markdown_table(
        ["shape", "chunk", "dense flash SDPA (ms)", "select (ms)", "query-major (ms)",
         "KV-major (ms)", "query-tiled (ms)", "KV-major vs query-major",
         "query-tiled vs query-major", "best TFLOP/s (selected)", "dispatched attend (ms)",
         "MSA (select + dispatched attend) vs dense"], prefill_rows)
    flex_table = markdown_table(
        ["shape", "case", "FlexAttention (ms)", "msa-serve dispatched attend (ms)",
         "vs FlexAttention", "query-tiled (ms)", "query-tiled vs FlexAttention",
         "query-tiled TFLOP/s (share of matmul)", "output rel. difference",
         "dense flash SDPA (ms)", "select (ms)", "MSA (select + dispatched attend) vs dense"],
        flex_rows)
    name = torch.cuda.get_device_name()
    gpu = next((kind for kind in ("h100", "h200") if kind in name.lower()), "gpu")
    sections = [("Decode", decode_table, decode_rows),
                ("Decode over unlike contexts, and in a CUDA graph's wide block table",
                 mixed_table, mixed_rows),
                ("Multi-token decode attention (CUDA graph)", multi_token_table,
                 multi_token_rows), ("Prefill (chunk after a cached prefix)",
                                                        prefill_table, prefill_rows),
                ("Against FlexAttention (same per-query-block selection)", flex_table,
                 flex_rows)]
    notes = (f"Ceilings measured in this run: device-to-device copy {copy_bw / 1e12:.2f} TB/s "
             f"(read + write), bf16 matmul {mma / 1e12:.0f} TFLOP/s; a CUDA-graph replay of "
             f"one one-element kernel takes {floor_one * 1e6:.1f} us, of 4 chained "
             f"{floor_chain * 1e6:.1f} us (the floor under a decode step's chain of 4 kernels, "
             f"bytes aside). topk {TOPK}, block {PAGE}, "
             "bf16, one shared index-key head. 'MSA step' = select_blocks + sparse_attention "
             "(Triton), eager and replayed as a CUDA graph. 'graph / bandwidth ideal' = graph "
             "step time over (index keys + each selected K/V page of a request's group once) / copy "
             "bandwidth ('alike': a request's tokens share one index query; unlike contexts: "
             "the sum of theirs); 'index scan' = "
             "the scoring kernel alone (select minus the top-k rule). 'best TFLOP/s' "
             "(the faster of KV-major and query-tiled) counts 4*D flops per (query head, "
             "selected key), keys per row capped at topk*128; "
             "compare it with the matmul ceiling above. 'fp8 index keys': the same step with the "
             "index-key cache in float8_e4m3fn (kernels.to_index_key_dtype), its ideal counting "
             "1 byte per index-key element. Prefill times are CUDA-graph replays (GPU time, "
             "no host launch overhead); the FlexAttention table is timed eagerly on both sides "
             "(its milliseconds of GPU work hide the launches). "
             "FlexAttention: torch.compile'd flex_attention on "
             "contiguous K/V with a BlockMask holding the same blocks per 128-query block; "
             "its TFLOP/s count the keys each query attends exactly. Random inputs make "
             "unrelated selections (the prefill table, KV-major's case); the FlexAttention "
             "table's shared ones are what a trained model's neighbouring queries choose "
             "(query-tiled), so its last column is the prefill speedup to expect there.")
    body = "\n\n".join(f"## {title}\n\n{table}" for title, table, rows in sections if rows)
    write_results(f"kernels_{args.only}_{gpu}" if args.only else f"kernels_{gpu}",
                  "MSA kernels on GPU", body, notes,
                  directory=Path(args.out_dir) if args.out_dir else None)


if __name__ == "__main__":
    main()
