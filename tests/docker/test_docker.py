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

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"


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


def test_compose_has_the_four_services_with_health_checks(config: dict[str, Any]) -> None:
    services = config["services"]
    assert set(services) == {"postgres", "redis", "api", "worker"}
    for name, service in services.items():
        assert service["healthcheck"]["test"], f"{name} has no health check"
        assert service["restart"] == "unless-stopped"
    assert services["api"]["build"]["dockerfile"] == "docker/api.Dockerfile"
    assert services["worker"]["build"]["dockerfile"] == "docker/worker.Dockerfile"
    assert Path(services["api"]["build"]["context"]).resolve() == REPO


def test_compose_wiring(config: dict[str, Any]) -> None:
    services = config["services"]
    api, worker = services["api"], services["worker"]
    for service in (api, worker):
        env = service["environment"]
        assert env["MIXLOOM_DATABASE_URL"] == "postgresql://mixloom:mixloom@postgres:5432/mixloom"
        assert env["MIXLOOM_REDIS_URL"] == "redis://redis:6379/0"
        assert env["MIXLOOM_DATA_DIR"] == "/data"
    for dep in ("postgres", "redis"):
        assert api["depends_on"][dep]["condition"] == "service_healthy"
    assert worker["depends_on"]["api"]["condition"] == "service_healthy"
    assert services["postgres"]["environment"]["POSTGRES_DB"] == "mixloom"
    (gpu,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert worker["environment"]["MIXLOOM_DEVICE"] == "cuda"
    published = api["ports"][0]
    assert str(published.get("target", published)).endswith("8000")


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    out = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        out[source] = target
    return out


def test_compose_volumes(config: dict[str, Any]) -> None:
    services = config["services"]
    assert set(config["volumes"]) >= {"postgres-data", "mixloom-data", "model-cache"}
    assert _mounts(services["postgres"])["postgres-data"] == "/var/lib/postgresql/data"
    # Uploads written by the API are read by the worker, adapters the other way round.
    assert _mounts(services["api"])["mixloom-data"] == "/data"
    assert _mounts(services["worker"])["mixloom-data"] == "/data"


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
