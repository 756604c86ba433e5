"""Free TCP ports for the servers msa-serve starts beside Ray: Serve's HTTP and gRPC proxies in
`msa-serve up` and the tests, redis-server, the tensor-parallel rendezvous. Torch-free."""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Ray's processes take random ports from the kernel's ephemeral range up to 65535, and its
# workers take ports the kernel hands out (ray.init) or 10002-19999 (`ray start`'s default). A
# port picked in those ranges can be taken by Ray between our pick and our server's bind: Serve's
# proxy once failed to bind that way in CI. The ports between the two ranges are left to us.
RAY_WORKER_PORTS_END = 20000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_EPHEMERAL_START_ELSEWHERE = 32768  # Linux's default, and below macOS's 49152
_TRIES = 200


def ephemeral_ports_start() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return _EPHEMERAL_START_ELSEWHERE


def free_port(host: str = "127.0.0.1") -> int:
    """A port no one listens on now, outside the ranges that Ray and the kernel hand out."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free ports: each stays bound while the next is picked, so none repeats."""
    # A kernel configured to hand out ports below Ray's worker range leaves us none: then port 0,
    # the kernel's pick.
    ours = range(RAY_WORKER_PORTS_END, ephemeral_ports_start()) or range(1)
    held: list[socket.socket] = []
    try:
        while len(held) < count:
            held.append(_bind_one(host, ours))
        return [sock.getsockname()[1] for sock in held]
    finally:
        for sock in held:
            sock.close()


def _bind_one(host: str, ours: range) -> socket.socket:
    """A socket bound to a free port in `ours`."""
    pick = random.SystemRandom()
    for _ in range(_TRIES):
        sock = socket.socket()
        try:
            sock.bind((host, pick.choice(ours)))
            return sock
        except OSError:
            sock.close()
    raise OSError(f"no free TCP port on {host or 'any address'} in {ours.start}-{ours.stop - 1} "
                  f"after {_TRIES} tries")
