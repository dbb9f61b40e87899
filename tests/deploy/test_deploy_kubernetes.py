"""deploy/k8s and deploy/kserve, offline: core objects against Kubernetes's own schemas (kubernetes-validate, strict,
at a pinned version), custom resources against their CRDs' openAPIV3Schema (strict), and the references between
them and to the server: selectors match labels, ports and probes name real container ports and real routes, the
autoscaler targets the Deployment and reads a metric the server exports, env names are settings the server reads."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from deploy_support import DOCKERFILE, parse_dockerfile
from k8s_support import (
    K8S_DIR,
    K8S_VERSION,
    KSERVE_DIR,
    env_of,
    is_custom,
    manifest_files,
    objects,
    one,
    validate_custom,
)
from prometheus_client.parser import text_string_to_metric_families

DEPLOYMENTS = (K8S_DIR / "deployment-gpu.yaml", K8S_DIR / "deployment-cpu.yaml")
SERVICE = K8S_DIR / "service.yaml"
RUNTIME = KSERVE_DIR / "servingruntime.yaml"
ISVC = KSERVE_DIR / "inferenceservice.yaml"
ALL_OBJECTS = [(f"{path.name}:{obj['kind']}", obj) for path in manifest_files() for obj in objects(path)]


def _pod(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def _server(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = _pod(deployment)["containers"]
    return container


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.fixture(scope="module")
def route_paths() -> set[str]:
    from fastapi.routing import iter_route_contexts

    from service.api.app import create_app
    from service.config import Settings

    app = create_app(Settings())
    return {rc.path for rc in iter_route_contexts(app.routes) if rc.path}


@pytest.fixture(scope="module")
def exported_metrics() -> set[str]:
    """Every sample name the server's registry exposes (before traffic: the series it always has)."""
    from service.metrics import Metrics

    text, _ = Metrics(["/predict"], 64).render()
    return {s.name for fam in text_string_to_metric_families(text.decode()) for s in fam.samples}


# --- schemas -----------------------------------------------------------------------------------------------------
def test_the_manifests_hold_every_object_the_deployment_needs():
    kinds = {(path.name, obj["kind"]) for path in manifest_files() for obj in objects(path)}
    assert kinds == {
        ("deployment-gpu.yaml", "Deployment"),
        ("deployment-cpu.yaml", "Deployment"),
        ("service.yaml", "Service"),
        ("pdb.yaml", "PodDisruptionBudget"),
        ("servicemonitor.yaml", "ServiceMonitor"),
        ("scaledobject.yaml", "ScaledObject"),
        ("servingruntime.yaml", "ServingRuntime"),
        ("inferenceservice.yaml", "InferenceService"),
    }


@pytest.mark.parametrize(("name", "obj"), [o for o in ALL_OBJECTS if not is_custom(o[1])], ids=lambda v: v)
def test_core_object_validates_at_the_pinned_kubernetes_version(name: str, obj: dict[str, Any]):
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize(("name", "obj"), [o for o in ALL_OBJECTS if is_custom(o[1])], ids=lambda v: v)
def test_custom_resource_validates_against_its_crd(name: str, obj: dict[str, Any]):
    validate_custom(obj)


def test_the_validators_refuse_unknown_fields_and_wrong_types():
    """Both checks can fail: a misspelt field and a wrong type are refused (the API server would drop the one
    and reject the other)."""
    deployment = one(DEPLOYMENTS[0], "Deployment")
    _server(deployment)["readinessprobe"] = _server(deployment).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinessprobe"):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    scaled = one(K8S_DIR / "scaledobject.yaml", "ScaledObject")
    scaled["spec"]["minReplicas"] = scaled["spec"].pop("minReplicaCount")
    with pytest.raises(jsonschema.ValidationError, match="minReplicas"):
        validate_custom(scaled)
    isvc = one(ISVC, "InferenceService")
    isvc["spec"]["predictor"]["model"]["protocolVersion"] = ["v2"]
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(isvc)


# --- cross-references --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", DEPLOYMENTS, ids=lambda p: p.name)
def test_selectors_match_the_pod_labels(path: Path):
    deployment = one(path, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _matches(deployment["spec"]["selector"]["matchLabels"], labels)
    assert _matches(one(SERVICE, "Service")["spec"]["selector"], labels)
    assert _matches(one(K8S_DIR / "pdb.yaml", "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels)
    monitor = one(K8S_DIR / "servicemonitor.yaml", "ServiceMonitor")
    assert _matches(monitor["spec"]["selector"]["matchLabels"], one(SERVICE, "Service")["metadata"]["labels"])


@pytest.mark.parametrize("path", DEPLOYMENTS, ids=lambda p: p.name)
def test_service_and_monitor_ports_are_container_ports_the_server_binds(path: Path):
    server = _server(one(path, "Deployment"))
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    env = env_of(server)
    assert ports == {
        "http": int(env["MIXINFER_PORT"]),
        "grpc": int(env["MIXINFER_GRPC_PORT"]),
        "metrics": int(env["MIXINFER_METRICS_PORT"]),
    }
    service_ports = {p["name"]: p for p in one(SERVICE, "Service")["spec"]["ports"]}
    assert set(service_ports) == {"http", "grpc", "metrics"}
    assert all(p["targetPort"] in ports for p in service_ports.values())
    assert service_ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"
    (endpoint,) = one(K8S_DIR / "servicemonitor.yaml", "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["port"] in service_ports and service_ports[endpoint["port"]]["targetPort"] == "metrics"


def _probes(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: container[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}


@pytest.mark.parametrize("path", DEPLOYMENTS, ids=lambda p: p.name)
def test_probes_hit_real_health_routes_on_the_http_port(path: Path, route_paths: set[str]):
    server = _server(one(path, "Deployment"))
    probes = _probes(server)
    assert {p["port"] for p in probes.values()} == {"http"}
    assert probes["readinessProbe"]["path"] == probes["startupProbe"]["path"] == "/health/ready"
    assert probes["livenessProbe"]["path"] == "/health/live"
    assert {p["path"] for p in probes.values()} <= route_paths
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "warm-up needs minutes on a cold GPU node"


@pytest.mark.parametrize("path", DEPLOYMENTS, ids=lambda p: p.name)
def test_termination_grace_covers_the_pre_stop_pause_and_the_drain(path: Path):
    """SIGTERM comes after the preStop pause; then uvicorn drains HTTP for ``drain_s`` and the gRPC server gives its
    calls in flight the same grace: the kubelet must not SIGKILL before both are done."""
    from service.config import Settings

    deployment = one(path, "Deployment")
    server = _server(deployment)
    pause = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain_s = Settings(request_timeout_s=float(env_of(server)["MIXINFER_REQUEST_TIMEOUT_S"])).drain_s
    assert pause >= 5
    assert _pod(deployment)["terminationGracePeriodSeconds"] >= pause + 2 * drain_s + 5
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("path", DEPLOYMENTS, ids=lambda p: p.name)
def test_pods_run_locked_down_with_writable_tmp_and_read_only_model_store(path: Path):
    pod = _pod(one(path, "Deployment"))
    (uid,) = {
        re.search(r"--uid (\d+)", a).group(1)
        for s in parse_dockerfile(DOCKERFILE.read_text())
        for a in s.args("RUN")
        if "useradd" in a
    }
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == int(uid)
    for container in [*pod["initContainers"], *pod["containers"]]:
        ctx = container["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False and ctx["readOnlyRootFilesystem"] is True
        assert ctx["capabilities"]["drop"] == ["ALL"] and "add" not in ctx["capabilities"]
        assert "limits" in container["resources"] and "requests" in container["resources"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    server = _server(one(path, "Deployment"))
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    env = env_of(server)
    store = mounts[env["MIXINFER_MODEL_DIR"]]
    assert store["readOnly"] is True
    (init,) = pod["initContainers"]
    assert init["image"] == server["image"] and store["name"] in {m["name"] for m in init["volumeMounts"]}
    keys_dir = str(Path(env["MIXINFER_API_KEYS_FILE"]).parent)
    assert mounts[keys_dir]["readOnly"] is True and "secret" in volumes[mounts[keys_dir]["name"]]


def test_gpu_and_cpu_deployments_differ_only_in_device_image_and_sizing():
    gpu, cpu = (one(p, "Deployment") for p in DEPLOYMENTS)
    assert _server(gpu)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in _server(cpu)["resources"]["limits"]
    assert env_of(_server(gpu))["MIXINFER_PROVIDERS"].startswith("CUDAExecutionProvider")
    assert env_of(_server(cpu))["MIXINFER_PROVIDERS"] == "CPUExecutionProvider"
    stages = {s.name for s in parse_dockerfile(DOCKERFILE.read_text())}
    for deployment, target in ((gpu, "gpu"), (cpu, "cpu")):
        assert target in stages and _server(deployment)["image"].endswith(f"-{target}")

    def normalised(d: dict[str, Any]) -> dict[str, Any]:
        pod = _pod(d)
        pod.pop("tolerations", None)
        for c in [*pod["containers"], *pod["initContainers"]]:
            c.pop("image")
            c["resources"] = {}
            c["env"] = [
                e for e in c.get("env", []) if e["name"] not in {"MIXINFER_PROVIDERS", "MIXINFER_INTRA_OP_THREADS"}
            ]
        return d

    assert normalised(gpu) == normalised(cpu)


def test_every_env_name_is_a_setting_the_server_reads():
    from service.config import Settings

    settings = {f"MIXINFER_{name.upper()}" for name in Settings.model_fields}
    containers = [_server(one(p, "Deployment")) for p in DEPLOYMENTS]
    containers += one(RUNTIME, "ServingRuntime")["spec"]["containers"]
    containers.append(one(ISVC, "InferenceService")["spec"]["predictor"]["model"])
    names = {e["name"] for c in containers for e in c.get("env", [])}
    assert names <= settings, f"not settings of service/config.py: {sorted(names - settings)}"


def test_the_autoscaler_targets_the_deployment_on_a_metric_the_server_exports(exported_metrics: set[str]):
    scaled = one(K8S_DIR / "scaledobject.yaml", "ScaledObject")
    deployment = one(DEPLOYMENTS[0], "Deployment")
    target = scaled["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        deployment["metadata"]["name"],
    )
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    query = trigger["metadata"]["query"]
    used = set(re.findall(r"\b(mixinfer_[a-z_]+)", query))
    assert used and used <= exported_metrics, f"{sorted(used - exported_metrics)} not exported"
    assert f'service="{one(SERVICE, "Service")["metadata"]["name"]}"' in query
    # the per-pod target is one full engine batch waiting
    assert float(trigger["metadata"]["threshold"]) == float(env_of(_server(deployment))["MIXINFER_MAX_BATCH_IMAGES"])
    pdb = one(K8S_DIR / "pdb.yaml", "PodDisruptionBudget")
    assert scaled["spec"]["minReplicaCount"] > pdb["spec"]["maxUnavailable"], "a drain must leave a pod serving"


def test_kserve_inference_service_uses_the_runtime_with_both_protocols(route_paths: set[str]):
    runtime = one(RUNTIME, "ServingRuntime")
    isvc = one(ISVC, "InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"] in [
        {k: f[k] for k in ("name", "version")} for f in runtime["spec"]["supportedModelFormats"]
    ]
    assert runtime["spec"]["protocolVersions"] == ["v2", "grpc-v2"] and model["protocolVersion"] in ("v2", "grpc-v2")
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    (container,) = runtime["spec"]["containers"]
    env = env_of(container)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "http1": int(env["MIXINFER_PORT"]),
        "h2c": int(env["MIXINFER_GRPC_PORT"]),
        "metrics": int(env["MIXINFER_METRICS_PORT"]),
    }
    assert env["MIXINFER_MODEL_DIR"] == "/mnt/models"  # where KServe's storage initializer puts storageUri
    probes = _probes(container)
    assert {p["port"] for p in probes.values()} == {ports["http1"]}
    assert {p["path"] for p in probes.values()} <= route_paths
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}
    assert isvc["metadata"]["name"] == env_of(model)["MIXINFER_MODEL_NAME"]


def test_every_pod_passes_the_restricted_pod_security_standard():
    """A namespace labelled ``pod-security.kubernetes.io/enforce: restricted`` refuses a pod unless every container
    (or the pod) runs as non-root with a RuntimeDefault/Localhost seccomp profile, no privilege escalation and every
    capability dropped; KServe's pod is built from the ServingRuntime's container alone."""
    pods = [(p.name, _pod(one(p, "Deployment"))) for p in DEPLOYMENTS]
    pods.append((RUNTIME.name, {"containers": one(RUNTIME, "ServingRuntime")["spec"]["containers"]}))
    for name, pod in pods:
        pod_ctx = pod.get("securityContext", {})
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            ctx = {**pod_ctx, **container.get("securityContext", {})}
            where = f"{name}: {container['name']}"
            assert ctx.get("runAsNonRoot") is True, where
            assert ctx.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost"), where
            assert ctx.get("allowPrivilegeEscalation") is False and ctx["capabilities"]["drop"] == ["ALL"], where


def test_kserve_runtime_keeps_metrics_off_the_inference_port():
    """An InferenceService's REST port is what KServe's ingress routes clients to; with /metrics there, any client
    reads the threshold and each of its queries' gap bucket (what MIXINFER_RESPONSE_DETAIL=label withholds). The
    runtime must serve metrics on a port of their own, as the Deployments do."""
    (container,) = one(RUNTIME, "ServingRuntime")["spec"]["containers"]
    env = env_of(container)
    assert "MIXINFER_METRICS_PORT" in env, "/metrics would be open on the inference port"
    metrics_port = int(env["MIXINFER_METRICS_PORT"])
    assert metrics_port not in {int(env["MIXINFER_PORT"]), int(env["MIXINFER_GRPC_PORT"])}
    assert {"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"} in container["ports"]
