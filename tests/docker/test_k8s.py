"""docker/k8s/: every manifest validates, strictly (no unknown field), against the
Kubernetes OpenAPI schemas of a fixed release (kubernetes-validate carries them: offline);
the kustomization lists every manifest; the settings they set are Settings fields, the
secrets sit in the Secret; the probes, the metrics port and the commands are real."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient

from mixloom.cli import build_parser
from mixloom.config import Settings
from mixloom.server.app import create_app

K8S = Path(__file__).resolve().parents[2] / "docker" / "k8s"
KUBERNETES = "1.32.0"  # the release validated against (kubernetes-validate's schemas)
SETTINGS_ENV = {f"MIXLOOM_{name.upper()}" for name in Settings.model_fields}
SECRET_SETTINGS = {
    "MIXLOOM_DATABASE_URL",
    "MIXLOOM_REDIS_URL",
    "MIXLOOM_S3_ACCESS_KEY_ID",
    "MIXLOOM_S3_SECRET_ACCESS_KEY",
    "MIXLOOM_ADMIN_KEY",
}


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            out.extend((path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return out


MANIFESTS = _manifests()


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in MANIFESTS if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


@pytest.mark.parametrize(
    "manifest", [d for _, d in MANIFESTS], ids=[f"{f}:{d['kind']}" for f, d in MANIFESTS]
)
def test_manifest_validates_strictly(manifest: dict[str, Any]) -> None:
    kubernetes_validate.validate(manifest, KUBERNETES, strict=True)


def test_the_validation_can_fail() -> None:
    """A misspelt field and a wrong type are refused: the check above means something."""
    deployment = copy.deepcopy(_one("Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["configMapRefs"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)
    statefulset = copy.deepcopy(_one("StatefulSet"))
    statefulset["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, KUBERNETES, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    assert {i["name"] for i in kustomization["images"]} == {"mixloom-api", "mixloom-worker"}


def _containers() -> list[dict[str, Any]]:
    return [
        c
        for _, d in MANIFESTS
        if d["kind"] in ("Deployment", "StatefulSet")
        for c in d["spec"]["template"]["spec"]["containers"]
    ]


def test_settings_are_real_and_secrets_are_in_the_secret() -> None:
    config = _one("ConfigMap", "mixloom-settings")["data"]
    secret = _one("Secret", "mixloom-secrets")["stringData"]
    named = set(config) | set(secret)
    for container in _containers():
        named |= {e["name"] for e in container.get("env", []) if e["name"].startswith("MIXLOOM_")}
        refs = container["envFrom"]
        assert {"configMapRef": {"name": "mixloom-settings"}} in refs
        assert {"secretRef": {"name": "mixloom-secrets"}} in refs
    named = {n for n in named if n.startswith("MIXLOOM_")}
    assert not named - SETTINGS_ENV, f"not Settings fields: {sorted(named - SETTINGS_ENV)}"
    assert set(secret) == SECRET_SETTINGS  # credentials in the Secret, and only there
    assert not set(config) & SECRET_SETTINGS
    assert config["MIXLOOM_STORAGE_URL"].startswith("s3://")
    Settings(**{k.removeprefix("MIXLOOM_").lower(): v for k, v in {**config, **secret}.items()})


def test_api_probes_health_and_worker_requests_a_gpu_and_is_scraped(tmp_path: Path) -> None:
    api = _one("Deployment", "mixloom-api")["spec"]["template"]
    (container,) = api["spec"]["containers"]
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    paths = [container[probe]["httpGet"]["path"] for probe in ("readinessProbe", "livenessProbe")]
    assert paths == ["/healthz", "/healthz"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in port_names
    scraped = api["metadata"]["annotations"]["prometheus.io/path"]
    with TestClient(create_app(Settings(data_dir=tmp_path), run_migrations=True)) as http:
        for path in (*paths, scraped):  # the routes the kubelet and Prometheus ask for
            assert http.get(path).status_code == 200, path
    assert int(api["metadata"]["annotations"]["prometheus.io/port"]) == port_names["http"]
    build_parser().parse_args(container["args"][1:])
    service = _one("Service", "mixloom-api")
    assert service["spec"]["selector"] == api["metadata"]["labels"]

    worker = _one("StatefulSet", "mixloom-worker")["spec"]["template"]
    (container,) = worker["spec"]["containers"]
    for part in ("requests", "limits"):
        assert container["resources"][part]["nvidia.com/gpu"] == 1
    metrics_port = int(_one("ConfigMap")["data"]["MIXLOOM_WORKER_METRICS_PORT"])
    assert {"name": "metrics", "containerPort": metrics_port} in container["ports"]
    annotations = worker["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == metrics_port
    assert _one("ConfigMap")["data"]["MIXLOOM_WORKER_METRICS_HOST"] == "0.0.0.0"
    args = build_parser().parse_args(container["args"][1:])
    assert args.func.__name__ == "_worker"
