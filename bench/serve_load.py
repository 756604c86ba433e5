"""Serving load benchmark: the routing policies on standard multi-turn and shared-prefix
workloads, two model replicas, requests arriving at a fixed rate; and the ingress overhead.

Workloads (sized for this machine):
- multi-turn (vLLM's benchmarks/multi_turn): conversations share a common prefix, each has its
  own prefix, and every turn adds the previous answer and a 120-160-token user turn;
- shared-prefix (SGLang's bench_serving --dataset-name generated-shared-prefix): groups of
  prompts, each group one system prompt, each prompt its own question.
Requests arrive as a Poisson process at --rate; a conversation's next turn is sent only after
its previous answer (an arrival takes the conversation that has been ready longest). With
--kv-cache-memory below the working set, the replicas' device caches cannot hold every
session: the memory-pressure case, where the host tier and pulls matter.

For each policy (in one run, on the same model and machine; `prefix_aware@W` is prefix_aware
with routing.prefill_weight W, to compare weights): TTFT and TPOT percentiles,
output throughput, prefix hit rate split by tier (device, host, pulled from a peer) and pulled
pages; then the ingress overhead (a 1-token request through the Serve app, HTTP and gRPC,
against an AsyncLLMEngine in this process).
Usage: python bench/serve_load.py [--workload multi-turn] [--rate 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import grpc
import httpx
import redis
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import markdown_table, write_results  # noqa: E402
from deployments.config import AppConfig, ServeConfigFile  # noqa: E402
from deployments.local import local_stack  # noqa: E402
from deployments.proto import msa_serve_pb2 as pb  # noqa: E402
from deployments.proto.msa_serve_pb2_grpc import MSAServeStub  # noqa: E402
from worker.wire import BLOCK_SIZE  # noqa: E402

POLICIES = ("prefix_aware", "prefix_cache_affinity", "round_robin", "power_of_two")


@dataclasses.dataclass
class RequestRecord:
    ttft: float
    itls: list[float] = dataclasses.field(default_factory=list)  # gaps between streamed pieces
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    replica: str = ""
    session: int = 0
    turn: int = 0
    sent_at: float = 0.0  # seconds into the run

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


# -- workloads ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Conversation:
    """A session's turns: prompt t holds every earlier prompt, an answer and a new user turn.
    Answers are filler tokens of the output length (the served answer is not read back), so
    a turn's prefix is the previous turn's prompt."""

    index: int
    prompts: list[list[int]]
    turn: int = 0


def _tokens(rng: random.Random, count: int, vocab: int) -> list[int]:
    return [rng.randrange(100, vocab) for _ in range(count)]


def multi_turn(args, vocab: int) -> list[Conversation]:
    common = _tokens(random.Random(0), args.common_prefix, vocab)
    conversations = []
    for index in range(args.conversations):
        rng = random.Random(1000 + index)
        prompt = common + _tokens(rng, args.conversation_prefix, vocab)
        prompts = []
        for turn in range(args.turns):
            if turn:
                prompt = prompt + _tokens(rng, args.max_tokens, vocab)  # the answer
            prompt = prompt + _tokens(rng, rng.randint(120, 160), vocab)  # the user turn
            prompts.append(prompt)
        conversations.append(Conversation(index, prompts))
    return conversations


def shared_prefix(args, vocab: int) -> list[Conversation]:
    """Each prompt a one-turn conversation, shuffled across groups."""
    rng = random.Random(0)
    prompts = []
    for group in range(args.groups):
        system = _tokens(random.Random(2000 + group), args.system_tokens, vocab)
        prompts += [system + _tokens(rng, args.question_tokens, vocab)
                    for _ in range(args.prompts_per_group)]
    rng.shuffle(prompts)
    return [Conversation(i, [p]) for i, p in enumerate(prompts)]


WORKLOADS = {"multi-turn": multi_turn, "shared-prefix": shared_prefix}


async def run_load(send, conversations: list[Conversation], args, label: str
                   ) -> tuple[list[RequestRecord], float]:
    """Poisson arrivals at args.rate; each takes the conversation ready the longest."""
    ready: asyncio.Queue[Conversation] = asyncio.Queue()
    for conversation in conversations:
        ready.put_nowait(conversation)
    total = sum(len(c.prompts) for c in conversations)
    records: list[RequestRecord] = []
    bar = tqdm(total=total, desc=label, unit="req", leave=False)
    rng = random.Random(42)

    async def serve_turn(conversation: Conversation) -> None:
        sent_at = time.perf_counter() - start
        record = await send(conversation.prompts[conversation.turn], args.max_tokens)
        record.session, record.turn, record.sent_at = conversation.index, conversation.turn, sent_at
        records.append(record)
        bar.update()
        conversation.turn += 1
        if conversation.turn < len(conversation.prompts):
            ready.put_nowait(conversation)

    start = time.perf_counter()
    tasks = []
    for _ in range(total):
        await asyncio.sleep(rng.expovariate(args.rate))
        tasks.append(asyncio.create_task(serve_turn(await ready.get())))
    await asyncio.gather(*tasks)
    bar.close()
    return records, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summarize(records: list[RequestRecord], seconds: float,
              figures: dict[str, int]) -> dict[str, float]:
    """Latencies and throughput from the client's records; the hit rate split by tier from the
    replicas' counters (pages copied back from host tiers, of which pulled from a peer)."""
    ttfts = [r.ttft for r in records]
    # A conversation's first turn prefills its own prefix from scratch under every router.
    later_turns = [r.ttft for r in records if r.turn > 0] or [math.nan]
    tpots = [r.tpot for r in records if r.tpot is not None]
    prompt = sum(r.prompt_tokens for r in records)
    cached = sum(r.cached_tokens for r in records)
    from_host = figures.get("kv_pages_from_host", 0) * BLOCK_SIZE
    pulled = min(figures.get("kv_pages_pulled", 0) * BLOCK_SIZE, from_host)
    return {
        "requests": len(records),
        "ttft_p50": percentile(ttfts, 50), "ttft_p90": percentile(ttfts, 90),
        "ttft_p99": percentile(ttfts, 99), "ttft_p90_later": percentile(later_turns, 90),
        "tpot_p50": percentile(tpots, 50),
        "output_tok_s": sum(r.completion_tokens for r in records) / seconds,
        "hit_rate": cached / prompt,
        "hit_device": max(0, cached - from_host) / prompt,
        "hit_host": (from_host - pulled) / prompt, "hit_pulled": pulled / prompt,
        "pulled_pages": figures.get("kv_pages_pulled", 0),
        "replicas_per_session": statistics.mean(
            len({r.replica for r in records if r.session == s})
            for s in {r.session for r in records}),
    }


def replica_figures(redis_url: str, model_key: str) -> dict[str, int]:
    """The replicas' published counters, summed."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    totals: dict[str, int] = {}
    for key in client.keys(f"msa:{model_key}:load:*"):
        for figure, value in client.hgetall(key).items():
            totals[figure] = totals.get(figure, 0) + int(value)
    return totals


def app_config(policy: str, args) -> AppConfig:
    policy, _, weight = policy.partition("@")
    routing = {"policy": policy, **({"prefill_weight": float(weight)} if weight else {})}
    return AppConfig.model_validate({
        "model": {"engine": {"model": args.model, "device": "cpu", "dtype": "float32",
                             "kv_cache_memory": args.kv_cache_memory,
                             "kv_host_memory": args.kv_host_memory,
                             "max_num_batched_tokens": 512},
                  "num_replicas": 2, "num_cpus": 1, "cpu_threads": 1},
        "preprocess": {"num_replicas": 1, "autoscaling": None, "num_cpus": 0},
        "ingress": {"num_cpus": 0},
        "routing": routing,
        # Two replicas share this machine's cores with the load generator: allow slow lookups.
        "redis": {"lookup_timeout_ms": 50},
        "limits": {"max_tokens": 4096},
    })


async def first_token_latencies(send, count: int) -> list[float]:
    prompt = list(range(100, 116))
    await send(prompt, 1)  # warm-up
    return [(await send(prompt, 1)).ttft for _ in range(count)]


async def serve_run(policy: str, args, overhead: bool) -> dict:
    config = app_config(policy, args)
    with local_stack(ServeConfigFile.load(), config, on_free_ports=True, num_cpus=4) as endpoints:
        conversations = WORKLOADS[args.workload](args, _vocab(args.model))
        async with httpx.AsyncClient(base_url=endpoints.http, timeout=600) as client, \
                grpc.aio.insecure_channel(endpoints.grpc) as channel:
            stub = MSAServeStub(channel)

            async def http_send(prompt, max_tokens):
                return await http_request(client, endpoints.model, prompt, max_tokens)

            async def grpc_send(prompt, max_tokens):
                return await grpc_request(stub, endpoints.model, prompt, max_tokens)

            send = grpc_send if args.protocol == "grpc" else http_send
            records, seconds = await run_load(send, conversations, args, policy)
            await asyncio.sleep(0.5)  # the replicas' last counters reach Redis
            figures = replica_figures(endpoints.redis.url, config.model_key)
            result = {"load": summarize(records, seconds, figures),
                      "records": [dataclasses.asdict(r) for r in records]}
            if overhead:
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


def figure_rows(loads: dict[str, dict], policies: list[str], figures) -> list[list[str]]:
    """One row per figure: each policy's value, then each other policy's against the first
    (latencies: theirs over ours; throughput: ours over theirs; above 1, the first is better)."""
    ours, others = loads[policies[0]], policies[1:]
    rows = []
    for name, key, fmt, ratio in figures:
        row = [name] + [fmt(loads[p][key]) for p in policies]
        if key == "output_tok_s":
            ratio_cells = [f"{ours[key] / loads[p][key]:.2f}x" for p in others]
        elif ratio:
            ratio_cells = [f"{loads[p][key] / ours[key]:.2f}x" for p in others]
        else:
            ratio_cells = [""] * len(others)
        rows.append(row + ratio_cells)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    parser.add_argument("--protocol", choices=["http", "grpc"], default="http")
    parser.add_argument("--policies", default=",".join(POLICIES[:3]),
                        help=f"comma-separated, the first is compared with the others: "
                             f"{', '.join(POLICIES)} (prefix_aware@W: with prefill_weight W)")
    parser.add_argument("--workload", choices=list(WORKLOADS), default="multi-turn")
    parser.add_argument("--rate", type=float, default=0.5, help="requests per second (Poisson)")
    parser.add_argument("--max-tokens", type=int, default=16, help="output tokens per request")
    multi = parser.add_argument_group("multi-turn")
    multi.add_argument("--conversations", type=int, default=8)
    multi.add_argument("--turns", type=int, default=5)
    multi.add_argument("--common-prefix", type=int, default=256, help="tokens all share")
    multi.add_argument("--conversation-prefix", type=int, default=1024,
                       help="tokens of each conversation's own prefix")
    shared = parser.add_argument_group("shared-prefix")
    shared.add_argument("--groups", type=int, default=4)
    shared.add_argument("--prompts-per-group", type=int, default=8)
    shared.add_argument("--system-tokens", type=int, default=1024)
    shared.add_argument("--question-tokens", type=int, default=128)
    parser.add_argument("--kv-cache-memory", default="192MiB",
                        help="per replica; the default holds less than the multi-turn working "
                             "set (memory pressure)")
    parser.add_argument("--kv-host-memory", default="1GiB", help="per replica")
    parser.add_argument("--probes", type=int, default=30, help="requests per overhead figure")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of every policy, in turn; the table gives medians")
    parser.add_argument("--results", default=None,
                        help="results file name (default: serve_load_cpu[_<workload>])")
    parser.add_argument("--records", type=Path, default=None,
                        help="also write every request (policy, repeat, session, turn, send "
                             "time, TTFT, replica, cached tokens) to this JSON-lines file")
    args = parser.parse_args()
    policies = args.policies.split(",")

    # Each repeat runs every policy once, in turn, so slow spells of this shared machine fall on
    # all of them; the table gives each figure's median over the repeats.
    runs: dict[str, list[dict]] = {policy: [] for policy in policies}
    probes = None
    records = []
    for repeat in tqdm(range(args.repeats), desc="repeats", disable=args.repeats == 1):
        for policy in policies:
            result = asyncio.run(serve_run(policy, args, overhead=probes is None))
            probes = probes or result
            runs[policy].append(result["load"])
            records += [{"policy": policy, "repeat": repeat + 1, **r} for r in result["records"]]
    if args.records:
        args.records.write_text("".join(json.dumps(r) + "\n" for r in records))
    loads = {policy: {key: statistics.median(run[key] for run in runs[policy])
                      for key in runs[policy][0]} for policy in policies}
    direct = asyncio.run(direct_first_token(args))

    ms = lambda s: f"{s * 1000:.0f} ms"  # noqa: E731
    share = lambda v: f"{v:.0%}"  # noqa: E731
    figures = [("TTFT p50", "ttft_p50", ms, True), ("TTFT p90", "ttft_p90", ms, True),
               ("TTFT p99", "ttft_p99", ms, True),
               *([("TTFT p90, turns after the first", "ttft_p90_later", ms, True)]
                 if args.workload == "multi-turn" else []),
               ("TPOT p50", "tpot_p50", ms, True),
               ("output tokens/s", "output_tok_s", lambda v: f"{v:.1f}", False),
               ("prefix hit rate", "hit_rate", share, False),
               ("- from the device cache", "hit_device", share, False),
               ("- from the host tier", "hit_host", share, False),
               ("- pulled from a peer", "hit_pulled", share, False),
               ("pages pulled", "pulled_pages", lambda v: f"{v:.0f}", False),
               ("replicas per session", "replicas_per_session", lambda v: f"{v:.2f}", False)]
    columns = [*policies, *(f"{p} / {policies[0]}" for p in policies[1:])]
    load_table = markdown_table(["figure", *columns], figure_rows(loads, policies, figures))
    if args.repeats > 1:
        goal_figures = [f for f in figures if f[1] in ("ttft_p50", "ttft_p90", "ttft_p90_later",
                                                       "output_tok_s")]
        per_run = [[f"{index + 1}", *row] for index in range(args.repeats)
                   for row in figure_rows({p: runs[p][index] for p in policies}, policies,
                                          goal_figures)]
        load_table += "\n\nEach repeat:\n\n" + markdown_table(["repeat", "figure", *columns],
                                                                 per_run)

    direct_p50 = statistics.median(direct)
    overhead_rows = [["AsyncLLMEngine in process (baseline)", ms(direct_p50), "", "1.00x"]]
    for name, key in [("Serve app, OpenAI HTTP", "http_first_token"),
                      ("Serve app, gRPC", "grpc_first_token")]:
        p50 = statistics.median(probes[key])
        overhead_rows.append([name, ms(p50), f"{(p50 - direct_p50) * 1000:.1f} ms",
                              f"{p50 / direct_p50:.2f}x"])
    overhead_table = markdown_table(
        ["path (16-token prompt, 1 output token)", "first token p50", "ingress overhead p50",
         "vs baseline"], overhead_rows)
    if args.workload == "multi-turn":
        shape = (f"{args.conversations} conversations x {args.turns} turns: a {args.common_prefix}"
                 f"-token prefix common to all, a {args.conversation_prefix}-token prefix of "
                 f"each conversation's own, then per turn the previous answer and a 120-160-"
                 f"token user turn. 'TTFT p90, turns after the first' leaves out each "
                 f"conversation's first request, whose own prefix no replica holds under any "
                 f"router")
    else:
        shape = (f"{args.groups} groups x {args.prompts_per_group} prompts: a "
                 f"{args.system_tokens}-token system prompt per group and a "
                 f"{args.question_tokens}-token question per prompt")
    notes = (f"Workload {args.workload}: {shape}; {args.max_tokens} output tokens per request "
             f"(ignore_eos); Poisson arrivals at {args.rate:g} requests/s over "
             f"{args.protocol}; {args.repeats} repeat(s), medians. Two model replicas of {args.model or 'the default SmolLM2'} (fp32, "
             f"1 thread each, "
             f"chunked prefill of 512 tokens per step), each with a {args.kv_cache_memory} "
             f"device KV cache and a {args.kv_host_memory} host tier, on this machine with "
             f"Redis, Ray and the load generator on the same 2 cores. Ratios: the other "
             f"policy's figure over {policies[0]}'s (throughput: {policies[0]}'s over the "
             f"other's), so above 1 means {policies[0]} is better. Hit rates split by tier come "
             f"from the replicas' counters (pages copied back from a host tier; those pulled "
             f"from a peer land there first).\n\n## Ingress overhead\n\n{overhead_table}\n")
    default_name = f"serve_load_cpu{'' if args.workload == 'multi-turn' else '_' + args.workload}"
    write_results(args.results or default_name,
                  f"Serving load: routing policies on the {args.workload} workload",
                  load_table, notes)


if __name__ == "__main__":
    main()
