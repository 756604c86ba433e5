"""Serving load benchmark: prefix-aware routing vs round-robin, and the ingress overhead.

The "agentic" shape: every session re-sends a system prompt shared by all sessions, its own long
context and a conversation that grows by one exchange per turn; sessions run at a fixed
concurrency through the OpenAI HTTP API (or gRPC with --protocol grpc). In one run, on the same
model and machine:
1. two model replicas behind the prefix-aware router, then behind the baseline router
   (round-robin; --baseline power_of_two for Serve's default): TTFT / TPOT / ITL percentiles,
   throughput, prefix hit rate, replicas per session;
2. ingress overhead: time to the first token of a 1-token request through the Serve app (HTTP
   and gRPC) against the same request on an AsyncLLMEngine in this process.
Usage: python bench/serve_load.py [--sessions 8] [--turns 6] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import markdown_table, write_results  # noqa: E402
from deployments.config import AppConfig, ServeConfigFile  # noqa: E402
from deployments.local import free_port, local_stack  # noqa: E402
from deployments.proto import msa_serve_pb2 as pb  # noqa: E402
from deployments.proto.msa_serve_pb2_grpc import MSAServeStub  # noqa: E402


@dataclass
class RequestRecord:
    ttft: float
    itls: list[float] = field(default_factory=list)  # gaps between streamed pieces
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    replica: str = ""
    session: int = 0
    turn: int = 0

    @property
    def tpot(self) -> float | None:
        if self.completion_tokens < 2:
            return None
        return sum(self.itls) / (self.completion_tokens - 1)


# -- one request, by protocol -------------------------------------------------------------------
async def http_request(client: httpx.AsyncClient, model: str, prompt: list[int],
                       max_tokens: int) -> RequestRecord:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    record, last = None, start
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        replica = response.headers["x-msa-replica"]
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            now = time.perf_counter()
            if event["choices"]:
                if record is None:
                    record = RequestRecord(ttft=now - start, replica=replica)
                else:
                    record.itls.append(now - last)
                last = now
            if event.get("usage"):
                usage = event["usage"]
                record.completion_tokens = usage["completion_tokens"]
                record.prompt_tokens = usage["prompt_tokens"]
                record.cached_tokens = usage["prompt_tokens_details"]["cached_tokens"]
    return record


async def grpc_request(stub: MSAServeStub, model: str, prompt: list[int],
                       max_tokens: int) -> RequestRecord:
    request = pb.GenerateRequest(model=model, token_ids=pb.TokenIds(ids=prompt),
                                 sampling=pb.SamplingOptions(max_tokens=max_tokens,
                                                             temperature=0, ignore_eos=True))
    start = time.perf_counter()
    record, last = None, start
    async for piece in stub.Generate(request, timeout=600):
        now = time.perf_counter()
        if record is None:
            record = RequestRecord(ttft=now - start, replica=piece.replica)
        else:
            record.itls.append(now - last)
        last = now
        record.completion_tokens = piece.usage.completion_tokens
        record.prompt_tokens = piece.usage.prompt_tokens
        record.cached_tokens = piece.usage.cached_tokens
    return record


# -- the agentic load ---------------------------------------------------------------------------
def session_turns(session: int, args, vocab: int) -> list[list[int]]:
    """Prompts of one session: the shared system prompt, its own context, then one
    (previous answer, new question) exchange more per turn."""
    def tokens(rng: random.Random, count: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(count)]

    rng = random.Random(1000 + session)
    prompt = tokens(random.Random(0), args.system_tokens) + tokens(rng, args.context_tokens)
    prompts = []
    for _ in range(args.turns):
        prompt = prompt + tokens(rng, args.turn_tokens)
        prompts.append(prompt)
    return prompts


async def run_load(send, args, vocab: int, label: str) -> tuple[list[RequestRecord], float]:
    gate = asyncio.Semaphore(args.concurrency)
    records: list[RequestRecord] = []
    bar = tqdm(total=args.sessions * args.turns, desc=label, unit="req", leave=False)

    async def session(index: int) -> None:
        async with gate:
            for turn, prompt in enumerate(session_turns(index, args, vocab)):
                record = await send(prompt, args.max_tokens)
                record.session, record.turn = index, turn
                records.append(record)
                bar.update()

    start = time.perf_counter()
    await asyncio.gather(*(session(i) for i in range(args.sessions)))
    bar.close()
    return records, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summarize(records: list[RequestRecord], seconds: float) -> dict[str, float]:
    ttfts = [r.ttft for r in records]
    later = [r.ttft for r in records if r.turn > 0]
    itls = [gap for r in records for gap in r.itls]
    tpots = [r.tpot for r in records if r.tpot is not None]
    prompt = sum(r.prompt_tokens for r in records)
    return {
        "requests": len(records),
        "ttft_p50": percentile(ttfts, 50), "ttft_p90": percentile(ttfts, 90),
        "ttft_p99": percentile(ttfts, 99), "ttft_later_p50": percentile(later, 50),
        "tpot_p50": percentile(tpots, 50), "itl_p50": percentile(itls, 50),
        "itl_p99": percentile(itls, 99),
        "output_tok_s": sum(r.completion_tokens for r in records) / seconds,
        "hit_rate": sum(r.cached_tokens for r in records) / prompt if prompt else 0.0,
        "replicas_per_session": statistics.mean(
            len({r.replica for r in records if r.session == s})
            for s in {r.session for r in records}),
    }


def app_config(policy: str, args) -> AppConfig:
    return AppConfig.model_validate({
        "model": {"engine": {"model": args.model, "device": "cpu", "dtype": "float32",
                             "kv_cache_memory": args.kv_cache_memory,
                             "max_num_batched_tokens": 512},
                  "num_replicas": 2, "num_cpus": 1, "cpu_threads": 1},
        "preprocess": {"num_replicas": 1, "autoscaling": None, "num_cpus": 0},
        "ingress": {"num_cpus": 0},
        "routing": {"policy": policy},
        # Two replicas share this machine's cores with the load generator: allow slow lookups.
        "redis": {"lookup_timeout_ms": 50},
        "limits": {"max_tokens": 4096},
    })


async def first_token_latencies(send, count: int) -> list[float]:
    prompt = list(range(1000, 1016))
    await send(prompt, 1)  # warm-up
    return [(await send(prompt, 1)).ttft for _ in range(count)]


async def serve_run(policy: str, args) -> dict:
    config_file = ServeConfigFile.load()
    with local_stack(config_file, app_config(policy, args), http_port=free_port(),
                     grpc_port=free_port(), num_cpus=4) as endpoints:
        vocab = _vocab(args.model)
        async with httpx.AsyncClient(base_url=endpoints.http, timeout=600) as client, \
                grpc.aio.insecure_channel(endpoints.grpc) as channel:
            stub = MSAServeStub(channel)

            async def http_send(prompt, max_tokens):
                return await http_request(client, endpoints.model, prompt, max_tokens)

            async def grpc_send(prompt, max_tokens):
                return await grpc_request(stub, endpoints.model, prompt, max_tokens)

            send = grpc_send if args.protocol == "grpc" else http_send
            records, seconds = await run_load(send, args, vocab, policy)
            result = {"load": summarize(records, seconds)}
            if policy == "prefix_aware":  # the ingress overhead is measured once
                result["http_first_token"] = await first_token_latencies(http_send, args.probes)
                result["grpc_first_token"] = await first_token_latencies(grpc_send, args.probes)
            return result


def _vocab(model: str | None) -> int:
    from worker.checkpoint import inspect_model

    return inspect_model(model).config.vocab_size


async def direct_first_token(args) -> list[float]:
    import torch

    from worker.config import EngineConfig
    from worker.engine.async_engine import AsyncLLMEngine
    from worker.engine.llm_engine import LLMEngine
    from worker.wire import SamplingParams
    torch.set_num_threads(1)  # as each model replica runs
    engine = AsyncLLMEngine(LLMEngine(EngineConfig(model=args.model, device="cpu",
                                                   dtype="float32",
                                                   kv_cache_memory=args.kv_cache_memory)))

    async def send(prompt, max_tokens):
        start = time.perf_counter()
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        async for _ in engine.generate(prompt, params):
            return RequestRecord(ttft=time.perf_counter() - start)

    try:
        return await first_token_latencies(send, args.probes)
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    parser.add_argument("--protocol", choices=["http", "grpc"], default="http")
    parser.add_argument("--baseline", choices=["round_robin", "power_of_two"],
                        default="round_robin")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=4,
                        help="4 keeps two 1-thread CPU replicas short of saturation")
    parser.add_argument("--system-tokens", type=int, default=256, help="shared by all sessions")
    # The context-to-turn ratio of shared/workloads.md (8K context, ~200 tokens a turn), with
    # a context this machine prefills in seconds.
    parser.add_argument("--context-tokens", type=int, default=2048, help="each session's own")
    parser.add_argument("--turn-tokens", type=int, default=64, help="added per turn")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--probes", type=int, default=30, help="requests per overhead figure")
    parser.add_argument("--kv-cache-memory", default="1GiB")
    args = parser.parse_args()

    prefix = asyncio.run(serve_run("prefix_aware", args))
    default = asyncio.run(serve_run(args.baseline, args))
    direct = asyncio.run(direct_first_token(args))

    p, d = prefix["load"], default["load"]
    ms = lambda s: f"{s * 1000:.0f} ms"  # noqa: E731
    rows = [[name, fmt(p[key]), fmt(d[key]), f"{d[key] / p[key]:.2f}x" if ratio else ""]
            for name, key, fmt, ratio in [
                ("TTFT p50", "ttft_p50", ms, True), ("TTFT p90", "ttft_p90", ms, True),
                ("TTFT p99", "ttft_p99", ms, True),
                ("TTFT p50, turns 2+", "ttft_later_p50", ms, True),
                ("TPOT p50", "tpot_p50", ms, True), ("ITL p50", "itl_p50", ms, True),
                ("ITL p99", "itl_p99", ms, True),
                ("output tokens/s", "output_tok_s", lambda v: f"{v:.1f}", False),
                ("prefix hit rate", "hit_rate", lambda v: f"{v:.0%}", False),
                ("replicas per session", "replicas_per_session", lambda v: f"{v:.2f}", False)]]
    load_table = markdown_table(
        ["figure", "prefix-aware router", f"{args.baseline} router (baseline)",
         "baseline / prefix-aware"],
        rows)
    direct_p50 = statistics.median(direct)
    overhead_rows = [["AsyncLLMEngine in process (baseline)", ms(direct_p50), "", "1.00x"]]
    for name, key in [("Serve app, OpenAI HTTP", "http_first_token"),
                      ("Serve app, gRPC", "grpc_first_token")]:
        p50 = statistics.median(prefix[key])
        overhead_rows.append([name, ms(p50), f"{(p50 - direct_p50) * 1000:.1f} ms",
                              f"{p50 / direct_p50:.2f}x"])
    overhead_table = markdown_table(
        ["path (16-token prompt, 1 output token)", "first token p50", "ingress overhead p50",
         "vs baseline"], overhead_rows)
    notes = (f"Load: {args.sessions} sessions x {args.turns} turns at concurrency "
             f"{args.concurrency} over {args.protocol}; every prompt is a {args.system_tokens}-"
             f"token system prompt shared by all sessions, the session's own "
             f"{args.context_tokens}-token context and {args.turn_tokens} more tokens per turn; "
             f"{args.max_tokens} output tokens per request (ignore_eos). Two model replicas of the "
             f"default model (fp32, 1 thread each, chunked prefill of 512 tokens per step) on this "
             f"machine, with Redis, Ray and the load generator on the same 2 cores. 'turns 2+' "
             f"leaves out each session's first request, a miss under any router.\n\n## Ingress overhead\n\n{overhead_table}\n")
    write_results("serve_load_cpu", f"Serving load: prefix-aware routing vs {args.baseline}",
                  load_table, notes)


if __name__ == "__main__":
    main()
