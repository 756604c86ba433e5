"""serve_config.yaml is valid, and bad settings fail at start with a message naming the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deployments.app import router_config
from deployments.config import DEFAULT_SERVE_CONFIG, AppConfig, ServeConfigFile


def test_shipped_serve_config_is_valid_and_wires_the_grpc_service():
    config_file = ServeConfigFile.load(DEFAULT_SERVE_CONFIG)
    app = config_file.app_config()
    assert config_file.app()["import_path"] == "deployments.app:build_app"
    assert config_file.grpc_options["grpc_servicer_functions"] == [
        "deployments.proto.msa_serve_pb2_grpc.add_MSAServeServicer_to_server"]
    assert (config_file.http_options["port"], config_file.grpc_options["port"]) == (8000, 9000)
    assert app.routing.policy == "prefix_aware"
    assert app.redis.lookup_timeout_ms == 5
    options = app.model.deployment_options()
    assert options["num_replicas"] == 1 and options["ray_actor_options"]["num_gpus"] == 0
    assert "autoscaling_config" in app.preprocess.deployment_options()


def test_router_config_follows_the_policy():
    prefix = router_config(AppConfig())
    assert prefix.request_router_class.endswith("PrefixAwareRouter")
    assert prefix.request_router_kwargs["model_key"] == "default"
    assert "PowerOfTwo" in router_config(
        AppConfig(routing={"policy": "power_of_two"})).request_router_class
    assert router_config(AppConfig(routing={"policy": "round_robin"})).request_router_class \
        .endswith("RoundRobinRouter")
    assert router_config(AppConfig(routing={"policy": "prefix_cache_affinity"})) \
        .request_router_class.endswith("PrefixCacheAffinityBaseline")


@pytest.mark.parametrize("args, field", [
    ({"model": {"num_replicas": 0}}, "num_replicas"),
    ({"model": {"engine": {"dtype": "int3"}}}, "dtype"),
    ({"preprocess": {"autoscaling": {"min_replicas": 5, "max_replicas": 2}}}, "max_replicas"),
    ({"redis": {"heartbeat_s": 10, "ttl_s": 5}}, "ttl_s"),
    ({"limits": {"max_body_bytes": "lots"}}, "max_body_bytes"),
    ({"routing": {"policy": "random"}}, "policy"),
    ({"modle": {}}, "modle"),
])
def test_bad_settings_name_the_field(args, field):
    with pytest.raises(ValidationError) as err:
        AppConfig.model_validate(args)
    assert field in str(err.value)


def test_api_keys_come_from_config_and_environment(monkeypatch):
    monkeypatch.setenv("MSA_SERVE_API_KEYS", "env-a, env-b")
    assert AppConfig(api_keys=["cfg"]).resolved_api_keys() == {"cfg", "env-a", "env-b"}


def test_body_limit_is_sized_for_the_model():
    """null (the shipped default): 64 MiB for vision models, else what the longest prompt that
    fits the context can take as JSON; an explicit value wins."""
    limits = ServeConfigFile.load(DEFAULT_SERVE_CONFIG).app_config().limits
    assert limits.max_body_bytes is None
    assert limits.body_bytes(300_000, has_vision=False) == 6 * 300_000 + 2**20
    assert limits.body_bytes(300_000, has_vision=True) == 64 * 2**20
    assert AppConfig.model_validate({"limits": {"max_body_bytes": "2MiB"}}).limits.body_bytes(
        300_000, has_vision=True) == 2 * 2**20
