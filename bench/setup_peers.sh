#!/usr/bin/env bash
# Creates bench/.venv-moe-peft: MoE-PEFT 2.0.2 (the fused MixLoRA training reference) in its OWN
# venv, because it pins transformers 4.46 while mixloom runs on 5.x. bench_e2e.py runs it as a
# subprocess (bench/peer_moe_peft.py). PEFT, the other peer, lives in mixloom's own venv ([dev]).
# Usage: bash bench/setup_peers.sh [venv-dir]   (needs a package index; ~2 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-bench/.venv-moe-peft}
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$py" -m venv "$venv"
. "$venv/bin/activate"
# torch: the same CPU wheel as mixloom's venv (MoE-PEFT's torch<2.6 pin is too strict; 2.13 works).
pip install -q "torch==2.13.0"
# MoE-PEFT's own pins, then MoE-PEFT itself without its (over-strict) dependency list.
pip install -q "transformers==4.46.3" "tokenizers==0.20.3" "huggingface-hub==0.36.2" \
    "datasets==3.1.0" evaluate scikit-learn sentencepiece tiktoken accelerate
pip install -q --no-deps "moe-peft==2.0.2"
python -c "import moe_peft, transformers; print('moe-peft ok, transformers', transformers.__version__)"
