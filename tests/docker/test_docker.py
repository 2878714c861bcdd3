"""docker/: the compose file validates without an engine and has the services, health
checks and volumes it promises; the Dockerfiles copy what exists and run real commands;
the API image's short dependency list is everything the API imports."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from live_server import free_port, live_api
from needs import missing

from mixloom.cli import build_parser
from mixloom.config import Settings

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
# every MIXLOOM_* variable mixloom reads: one per Settings field
SETTINGS_ENV = {f"MIXLOOM_{name.upper()}" for name in Settings.model_fields}


def compose_command() -> list[str] | None:
    """`docker compose` when the plugin is there, else Debian's `docker-compose`."""
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, text=True, timeout=30
        )
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    command = compose_command()
    if command is None:
        missing("no compose validator: apt-get install -y docker-compose (scripts/setup.sh does)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "MIXLOOM_"))}
    result = subprocess.run(
        [*command, "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=DOCKER,
        env=env,
    )
    assert result.returncode == 0, f"{command} config rejected compose.yaml:\n{result.stderr}"
    parsed: dict[str, Any] = yaml.safe_load(result.stdout)
    return parsed


WORKERS = ("worker-1", "worker-2")


def test_compose_services_health_checks_and_restarts(config: dict[str, Any]) -> None:
    services = config["services"]
    assert set(services) == {"postgres", "redis", "minio", "minio-init", "api", *WORKERS}
    for name, service in services.items():
        if name == "minio-init":  # a one-shot: it makes the bucket and exits
            assert service["restart"] == "no"
            continue
        assert service["healthcheck"]["test"], f"{name} has no health check"
        assert service["restart"] == "unless-stopped"
    assert services["api"]["build"]["dockerfile"] == "docker/api.Dockerfile"
    for worker in WORKERS:
        assert services[worker]["build"]["dockerfile"] == "docker/worker.Dockerfile"
    assert Path(services["api"]["build"]["context"]).resolve() == REPO


def test_compose_wiring(config: dict[str, Any]) -> None:
    services = config["services"]
    api = services["api"]
    for service in (api, *(services[w] for w in WORKERS)):
        env = service["environment"]
        assert env["MIXLOOM_DATABASE_URL"] == "postgresql://mixloom:mixloom@postgres:5432/mixloom"
        assert env["MIXLOOM_REDIS_URL"] == "redis://redis:6379/0"
        assert env["MIXLOOM_DATA_DIR"] == "/data"
        # the store: the bucket minio-init makes, with MinIO's own credentials
        assert env["MIXLOOM_STORAGE_URL"] == "s3://mixloom/data"
        assert env["MIXLOOM_S3_ENDPOINT_URL"] == "http://minio:9000"
        minio = services["minio"]["environment"]
        assert env["MIXLOOM_S3_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
        assert env["MIXLOOM_S3_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]
        assert service["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    for dep in ("postgres", "redis"):
        assert api["depends_on"][dep]["condition"] == "service_healthy"
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    init = " ".join(services["minio-init"]["command"])
    assert "mc mb --ignore-existing store/mixloom" in init
    assert services["postgres"]["environment"]["POSTGRES_DB"] == "mixloom"
    gpus = []
    for name in WORKERS:
        worker = services[name]
        assert worker["depends_on"]["api"]["condition"] == "service_healthy"
        (gpu,) = worker["deploy"]["resources"]["reservations"]["devices"]
        assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
        gpus.append(gpu["device_ids"])
        env = worker["environment"]
        assert env["MIXLOOM_DEVICE"] == "cuda"
        # its /metrics, reachable from the compose network
        assert env["MIXLOOM_WORKER_METRICS_PORT"] == "9100"
        assert env["MIXLOOM_WORKER_METRICS_HOST"] == "0.0.0.0"
    assert gpus == [["0"], ["1"]]  # one GPU each (WORKER_1_GPU / WORKER_2_GPU)
    published = api["ports"][0]
    assert str(published.get("target", published)).endswith("8000")


def test_compose_names_only_settings_that_exist(config: dict[str, Any]) -> None:
    names = set()
    for service in config["services"].values():
        names |= {k for k in service.get("environment", {}) if k.startswith("MIXLOOM_")}
    assert names >= {"MIXLOOM_STORAGE_URL", "MIXLOOM_ADMIN_KEY", "MIXLOOM_WORKER_METRICS_PORT"}
    assert not names - SETTINGS_ENV, f"not Settings fields: {sorted(names - SETTINGS_ENV)}"


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    out = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        out[source] = target
    return out


def test_compose_volumes_share_nothing_but_the_services(config: dict[str, Any]) -> None:
    """The API and each worker keep their data in a volume of their own: bytes they share
    go through the store."""
    services = config["services"]
    assert _mounts(services["postgres"])["postgres-data"] == "/var/lib/postgresql/data"
    assert _mounts(services["minio"])["minio-data"] == "/data"
    assert _mounts(services["api"]) == {"api-data": "/data"}
    owners: dict[str, str] = {}
    for name in ("api", *WORKERS):
        for volume, target in _mounts(services[name]).items():
            if target == "/data":
                assert volume not in owners, f"{name} shares {volume} with {owners[volume]}"
                owners[volume] = name
    for name in WORKERS:
        assert _mounts(services[name])["model-cache"] == "/cache/huggingface"
    assert set(config["volumes"]) >= {"postgres-data", "minio-data", "model-cache", *owners}


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", ["api.Dockerfile", "worker.Dockerfile"])
def test_dockerfiles_copy_what_exists_and_run_real_commands(name: str) -> None:
    steps = _instructions(DOCKER / name)
    for word, rest in steps:
        if word == "COPY":
            for source in rest.split()[:-1]:
                if "*" not in source:
                    assert (REPO / source).exists(), f"{name} copies missing {source}"
    cmd = next(rest for word, rest in steps if word == "CMD")
    argv = yaml.safe_load(cmd)  # the exec form is a JSON list
    assert argv[0] == "mixloom"
    build_parser().parse_args(argv[1:])  # a real subcommand with real options
    assert any(word == "HEALTHCHECK" for word, _ in steps)


def test_api_image_dependencies_cover_everything_the_api_imports(tmp_path: Path) -> None:
    """Start the API with torch, transformers and numpy made unimportable; then every
    third-party module that the mixloom modules it loaded import must come from a
    distribution that api.Dockerfile installs."""
    listed = set()
    for word, rest in _instructions(DOCKER / "api.Dockerfile"):
        if word == "RUN" and rest.startswith("pip install") and "-e ." not in rest:
            for req in re.findall(r'"([^"]+)"|(\S+)', rest.removeprefix("pip install")):
                name = re.split(r"[<>=\[ ]", req[0] or req[1])[0]
                listed.add(name.lower().replace("_", "-"))
    script = f"""
import sys
for blocked in ("torch", "transformers", "numpy", "triton", "tokenizers"):
    sys.modules[blocked] = None
from fastapi.testclient import TestClient
from mixloom.cli import build_parser
from mixloom.config import Settings
from mixloom.config import Settings
from mixloom.server.app import create_app
build_parser()
app = create_app(Settings(data_dir={str(tmp_path)!r}), run_migrations=True)
with TestClient(app) as http:
    assert http.get("/healthz").status_code == 200
    assert http.get("/").status_code == 200
    assert http.get("/v1/models").status_code == 200
print("\\n".join(m.__file__ for n, m in sorted(sys.modules.items())
                  if n.startswith("mixloom") and m is not None and m.__file__))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-3000:]
    imported: set[str] = set()
    for path in result.stdout.split():
        for node in ast.parse(Path(path).read_text()).body:  # imports made at import time
            if isinstance(node, ast.Import):
                imported.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"mixloom", "__future__"}
    dists = importlib.metadata.packages_distributions()
    listed |= {"anyio", "starlette"}  # fastapi's own dependencies
    missing = []
    for module in sorted(third_party):
        names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if not names & listed:
            missing.append(f"{module} ({', '.join(sorted(names))})")
    assert not missing, f"api.Dockerfile does not install: {missing}"
    assert not third_party & {"torch", "transformers", "numpy", "triton"}


def test_healthcheck_script(tmp_path: Path) -> None:
    script = DOCKER / "healthcheck.py"
    with live_api(tmp_path) as server:
        port = server.url.rsplit(":", 1)[1]
        ok = subprocess.run(
            [sys.executable, str(script), "api"],
            env=dict(os.environ, MIXLOOM_PORT=port),
            capture_output=True,
            timeout=30,
        )
        assert ok.returncode == 0, ok.stderr
    down = subprocess.run(
        [sys.executable, str(script), "api"],
        env=dict(os.environ, MIXLOOM_PORT=str(free_port())),
        capture_output=True,
        timeout=30,
    )
    assert down.returncode != 0
    usage = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert usage.returncode != 0 and "usage" in usage.stderr
