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

PREFIX_AWARE_ROUTER = "deployments.router:PrefixAwareRouter"
ROUND_ROBIN_ROUTER = "deployments.router:RoundRobinRouter"


def router_config(config: AppConfig) -> RequestRouterConfig:
    if config.routing.policy == "power_of_two":
        return RequestRouterConfig()
    if config.routing.policy == "round_robin":
        return RequestRouterConfig(request_router_class=ROUND_ROBIN_ROUTER)
    return RequestRouterConfig(
        request_router_class=PREFIX_AWARE_ROUTER,
        request_router_kwargs={"redis": config.redis.model_dump(), "model_key": config.model_key,
                               "load_penalty_tokens": config.routing.load_penalty_tokens})


def build_app(args: dict[str, Any]):
    """Validates the app's args (AppConfig) and binds the three deployments."""
    config = AppConfig.model_validate(args)
    raw = config.model_dump(mode="json")
    model = ModelServer.options(request_router_config=router_config(config),
                                **config.model.deployment_options()).bind(raw)
    preprocessor = Preprocessor.options(**config.preprocess.deployment_options()).bind(raw)
    return Ingress.options(**config.ingress.deployment_options()).bind(preprocessor, model, raw)
