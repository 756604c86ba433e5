"""The Ray Serve application: `import_path: deployments.app:build_app` in serve_config.yaml.

    Ingress (HTTP + gRPC) --> Preprocessor (CPU: templating, tokens, page hashes)
                          --> ModelServer (engine replicas, chosen by the prefix-aware router)
"""

from __future__ import annotations

from typing import Any

from ray.serve.config import RequestRouterConfig

from deployments.config import AppConfig
from deployments.ingress import Ingress
from deployments.model_server import ModelServer
from deployments.preprocessor import Preprocessor

ROUTERS = {"prefix_aware": "deployments.router:PrefixAwareRouter",
           "prefix_cache_affinity": "deployments.affinity_router:PrefixCacheAffinityBaseline",
           "power_of_two": "deployments.router:PowerOfTwoRouter",
           "round_robin": "deployments.router:RoundRobinRouter"}


def router_config(config: AppConfig) -> RequestRouterConfig:
    policy = config.routing.policy
    kwargs = {}
    if policy == "prefix_aware":
        kwargs = {"redis": config.redis.model_dump(), "model_key": config.model_key,
                  "routing": config.routing.model_dump()}
    return RequestRouterConfig(request_router_class=ROUTERS[policy],
                               request_router_kwargs=kwargs)


def build_app(args: dict[str, Any]):
    """Validates the app's args (AppConfig) and binds the three deployments."""
    config = AppConfig.model_validate(args)
    raw = config.model_dump(mode="json")
    model = ModelServer.options(request_router_config=router_config(config),
                                **config.model.deployment_options()).bind(raw)
    preprocessor = Preprocessor.options(**config.preprocess.deployment_options()).bind(raw)
    return Ingress.options(**config.ingress.deployment_options()).bind(preprocessor, model, raw)
