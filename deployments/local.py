"""`msa-serve up`: the whole stack on one machine, from the same serve_config.yaml.

Starts a `redis-server` on a free loopback port, a local Ray, Serve's HTTP and gRPC proxies and
the application; prints where to reach it; on Ctrl-C (or SIGTERM) stops Serve, Ray and Redis.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis

from deployments.config import DEFAULT_SERVE_CONFIG, AppConfig, ServeConfigFile
from worker.ports import free_port, free_ports

logger = logging.getLogger(__name__)


class LocalStackError(RuntimeError):
    """A local component (redis-server, Ray, Serve) could not start; the message says why."""


@dataclass
class LocalRedis:
    """A throwaway redis-server: loopback only, nothing persisted."""

    process: subprocess.Popen
    port: int
    directory: tempfile.TemporaryDirectory

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls, port: int | None = None, timeout_s: float = 10.0) -> LocalRedis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise LocalStackError("redis-server is not installed: `make run` installs it "
                                  "(apt-get install redis-server), or set redis.url to a "
                                  "running Redis")
        port = port or free_port()
        directory = tempfile.TemporaryDirectory(prefix="msa-redis-")
        process = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
             "--appendonly", "no", "--dir", directory.name, "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        server = cls(process, port, directory)
        client = redis.Redis(port=port, socket_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise LocalStackError(f"redis-server exited: {process.stderr.read().decode()}")
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    return server
            time.sleep(0.05)
        server.stop()
        raise LocalStackError(f"redis-server did not answer on port {port} in {timeout_s}s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.directory.cleanup()


@dataclass
class Endpoints:
    http: str
    grpc: str
    model: str
    redis: LocalRedis | None


@contextlib.contextmanager
def local_stack(config_file: ServeConfigFile, app: AppConfig, http_port: int | None = None,
                grpc_port: int | None = None, num_cpus: int | None = None,
                http_host: str | None = None,
                on_free_ports: bool = False) -> Iterator[Endpoints]:
    """Runs the application on a local Ray until the block exits; tears everything down.

    on_free_ports: Serve's proxies listen on two free ports instead (tests and benchmarks, which
    may run beside a server on the config's ports)."""
    import ray
    from ray import serve

    from deployments.app import build_app

    redis_server = LocalRedis.start() if app.redis.url else None  # the config's URL is replaced
    if redis_server is not None:
        app = app.model_copy(update={"redis": app.redis.model_copy(
            update={"url": redis_server.url})})
    http_options = {**config_file.http_options}
    grpc_options = {**config_file.grpc_options}
    if on_free_ports:
        http_port, grpc_port = free_ports(2)
    if http_port is not None:
        http_options["port"] = http_port
    if http_host is not None:
        http_options["host"] = http_host
    if grpc_port is not None:
        grpc_options["port"] = grpc_port
    entry = config_file.app()
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        serve.start(http_options=http_options, grpc_options=grpc_options)
        serve.run(build_app(app.model_dump(mode="json")), name=entry.get("name", "msa-serve"),
                  route_prefix=entry.get("route_prefix", "/"))
        host = http_options.get("host", "127.0.0.1")
        yield Endpoints(http=f"http://{host}:{http_options.get('port', 8000)}",
                        grpc=f"127.0.0.1:{grpc_options.get('port', 9000)}",
                        model=_served_name(app), redis=redis_server)
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        with contextlib.suppress(Exception):
            ray.shutdown()
        if redis_server is not None:
            redis_server.stop()


def _served_name(app: AppConfig) -> str:
    from worker.checkpoint import inspect_model

    return inspect_model(app.model.engine.model, app.model.engine.served_model_name).name


def banner(endpoints: Endpoints, keyed: bool) -> str:
    """What `msa-serve up` prints once serving; with API keys on, the examples send one."""
    header = " -H \"Authorization: Bearer $KEY\"" if keyed else ""
    key_flag = " --api-key \"$KEY\"" if keyed else ""
    return (f"\nmsa-serve is up: model {endpoints.model}\n"
            f"  OpenAI HTTP  {endpoints.http}/v1   (metrics {endpoints.http}/metrics)\n"
            f"  gRPC         {endpoints.grpc}   (msa_serve.v1.MSAServe)\n\n"
            + ("API keys are on: set KEY to one of them first.\n" if keyed else "")
            + f"Try:\n  curl {endpoints.http}/v1/chat/completions{header} -H 'Content-Type: "
            f"application/json' \\\n    -d '{{\"model\": \"{endpoints.model}\", \"messages\": "
            f"[{{\"role\": \"user\", \"content\": \"What is the capital of France?\"}}]}}'\n"
            f"  msa-serve client chat 'What is the capital of France?' --target "
            f"{endpoints.grpc}{key_flag}\n\nCtrl-C stops everything.")


def up(config_path: str | Path = DEFAULT_SERVE_CONFIG, engine_overrides: dict | None = None,
       http_port: int | None = None, grpc_port: int | None = None,
       http_host: str | None = None) -> None:
    """The embedded default: serve until Ctrl-C. engine_overrides replace fields of the
    config's model.engine (the CLI's --model, --tensor-parallel-size, ...)."""
    config_file = ServeConfigFile.load(config_path)
    app = config_file.app_config().with_model(engine_overrides)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print("starting redis-server, Ray and Serve (the first start takes a minute) ...",
          flush=True)
    with local_stack(config_file, app, http_port, grpc_port, http_host=http_host) as endpoints:
        print(banner(endpoints, keyed=bool(app.resolved_api_keys())), flush=True)
        stop.wait()
        print("\nshutting down ...", flush=True)
