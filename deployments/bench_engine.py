"""Engine-level measurements shared by `msa-serve bench-engine` and `bench/engine.py`."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from worker.engine.llm_engine import LLMEngine
from worker.wire import SamplingParams


def random_prompts(vocab_size: int, num: int, min_len: int, max_len: int,
                   seed: int = 0) -> list[list[int]]:
    """Token-id prompts of uniformly random lengths (special ids below 20 avoided)."""
    rng = random.Random(seed)
    return [[rng.randrange(20, vocab_size) for _ in range(rng.randint(min_len, max_len))]
            for _ in range(num)]


@dataclass
class ThroughputResult:
    seconds: float
    output_tokens: int
    prompt_tokens: int

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def offline_throughput(engine: LLMEngine, prompts: list[list[int]],
                       output_tokens: int) -> ThroughputResult:
    params = SamplingParams(temperature=0, max_tokens=output_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = engine.generate(prompts, params, use_tqdm=True)
    seconds = time.perf_counter() - start
    return ThroughputResult(seconds, sum(len(o.new_token_ids) for o in outputs),
                            sum(len(p) for p in prompts))


def time_to_first_token(engine: LLMEngine, prompt: list[int]) -> float:
    """Seconds from add_request to the first generated token (the request runs alone)."""
    start = time.perf_counter()
    request_id = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=1,
                                                           ignore_eos=True))
    while request_id in engine.requests:
        engine.step()
    return time.perf_counter() - start


def shared_prefix_ttft(engine: LLMEngine, prefix_tokens: int, new_tokens: int,
                       seed: int = 1) -> tuple[float, float]:
    """(TTFT when the prefix is cached, TTFT when it is not), same prompt shape."""
    vocab = engine.model_config.vocab_size
    prefix, cold_prefix = random_prompts(vocab, 2, prefix_tokens, prefix_tokens, seed)
    suffix_a, suffix_b, suffix_c = random_prompts(vocab, 3, new_tokens, new_tokens, seed + 1)
    time_to_first_token(engine, prefix + suffix_a)  # fills the cache with the prefix
    cached = time_to_first_token(engine, prefix + suffix_b)
    uncached = time_to_first_token(engine, cold_prefix + suffix_c)
    return cached, uncached


def run_engine_benchmark(engine: LLMEngine, num_requests: int, prompt_tokens: int,
                         output_tokens: int) -> None:
    prompts = random_prompts(engine.model_config.vocab_size, num_requests, prompt_tokens // 2,
                             prompt_tokens)
    result = offline_throughput(engine, prompts, output_tokens)
    print(f"offline: {num_requests} requests, {result.prompt_tokens} prompt tokens, "
          f"{result.output_tokens} output tokens in {result.seconds:.1f}s = "
          f"{result.output_tokens_per_s:.1f} output tok/s")
    cached, uncached = shared_prefix_ttft(engine, prefix_tokens=2000, new_tokens=64)
    print(f"TTFT, 2000-token prefix + 64 new: cached {cached * 1000:.0f} ms, "
          f"uncached {uncached * 1000:.0f} ms ({uncached / cached:.1f}x)")
