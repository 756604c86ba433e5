"""The work-counting routing cost (deployments/router.py), on replica views as Redis gives them."""

from __future__ import annotations

from deployments.config import RoutingSettings
from deployments.page_pulls import PullCosts
from deployments.prefix_index import ReplicaView
from deployments.protocol import PullHint
from deployments.router import rank_replicas

PROMPT = 10 * 128  # a 10-block prompt


def choose(views, routing=None, unpublished=None):
    ranked = rank_replicas(PROMPT, views, routing or RoutingSettings(), unpublished or {})
    return ranked[0]


def test_an_idle_holder_of_the_prefix_gets_the_request():
    best = choose({"a": ReplicaView(device_pages=8), "b": ReplicaView()})
    assert best.replica == "a" and best.pull is None and best.credited_blocks == 8


def test_a_busy_holder_loses_the_request_to_a_peer_that_pulls_its_pages():
    busy = {"prefill_tokens_queued": 6 * 128, "decode_pages": 3}
    best = choose({"a": ReplicaView(device_pages=8, load=busy), "b": ReplicaView()})
    # a: 10 - 8 + 6 + 3 = 11; b: 10 - 0.5 x 8 = 6
    assert best.replica == "b" and best.pull == PullHint("a", 8)
    assert best.cost == 6
    # Without pulls b recomputes all 10 blocks, which still beats a's 11.
    no_pulls = RoutingSettings(peer_pulls={"mode": "off"})
    best = choose({"a": ReplicaView(device_pages=8, load=busy), "b": ReplicaView()}, no_pulls)
    assert best.replica == "b" and best.pull is None and best.cost == 10


def test_host_pages_are_credited_less_than_device_pages():
    views = {"a": ReplicaView(device_pages=4), "b": ReplicaView(device_pages=2, host_pages=4)}
    # Peers credited nothing: a has 4 blocks credited, b 2 + host_credit x 4.
    richer = RoutingSettings(host_credit=1.0, peer_credit=0.0)
    assert choose(views, richer).replica == "b"
    poorer = RoutingSettings(host_credit=0.25, peer_credit=0.0)
    assert choose(views, poorer).replica == "a"


def test_prefill_sent_since_the_last_published_figures_counts():
    views = {"a": ReplicaView(device_pages=2), "b": ReplicaView(device_pages=2)}
    assert choose(views, unpublished={"a": 3.0}).replica == "b"
    assert choose(views, unpublished={"b": 3.0}).replica == "a"


def test_peer_pages_are_credited_what_the_puller_measured_its_pulls_save():
    busy = {"prefill_tokens_queued": 6 * 128, "decode_pages": 3}  # a costs 11 (see above)
    # b's pulls have saved 90% of recomputing: 10 - 0.9 x 8 = 2.8, and it pulls.
    views = {"a": ReplicaView(device_pages=8, load=busy),
             "b": ReplicaView(load={"pull_credit_pct": 90})}
    best = choose(views)
    assert best.replica == "b" and best.pull == PullHint("a", 8)
    assert abs(best.cost - 2.8) < 1e-9
    # b's pulls have cost as much as recomputing: no hint, and its 10 blocks still beat a's 11.
    views["b"] = ReplicaView(load={"pull_credit_pct": 0})
    best = choose(views)
    assert best.replica == "b" and best.pull is None and best.cost == 10
    # With a less busy, a keeps its session: 10 - 8 + 2 = 4 against b's 10.
    views["a"] = ReplicaView(device_pages=8, load={"prefill_tokens_queued": 2 * 128})
    assert choose(views).replica == "a"


def test_pull_costs_follow_the_pulls_made_and_recover_after_failures():
    now = [0.0]
    costs = PullCosts(recompute_s_per_page=0.010, pull_s_per_page=0.001, clock=lambda: now[0])
    assert costs.pull_is_cheaper and abs(costs.credit - 0.9) < 1e-9
    costs.observe(10, 0.03)  # 3 ms a page: 1 + 0.3 x (3 - 1) = 1.6 ms
    assert abs(costs.pull_s_per_page - 0.0016) < 1e-9
    for _ in range(5):  # a peer that times out: 2 s lost, then 10 pages recomputed
        costs.observe_failure(10, 2.0)
    assert not costs.pull_is_cheaper and costs.credit == 0
    # No pulls while they look dear; the estimate drifts back to the first one.
    now[0] += 20 * PullCosts.RECOVERY_HALF_LIFE_S
    assert costs.pull_is_cheaper and abs(costs.credit - 0.9) < 1e-3
