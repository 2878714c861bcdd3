"""Every triton kernel specialization a training step launches compiles for an H100/H200
(sm_90) through ptxas, on this CPU machine, and fits its shared memory and registers
(bench/cubin_check.py). The interpreter tests cannot see a kernel the GPU compiler
rejects; this can. It runs in a subprocess: the kernels must be imported uninterpreted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CUBIN_CHECK = Path(__file__).resolve().parents[2] / "bench" / "cubin_check.py"
KERNELS = {
    "_shrink_kernel",
    "_expand_kernel",
    "_zero_outside_kernel",
    "_seg_outer_kernel",
    "_glu_kernel",
    "_keep_kernel",
}


def _check(tmp_path: Path, *args: str, **env: str) -> tuple[int, list[dict], str]:
    out = tmp_path / "cubin.json"
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    p = subprocess.run(
        [sys.executable, str(CUBIN_CHECK), "--json", str(out), *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    results = json.loads(out.read_text()) if out.exists() else []
    return p.returncode, results, p.stdout + p.stderr


def test_every_kernel_compiles_and_fits_sm90(tmp_path: Path) -> None:
    rc, results, log = _check(tmp_path)
    assert rc == 0, log
    assert {r["kernel"] for r in results} == KERNELS, log
    # bf16 and fp16 run their dots in the activations' dtype, fp32 in ieee fp32.
    dots = {(r["constexprs"].get("DOT"), r["constexprs"].get("DOT_FP32")) for r in results}
    assert {("bf16", "False"), ("fp16", "False"), ("fp32", "True")} <= dots, dots
    for r in results:
        assert r["ok"] and r["error"] is None and r["problems"] == [], r
        assert r["registers"] is not None and 0 < r["registers"] <= 255, r
        if r["kernel"] not in ("_zero_outside_kernel", "_keep_kernel"):  # no tl.dot there
            assert 0 < r["shared"] <= 232448, r


def test_a_tile_too_big_for_the_sm_is_reported(tmp_path: Path) -> None:
    # A 64 x 512 bf16 input tile, three pipeline stages: 240 KiB of shared memory, more than
    # the 227 KiB an sm_90 block may have. Only the shrink kernel uses BLOCK_K.
    rc, results, log = _check(tmp_path, "--dtypes", "bf16", MIXLOOM_KERNEL_BLOCK_K="512")
    assert rc == 1, log
    bad = [r for r in results if not r["ok"]]
    assert bad and {r["kernel"] for r in bad} == {"_shrink_kernel"}, log
    for r in bad:
        assert r["constexprs"]["BLOCK_K"] == "512"
        assert any("shared memory 245760 B > 232448 B" in p for p in r["problems"]), r
