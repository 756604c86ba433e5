"""Overlapped scheduling changes when the host reads tokens, never which tokens users get.

The same mixed traffic (chunked prefills, prefix-cache hits, preemptions, parallel samples,
stop strings and stop tokens, seeded sampling, logprobs, prompt logprobs, aborts) runs through
an engine with `overlap_scheduling` on and one with it off; every request's tokens, text,
finish reason, usage and logprobs must be equal, and no page may leak.
"""

from __future__ import annotations

import pytest
import torch

from tests.worker.test_engine import assert_no_pages_held, random_prompt
from worker.engine.sequence import FinishReason
from worker.wire import SamplingParams

SHARED_PREFIX = random_prompt(300, seed=99)
STOP_TOKEN_PROMPT = random_prompt(90, seed=7)


def traffic(stop_token: int) -> list[tuple[list[int], SamplingParams]]:
    """Requests whose mix covers every way a sequence starts, pauses and ends."""
    requests = [(STOP_TOKEN_PROMPT, SamplingParams(temperature=0, max_tokens=12,
                                                   stop_token_ids=(stop_token,)))]
    for i, length in enumerate((5, 60, 129, 256, 300, 401, 513, 700)):
        prompt = random_prompt(length, seed=length)
        if i % 3 == 0:
            prompt = SHARED_PREFIX + prompt[:40]  # prefix-cache hits after the first
        params = [
            SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
            SamplingParams(temperature=0.8, seed=i, max_tokens=9, logprobs=2),
            SamplingParams(temperature=0, max_tokens=30, stop=["e", "x"]),
            SamplingParams(temperature=1.0, seed=100 + i, max_tokens=7, n=2),
            SamplingParams(temperature=0, max_tokens=1),
            SamplingParams(temperature=0, max_tokens=20, prompt_logprobs=1),
        ][i % 6]
        requests.append((prompt, params))
    return requests


def run(engine, requests, abort_after: dict[int, int]) -> dict[tuple[int, int], dict]:
    """Steps the engine until every request ends; request r is aborted once `abort_after[r]`
    of its tokens were delivered. Returns each sample's delivered stream, by (request, index)."""
    ids = [engine.add_request(prompt, params) for prompt, params in requests]
    streams: dict[tuple[int, int], dict] = {}
    outputs = []
    while engine.has_unfinished_requests:
        outputs += engine.step()
        while outputs:
            out = outputs.pop(0)
            r = ids.index(out.request_id)
            stream = streams.setdefault((r, out.index), dict(
                tokens=[], text="", logprobs=[], prompt_logprobs=None))
            stream["tokens"] += out.new_token_ids
            stream["text"] += out.delta
            stream["logprobs"] += [lp.logprob for lp in out.logprobs]
            stream["prompt_logprobs"] = stream["prompt_logprobs"] or (
                [lp.logprob for lp in out.prompt_logprobs] if out.prompt_logprobs else None)
            stream.update(finished=out.finished, reason=out.finish_reason,
                          usage=(out.usage.prompt_tokens, out.usage.completion_tokens,
                                 out.usage.cached_tokens))
            if (r in abort_after and len(stream["tokens"]) >= abort_after[r]
                    and out.request_id in engine.requests):
                outputs += engine.abort(out.request_id)
        engine.block_manager.check_invariants(live_sequences=engine.live_sequences)
    return streams


def count_fed_steps(engine) -> list[int]:
    """Counts the steps that took an earlier step's tokens on the device."""
    fed_steps = [0]
    original = engine.runner._fed_tokens

    def counted(*args):
        fed = original(*args)
        fed_steps[0] += fed is not None
        return fed

    engine.runner._fed_tokens = counted
    return fed_steps


@pytest.mark.parametrize("pressure", [False, True], ids=["roomy", "preempting"])
def test_overlap_gives_the_same_outputs(make_tiny_engine, pressure):
    check_overlap_matches_serial(make_tiny_engine, pressure)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU (real asynchrony, decode graphs); the CPU variant "
                           "above checks the same bookkeeping")
@pytest.mark.parametrize("pressure", [False, True], ids=["roomy", "preempting"])
def test_overlap_on_cuda_gives_the_same_outputs(make_tiny_engine, pressure):
    check_overlap_matches_serial(make_tiny_engine, pressure, device="cuda", dtype="float32",
                                 debug_checks=False)


def check_overlap_matches_serial(make_tiny_engine, pressure: bool, **device) -> None:
    settings = dict(max_num_batched_tokens=256,
                    kv_cache_memory="1MiB" if pressure else "16MiB", **device)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    probe = make_tiny_engine(**device).generate([STOP_TOKEN_PROMPT], greedy,
                                                use_tqdm=False)[0]
    stop_token = probe.new_token_ids[3]
    serial = make_tiny_engine(overlap_scheduling=False, **settings)
    requests = traffic(stop_token)
    abort_after = {2: 3, 8: 5}
    overlapped = make_tiny_engine(overlap_scheduling=True, **settings)
    assert overlapped.overlap and not serial.overlap
    fed_steps = count_fed_steps(overlapped)
    expected = run(serial, requests, abort_after)
    got = run(overlapped, requests, abort_after)
    if pressure:
        # Which pages are still cached when a prefix comes back depends on when pages are
        # published and freed, which overlap shifts by a step: cached_tokens may differ.
        for stream in (*expected.values(), *got.values()):
            stream["usage"] = stream["usage"][:2]
    assert got.keys() == expected.keys()
    for key, stream in got.items():
        # On a GPU a row's float sums may differ in the last bits with the batch it ran in.
        for field in ("logprobs", "prompt_logprobs"):
            assert stream.pop(field) == pytest.approx(expected[key].pop(field), abs=1e-4), key
        assert stream == expected[key], key
    assert fed_steps[0] > 10, "overlapped steps must take their inputs from the device"
    if pressure:
        assert serial.stats.preemptions > 0 and overlapped.stats.preemptions > 0
    assert overlapped.stats.prompt_tokens_cached > 0
    # Usage counts the delivered tokens only, aborted or stopped early or not.
    for stream in got.values():
        assert stream["finished"] and stream["usage"][1] == len(stream["tokens"])
    reasons = {stream["reason"] for stream in got.values()}
    assert {FinishReason.ABORT, FinishReason.STOP, FinishReason.LENGTH} <= reasons
    assert overlapped.stats.generated_tokens == serial.stats.generated_tokens
    assert_no_pages_held(overlapped)


def test_length_limited_sequences_are_not_scheduled_past_their_last_token(make_tiny_engine):
    """A sequence whose unread token is its last by max_tokens takes no further step."""
    engine = make_tiny_engine(overlap_scheduling=True)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    engine.add_request(random_prompt(50, seed=1), params)
    tokens_computed = 0
    while engine.has_unfinished_requests:
        engine.step()
        tokens_computed = max(tokens_computed, engine.live_sequences[0].num_tokens
                              if engine.live_sequences else 0)
    assert tokens_computed == 50 + 3, "no token past max_tokens is computed"
    assert engine.stats.steps == 3, "the prefill and two decodes, nothing more"
