"""Ports for our servers come from outside the ranges Ray and the kernel hand out, and a busy
one is passed over."""

from __future__ import annotations

import random
import socket

from worker import ports


def test_free_port_lies_between_rays_worker_ports_and_the_ephemeral_range():
    start = ports.ephemeral_ports_start()
    for _ in range(20):
        port = ports.free_port()
        assert ports.RAY_WORKER_PORTS_END <= port < start
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # still free: nothing kept it


def test_free_ports_never_repeat_a_port(monkeypatch):
    first, second = ports.free_ports(2)
    picks = iter([first, first, first, second])  # the same pick again while the first is held
    monkeypatch.setattr(random.SystemRandom, "choice", lambda self, seq: next(picks))
    assert ports.free_ports(2) == [first, second]


def test_free_port_passes_over_a_port_someone_listens_on(monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", ports.free_port()))
        busy.listen()
        taken = busy.getsockname()[1]
        picks = iter([taken, taken, taken + 1 if taken + 1 != ports.ephemeral_ports_start()
                      else taken - 1])
        monkeypatch.setattr(random.SystemRandom, "choice", lambda self, seq: next(picks))
        port = ports.free_port()
    assert port != taken
    assert abs(port - taken) == 1
