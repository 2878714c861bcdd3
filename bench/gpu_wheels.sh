#!/usr/bin/env bash
# Before a device run: the wheels that the device machine's image lacks and bench/gpu.sh needs
# (the image has torch, triton, transformers, peft, numpy, tokenizers; not pydantic; its
# typing_extensions may be older than pydantic wants), for its
# Python 3.12 on x86-64, into .whl/ (git-ignored through .git/info/exclude). Then:
#   run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=520)
# gpu.sh installs whatever lies in .whl/ into /tmp/site first. Versions: this venv's own.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
py=${PYTHON:-python3}
version() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .whl && mkdir -p .whl
# trl and what it needs beyond the image: bench_e2e.py's DPO row against TRL (step 4)
for name in pydantic pydantic_core annotated-types typing-inspection typing_extensions \
    trl datasets dill multiprocess; do
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "$name==$(version "$name")"
done
ls -l .whl
