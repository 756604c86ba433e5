"""The serving application's settings: the `args` of the app in `serve_config.yaml`.

`serve deploy serve_config.yaml`, `msa-serve up` and the Helm chart all read this one schema, so
a typo in any of them fails at start with pydantic's message naming the field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from preprocess import MediaConfig
from worker.config import EngineConfig, parse_bytes

API_KEYS_ENV = "MSA_SERVE_API_KEYS"
DEFAULT_SERVE_CONFIG = Path(__file__).with_name("serve_config.yaml")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Autoscaling(_Strict):
    """Ray Serve autoscaling bounds; replicas follow the ongoing requests per replica."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas "
                             f"({self.max_replicas})")
        return self


class Replicas(_Strict):
    """How many copies of a deployment run, and what each one reserves from Ray."""

    num_replicas: int | None = Field(1, ge=1, description="fixed count; null with autoscaling")
    autoscaling: Autoscaling | None = None
    num_cpus: float = Field(1, ge=0)
    num_gpus: float = Field(0, ge=0)
    max_ongoing_requests: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _one_scaling_mode(self):
        if self.autoscaling is not None:
            self.num_replicas = None
        elif self.num_replicas is None:
            raise ValueError("set num_replicas or autoscaling")
        return self

    def deployment_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
        }
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.model_dump()
        else:
            options["num_replicas"] = self.num_replicas
        return options


class ModelDeployment(Replicas):
    engine: EngineConfig = Field(default_factory=EngineConfig)
    cpu_threads: int | None = Field(None, ge=1, description="torch threads per replica on CPU")
    stuck_step_timeout_s: float = Field(
        600, gt=0, description="a replica whose engine step runs longer than this fails its "
                               "health check and is replaced (a long step is not a failure)")

    def deployment_options(self) -> dict[str, Any]:
        """A replica spanning engine.tensor_parallel_size GPUs reserves them all on one node
        (STRICT_PACK): its own bundle first, then one per other rank (`RankWorker`s)."""
        options = super().deployment_options()
        ranks = self.engine.tensor_parallel_size
        if ranks > 1:
            def bundle(cpus: float, gpus: float) -> dict[str, float]:
                return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}

            options["placement_group_bundles"] = (
                [bundle(self.num_cpus, self.num_gpus)]
                + [bundle(1, 1 if self.num_gpus else 0)] * (ranks - 1))
            options["placement_group_strategy"] = "STRICT_PACK"
        return options


class PreprocessDeployment(Replicas):
    # Autoscaling on ongoing requests per replica is scaling on the preprocess queue's length.
    num_cpus: float = Field(0.5, ge=0)
    autoscaling: Autoscaling | None = Field(default_factory=Autoscaling)
    media: MediaConfig = Field(default_factory=MediaConfig)


class IngressDeployment(Replicas):
    num_cpus: float = Field(0.5, ge=0)
    max_ongoing_requests: int = Field(1024, ge=1)


class RedisSettings(_Strict):
    """Where prefix-cache metadata lives. url null = no Redis: routing by load alone."""

    url: str | None = "redis://127.0.0.1:6379/0"
    key_prefix: str = "msa"
    heartbeat_s: float = Field(2.0, gt=0)
    ttl_s: float = Field(10.0, gt=0, description="a silent replica's entries expire after this")
    lookup_timeout_ms: float = Field(5.0, gt=0, description="slower lookups route by load alone")
    flush_interval_ms: float = Field(50.0, gt=0)

    @model_validator(mode="after")
    def _ttl_outlives_heartbeat(self):
        if self.ttl_s <= self.heartbeat_s:
            raise ValueError(f"ttl_s ({self.ttl_s}) must exceed heartbeat_s ({self.heartbeat_s})")
        return self


class PeerPulls(_Strict):
    """A replica sent a request whose prefix another replica holds pulls those pages instead of
    recomputing them (into its host tier: `kv_host_memory` must be set)."""

    # auto: when moving the pages is measured to cost less than computing them; always: for
    # every hint the router gives; off: never (the router then credits peers nothing).
    mode: Literal["auto", "always", "off"] = "auto"
    timeout_s: float = Field(2.0, gt=0, description="a slower pull is abandoned: the request "
                                                     "recomputes the prefix")


class RoutingSettings(_Strict):
    # prefix_aware: the replica that costs least, counting the request's uncached prefill, the
    # prefill queued there and the KV its decodes read (the form of NVIDIA Dynamo's KV router);
    # prefix_cache_affinity: Ray Serve LLM's PrefixCacheAffinityRouter, fed our token ids;
    # power_of_two: Serve's default (the shorter queue of two random replicas); round_robin:
    # each replica in turn.
    policy: Literal["prefix_aware", "prefix_cache_affinity", "power_of_two",
                    "round_robin"] = "prefix_aware"
    prefill_weight: float = Field(
        1.0, ge=0, description="weight of a 128-token block of prefill against a block of KV "
                               "that a replica's decodes read each step")
    host_credit: float = Field(0.75, ge=0, le=1, description="a prefix page in a replica's "
                                                             "host tier, against one on device")
    peer_credit: float = Field(0.5, ge=0, le=1, description="a prefix page another replica "
                                                            "holds, which this one can pull, "
                                                            "until this one has measured its "
                                                            "pulls (peer_pulls.mode auto)")
    peer_pulls: PeerPulls = Field(default_factory=PeerPulls)


class Limits(_Strict):
    max_body_bytes: int | None = Field(
        None, ge=1024, description="largest request body; null = sized for the model: 64MiB "
                                   "with a vision tower (media arrive inline as data: URLs), "
                                   "else what the longest prompt that fits the context takes")
    max_tokens: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(256, ge=1)

    @field_validator("max_body_bytes", mode="before")
    @classmethod
    def _parse_size(cls, value):
        return None if value is None else parse_bytes(value)

    def body_bytes(self, max_prompt_bytes: int, has_vision: bool) -> int:
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        if has_vision:
            return 64 * 2**20
        # JSON may escape each byte of text as \uXXXX (6 bytes); the rest of a body is small.
        return 6 * max_prompt_bytes + 2**20


class AppConfig(_Strict):
    """Everything the msa-serve application needs; the `args` of its entry in serve_config.yaml."""

    model: ModelDeployment = Field(default_factory=ModelDeployment)
    preprocess: PreprocessDeployment = Field(default_factory=PreprocessDeployment)
    ingress: IngressDeployment = Field(default_factory=IngressDeployment)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    limits: Limits = Field(default_factory=Limits)
    api_keys: list[str] = Field(default_factory=list, description=f"bearer tokens; also read "
                                                                  f"from ${API_KEYS_ENV}")

    def resolved_api_keys(self) -> frozenset[str]:
        from_env = os.environ.get(API_KEYS_ENV, "")
        return frozenset(self.api_keys) | {k.strip() for k in from_env.split(",") if k.strip()}

    def with_model(self, engine: dict[str, Any] | None = None, **deployment: Any) -> AppConfig:
        """This config with fields of model.engine and of the model deployment replaced (the
        CLI's --model, --tensor-parallel-size; a benchmark's topk), validated as the file is."""
        raw = self.model.model_dump()
        model = ModelDeployment.model_validate(
            raw | deployment | {"engine": raw["engine"] | (engine or {})})
        return self.model_copy(update={"model": model})

    @property
    def model_key(self) -> str:
        """Names this model's Redis keys; replicas and routers derive it the same way."""
        engine = self.model.engine
        return engine.served_model_name or (Path(engine.model).stem if engine.model else "default")


class ServeConfigFile(BaseModel):
    """The parts of a Ray Serve config file msa-serve reads (the rest is Serve's own)."""

    model_config = ConfigDict(extra="allow")

    http_options: dict[str, Any] = Field(default_factory=dict)
    grpc_options: dict[str, Any] = Field(default_factory=dict)
    applications: list[dict[str, Any]]

    @classmethod
    def load(cls, path: str | Path = DEFAULT_SERVE_CONFIG) -> ServeConfigFile:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ValueError(f"cannot read serve config {path}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ValueError(f"{path} is not valid YAML: {exc}") from exc
        return cls.model_validate(raw)

    def app(self, name: str | None = None) -> dict[str, Any]:
        """The msa-serve application entry (by name, or the only one)."""
        apps = [a for a in self.applications if name is None or a.get("name") == name]
        if len(apps) != 1:
            raise ValueError(f"expected one application{f' named {name!r}' if name else ''} "
                             f"in the serve config, found {len(apps)}")
        return apps[0]

    def app_config(self, name: str | None = None) -> AppConfig:
        return AppConfig.model_validate(self.app(name).get("args") or {})
