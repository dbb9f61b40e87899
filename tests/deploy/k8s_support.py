"""Helpers of the Kubernetes manifest tests: load deploy/k8s and deploy/kserve, validate custom resources against
their CRDs strictly (unknown fields refused, as `kubectl apply --validate=strict` does), look objects up."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from deploy_support import REPO

K8S_DIR = REPO / "deploy" / "k8s"
KSERVE_DIR = REPO / "deploy" / "kserve"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
#: the Kubernetes version core objects are validated at (kubernetes-validate's schemas; preStop `sleep` needs 1.30+)
K8S_VERSION = "1.33.0"
#: (apiVersion, kind) of each custom resource -> the CRD file it validates against (tests/deploy/schemas/README.md)
CRDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "prometheus-operator-servicemonitors-crd.yaml",
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobjects-crd.yaml",
    ("serving.kserve.io/v1beta1", "InferenceService"): "kserve-inferenceservices-crd.yaml",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "kserve-servingruntimes-crd.yaml",
}


def manifest_files() -> list[Path]:
    return sorted([*K8S_DIR.glob("*.yaml"), *KSERVE_DIR.glob("*.yaml")])


@cache
def _load(path: Path) -> tuple[dict[str, Any], ...]:
    return tuple(doc for doc in yaml.safe_load_all(path.read_text()) if doc)


def objects(path: Path) -> list[dict[str, Any]]:
    """Fresh copies of the documents of one manifest file (tests may mutate them)."""
    return [_copy(d) for d in _load(path)]


def _copy(doc: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(yaml.safe_dump(doc))


def one(path: Path, kind: str) -> dict[str, Any]:
    (obj,) = [d for d in objects(path) if d["kind"] == kind]
    return obj


def is_custom(obj: dict[str, Any]) -> bool:
    return (obj["apiVersion"], obj["kind"]) in CRDS


def _strict(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` on every object that lists its properties: the API server
    prunes (silently drops) unknown fields of a structural schema, so an unknown field is a mistake to refuse."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
    return out


@cache
def crd_schema(api_version: str, kind: str) -> dict[str, Any]:
    """The strict openAPIV3Schema of the served CRD version ``api_version`` of ``kind``."""
    crd = yaml.safe_load((SCHEMAS / CRDS[(api_version, kind)]).read_text())
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    schema = _strict(entry["schema"]["openAPIV3Schema"])
    # metadata is the API server's ObjectMeta, not described by the CRD: allow what it allows
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def validate_custom(obj: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` if ``obj`` does not fit its CRD."""
    schema = crd_schema(obj["apiVersion"], obj["kind"])
    jsonschema.Draft7Validator(schema).validate(obj)


def env_of(container: dict[str, Any]) -> dict[str, str]:
    """Plain ``value`` env entries of a container (secret references left out)."""
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
