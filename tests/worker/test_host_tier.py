"""The host-memory KV tier and page exchange between replicas, on the tiny MSA checkpoint."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.worker.test_engine import assert_no_pages_held, random_prompt
from worker.engine.page_exchange import PageExchange
from worker.errors import PageTransferError
from worker.prefix_hash import chain_page_hashes
from worker.wire import BLOCK_SIZE, PageEvent, PagePayload, SamplingParams

SCORED = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=5)


@pytest.fixture
def make_tiered_engine(make_tiny_engine):
    """An engine whose device cache holds `device_pages` pages and whose host tier holds
    `host_pages`; page events go to `engine.events`."""

    def make(device_pages: int, host_pages: int, **overrides):
        size = make_tiny_engine(kv_cache_memory="1MiB").page_bytes
        events: list[PageEvent] = []
        engine = make_tiny_engine(kv_cache_memory=device_pages * size,
                                  kv_host_memory=host_pages * size, **overrides)
        engine.block_manager.listener = events.append
        engine.block_manager.host.listener = events.append
        engine.events = events
        return engine

    return make


def same_scores(a, b, device: str = "cpu") -> None:
    """Equal tokens, and logprobs (with their top-5 alternatives) equal to fp32 rounding (on a
    GPU the kernels' dot products run in TF32: a cached prefix takes another kernel path)."""
    assert a.new_token_ids == b.new_token_ids
    atol = 1e-5 if device == "cpu" else 2e-3
    for x, y in zip(a.logprobs, b.logprobs, strict=True):
        assert [t for t, _ in x.top] == [t for t, _ in y.top]
        np.testing.assert_allclose([v for _, v in x.top], [v for _, v in y.top], atol=atol)


ON_CUDA = pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                        reason="needs a CUDA device (pinned memory, copies "
                                               "on the stream)")])


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlapped"])
@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
def test_evicted_prefix_comes_back_from_the_host_tier(make_tiered_engine, make_tiny_engine,
                                                      overlap, device):
    """A 5-page prefix pushed out of an 8-page device cache by other prompts moves to the host
    tier; asked for again it is copied back, not recomputed: same logits as computing it, its
    tokens reported cached, and the host tier never holds more than its bound."""
    engine = make_tiered_engine(device_pages=8, host_pages=16, overlap_scheduling=overlap,
                                device=device)
    session = random_prompt(5 * BLOCK_SIZE + 20, seed=1)
    first = engine.generate([session], SCORED, use_tqdm=False)[0]
    for seed in range(2, 5):  # three more 5-page prompts: the session's pages are evicted
        engine.generate([random_prompt(5 * BLOCK_SIZE + 3, seed)], SCORED, use_tqdm=False)
    hashes = engine.block_manager._cached  # noqa: SLF001 - which tier holds what
    session_hashes = chain_of(engine, session)
    assert not any(h in hashes for h in session_hashes), "the device cache still holds it"
    assert all(h in engine.block_manager.host for h in session_hashes)
    assert any(e.tier == "host" and e.kind == "stored" for e in engine.events)

    computed_before = engine.stats.prompt_tokens_computed
    again = engine.generate([session], SCORED, use_tqdm=False)[0]
    assert again.usage.cached_tokens == 5 * BLOCK_SIZE
    assert engine.stats.prompt_tokens_computed - computed_before == 20
    assert engine.block_manager.num_pages_from_host == 5
    same_scores(again, first, device)
    fresh = make_tiny_engine(enable_prefix_caching=False, device=device).generate(
        [session], SCORED, use_tqdm=False)[0]
    same_scores(again, fresh, device)

    host = engine.block_manager.host
    assert len(host) <= host.num_slots == 16
    assert sum(t.nbytes for t in engine.host_cache.slots) <= engine.config.kv_host_memory
    assert_no_pages_held(engine)


def chain_of(engine, prompt):
    full = (len(prompt) - 1) // BLOCK_SIZE * BLOCK_SIZE
    return chain_page_hashes(prompt[:full], engine.block_manager.salt)


def test_host_tier_evicts_least_recent_pages_within_its_bound(make_tiered_engine):
    engine = make_tiered_engine(device_pages=6, host_pages=4)
    for seed in range(6):
        engine.generate([random_prompt(4 * BLOCK_SIZE + 5, seed)], SCORED, use_tqdm=False)
        assert len(engine.block_manager.host) <= 4
    removed = [h for e in engine.events if e.tier == "host" and e.kind == "removed"
               for h in e.hashes]
    assert removed, "a full host tier must evict"
    assert not any(h in engine.block_manager.host for h in removed[-1:])
    assert_no_pages_held(engine)


@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
def test_pages_pulled_from_a_peer_give_the_same_tokens(make_tiered_engine, device):
    """Replica A exports a session's pages; B imports them into its host tier and answers the
    session from them: same logits as computing the prompt, the pages counted as pulled."""
    holder = make_tiered_engine(device_pages=16, host_pages=8, device=device)
    puller = make_tiered_engine(device_pages=16, host_pages=8, device=device)
    session = random_prompt(4 * BLOCK_SIZE + 9, seed=7)
    original = holder.generate([session], SCORED, use_tqdm=False)[0]
    hashes = chain_of(holder, session)
    payloads = holder.page_exchange.export(hashes)
    assert [p.page_hash for p in payloads] == hashes
    result = puller.page_exchange.import_(hashes, payloads)
    assert (result.accepted, result.present, result.refused) == (4, 0, 0)
    assert puller.load_figures()["kv_pages_pulled"] == 4
    again = puller.generate([session], SCORED, use_tqdm=False)[0]
    assert again.usage.cached_tokens == 4 * BLOCK_SIZE
    same_scores(again, original, device)
    # Importing what it holds already copies nothing.
    assert puller.page_exchange.import_(hashes, payloads).present == 4


def test_a_page_whose_bytes_do_not_match_is_refused_and_recomputed(make_tiered_engine):
    holder = make_tiered_engine(device_pages=16, host_pages=8)
    puller = make_tiered_engine(device_pages=16, host_pages=8)
    session = random_prompt(4 * BLOCK_SIZE + 9, seed=8)
    original = holder.generate([session], SCORED, use_tqdm=False)[0]
    hashes = chain_of(holder, session)
    payloads = holder.page_exchange.export(hashes)
    flipped = payloads[2].arrays[0].copy()
    flipped[100] ^= 0xFF
    payloads[2] = dataclasses.replace(payloads[2], arrays=(flipped, *payloads[2].arrays[1:]))
    result = puller.page_exchange.import_(hashes, payloads)
    # Page 2 is refused, and page 3 with it: it is usable only after page 2.
    assert (result.accepted, result.refused) == (2, 2)
    assert puller.load_figures()["kv_pages_refused"] == 2
    again = puller.generate([session], SCORED, use_tqdm=False)[0]
    assert again.usage.cached_tokens == 2 * BLOCK_SIZE
    same_scores(again, original)
    # A page of another layout (another model, another split) is refused too.
    short = dataclasses.replace(payloads[0], arrays=payloads[0].arrays[:1])
    assert puller.page_exchange.import_(hashes[:1], [short]).refused == 1


class _RankThatCannotStore:
    """Stands in for a tensor-parallel replica's other rank whose host tier fails a write."""

    ranks = [None]

    def write_pages(self, request, shards):
        raise PageTransferError("rank 1 could not store its shard")


def test_pages_a_rank_could_not_store_are_forgotten_and_recomputed(make_tiered_engine):
    """Under tensor parallelism a page is usable only with every rank's shard: when one rank
    fails to store its shards the pull fails, and none of its pages stays in the host index."""
    holder = make_tiered_engine(device_pages=16, host_pages=8)
    puller = make_tiered_engine(device_pages=16, host_pages=8)
    session = random_prompt(4 * BLOCK_SIZE + 9, seed=9)
    holder.generate([session], SCORED, use_tqdm=False)
    hashes = chain_of(holder, session)
    # Two ranks' shards, as a split holder sends them.
    payloads = [PagePayload.of(p.page_hash, p.arrays * 2)
                for p in holder.page_exchange.export(hashes)]
    split = PageExchange(puller.block_manager, puller.host_cache, _RankThatCannotStore())
    with pytest.raises(PageTransferError, match="could not store"):
        split.import_(hashes, payloads)
    host = puller.block_manager.host
    assert len(host) == 0 and not any(h in host for h in hashes)
    host.check_invariants()
    again = puller.generate([session], SCORED, use_tqdm=False)[0]
    assert again.usage.cached_tokens == 0
