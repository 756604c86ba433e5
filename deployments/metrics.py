"""Prometheus metrics of an ingress process (the router runs there too), served at /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()

REQUESTS = Counter("msa_requests", "Requests by API and outcome",
                   ["api", "status"], registry=REGISTRY)
TTFT = Histogram("msa_time_to_first_token_seconds", "Arrival to first token", ["api"],
                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                 registry=REGISTRY)
TPOT = Histogram("msa_time_per_output_token_seconds", "Mean gap between a request's tokens",
                 ["api"], buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2),
                 registry=REGISTRY)
TOKENS = Counter("msa_tokens", "Tokens by kind (prompt, cached = prompt tokens served from the "
                 "prefix cache, completion)", ["kind"], registry=REGISTRY)
PREFIX_HIT_RATE = Gauge("msa_prefix_hit_rate", "Cached prompt tokens / prompt tokens so far",
                        registry=REGISTRY)
ROUTING_DECISIONS = Counter("msa_routing_decisions", "Model-replica choices by reason (prefix, "
                            "pull, load, redis_unavailable)", ["reason"], registry=REGISTRY)
REPLICA_LOAD = Gauge("msa_replica_load", "Load figures each model replica publishes "
                     "(LLMEngine.load_figures: queues, KV pages by tier, pages copied back "
                     "from the host tier, pulled from peers and refused)",
                     ["replica", "figure"], registry=REGISTRY)


_prompt_totals = {"prompt": 0, "cached": 0}  # the hit rate's numerator and denominator


def record_usage(prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> None:
    TOKENS.labels(kind="prompt").inc(prompt_tokens)
    TOKENS.labels(kind="cached").inc(cached_tokens)
    TOKENS.labels(kind="completion").inc(completion_tokens)
    _prompt_totals["prompt"] += prompt_tokens
    _prompt_totals["cached"] += cached_tokens
    if _prompt_totals["prompt"]:
        PREFIX_HIT_RATE.set(_prompt_totals["cached"] / _prompt_totals["prompt"])


def set_replica_loads(loads: dict[str, dict[str, int]]) -> None:
    """Every live replica's figures (from Redis): replicas not listed are gone."""
    REPLICA_LOAD.clear()
    for replica, figures in loads.items():
        set_replica_load(replica, figures)


def set_replica_load(replica: str, figures: dict[str, int]) -> None:
    """One replica's figures, as it reported them with a request's last chunk."""
    for figure, value in figures.items():
        REPLICA_LOAD.labels(replica=replica, figure=figure).set(value)
