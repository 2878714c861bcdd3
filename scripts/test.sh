#!/usr/bin/env bash
# The default test suite (slow and gpu tests excluded; run them with: pytest -m slow).
set -euo pipefail
export TRITON_INTERPRET=${TRITON_INTERPRET:-1}
exec python -m pytest -q "$@"
