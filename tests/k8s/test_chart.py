"""The Helm chart, offline: Helm itself lints and renders it, every manifest is schema-checked.

Built-in kinds are validated with kubernetes-validate's Kubernetes schemas, the RayService against
KubeRay's own CRD (k8s/crds), and the rendered serveConfigV2 through the application's AppConfig.
"""

from __future__ import annotations

from pathlib import Path

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml

from deployments.config import DEFAULT_SERVE_CONFIG, AppConfig

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "k8s" / "msa-serve"
PRODUCTION = yaml.safe_load((ROOT / "k8s/examples/values-production.yaml").read_text())
KUBERNETES_VERSION = "1.35.0"
BUILT_IN = {"StatefulSet", "Service", "Ingress", "PodDisruptionBudget"}


@pytest.fixture(scope="module")
def chart():
    loaded = helm_python.Chart.load(CHART)
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def rayservice_schema():
    crd = yaml.safe_load((ROOT / "k8s/crds/ray.io_rayservices.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]


def render(chart, values: dict | None = None) -> list[dict]:
    chart.validate_schema(values or {})
    files = chart.render(values or {}, name="msa", namespace="llm", is_install=True)
    docs = []
    for path, text in sorted(files.items()):
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def validate(docs: list[dict], rayservice_schema) -> list[str]:
    kinds = []
    for doc in docs:
        kind = doc["kind"]
        kinds.append(kind)
        if kind in BUILT_IN:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        elif kind == "RayService":
            assert doc["apiVersion"] == "ray.io/v1"
            jsonschema.validate(doc, rayservice_schema)
        elif kind == "ServiceMonitor":  # the Prometheus Operator's CRD is not available offline
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            assert doc["spec"]["endpoints"][0] == {"port": "http", "path": "/metrics",
                                                   "interval": "30s"}
        else:
            raise AssertionError(f"unexpected kind {kind}")
    return sorted(kinds)


def serve_config(docs: list[dict]) -> dict:
    service = next(d for d in docs if d["kind"] == "RayService")
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def test_helm_lint_passes_with_default_and_production_values():
    for values in ({}, PRODUCTION):
        report = helm_python.lint(CHART, values, strict=True, kube_version=f"v{KUBERNETES_VERSION}")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not problems and not report["errors"], (problems, report["errors"])


def test_default_install_renders_valid_manifests(chart, rayservice_schema):
    docs = render(chart)
    assert validate(docs, rayservice_schema) == [
        "PodDisruptionBudget", "PodDisruptionBudget", "RayService", "Service", "StatefulSet"]
    service = next(d for d in docs if d["kind"] == "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    assert [g["groupName"] for g in cluster["workerGroupSpecs"]] == ["cpu-workers",
                                                                    "gpu-workers"]
    gpu_pod = cluster["workerGroupSpecs"][1]["template"]["spec"]
    assert gpu_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu_pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "msa-serve-model"
    assert service["spec"]["serveService"]["spec"]["ports"][1]["port"] == 9000
    assert cluster["enableInTreeAutoscaling"] is True


def test_production_values_render_valid_manifests(chart, rayservice_schema):
    docs = render(chart, PRODUCTION)
    assert validate(docs, rayservice_schema) == [
        "Ingress", "PodDisruptionBudget", "PodDisruptionBudget", "RayService", "ServiceMonitor"]
    cluster = next(d for d in docs if d["kind"] == "RayService")["spec"]["rayClusterConfig"]
    gpu_pod = cluster["workerGroupSpecs"][1]["template"]["spec"]
    assert gpu_pod["initContainers"][0]["command"][0] == "aws"
    assert gpu_pod["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"] == {
        "name": "msa-serve-api-keys", "key": "api-keys"}
    assert gpu_pod["nodeSelector"] == {"node-pool": "h200"}
    config = serve_config(docs)
    args = AppConfig.model_validate(config["applications"][0]["args"])
    assert args.redis.url == "redis://prefix-cache.redis.svc.cluster.local:6379/0"
    assert args.model.autoscaling.max_replicas == 16 and args.model.num_replicas is None
    assert args.model.num_gpus == 1 and args.model.engine.max_num_seqs == 256
    assert args.model.engine.tensor_parallel_size == 8
    bundles = args.model.deployment_options()["placement_group_bundles"]
    assert bundles == [{"CPU": 16, "GPU": 1}] + [{"CPU": 1, "GPU": 1}] * 7
    assert args.preprocess.autoscaling.max_replicas == 32


def test_a_replica_wider_than_a_pod_is_refused(chart):
    with pytest.raises(Exception, match="tensorParallelSize \\(4\\) exceeds gpuWorkers.gpusPerPod"):
        render(chart, {"modelReplicas": {"tensorParallelSize": 4}})


def test_serve_config_has_one_source_of_truth(chart):
    """The chart's copy equals deployments/serve_config.yaml, and rendering changes only what the
    cluster decides (model path and device, GPUs, Redis URL, where the proxies listen)."""
    assert (CHART / "files/serve_config.yaml").read_text() == DEFAULT_SERVE_CONFIG.read_text(), \
        "copy deployments/serve_config.yaml to k8s/msa-serve/files/"
    local = yaml.safe_load(DEFAULT_SERVE_CONFIG.read_text())
    rendered = serve_config(render(chart))
    local_args = AppConfig.model_validate(local["applications"][0]["args"]).model_dump()
    rendered_args = AppConfig.model_validate(rendered["applications"][0]["args"]).model_dump()
    cluster_facts = {
        ("model", "engine", "model"): "/models/model",
        ("model", "engine", "device"): "cuda",
        ("model", "num_gpus"): 1,
        ("model", "num_cpus"): 4,
        ("redis", "url"): "redis://msa-msa-serve-redis:6379/0",
    }
    for path, value in cluster_facts.items():
        node = rendered_args
        for key in path[:-1]:
            node = node[key]
        assert node[path[-1]] == value, path
        local_node = local_args
        for key in path[:-1]:
            local_node = local_node[key]
        local_node[path[-1]] = value
    assert rendered_args == local_args
    assert rendered["grpc_options"] == {**local["grpc_options"], "port": 9000}
    assert rendered["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert rendered["applications"][0]["import_path"] == "deployments.app:build_app"


@pytest.mark.parametrize("values, message", [
    ({"modelReplicas": {"numReplicas": -1}}, "numReplicas"),
    ({"cpuWorkers": {"replicas": -2}}, "replicas"),
    ({"model": {"pvc": {"claimName": ""}}}, "claimName"),
    ({"model": {"source": "download", "download": {"command": []}}}, "command"),
    ({"model": {"source": "floppy"}}, "source"),
    ({"gpuWorkers": {"gpusPerPod": 0}}, "gpusPerPod"),
    ({"redis": {"enabled": False}}, "externalUrl"),
])
def test_invalid_values_fail_with_the_schema_message(chart, values, message):
    with pytest.raises(helm_python.HelmValuesError) as err:
        chart.validate_schema(values)
    assert message in str(err.value)
