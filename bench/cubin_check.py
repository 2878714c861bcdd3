"""Compile every triton kernel specialization mixloom launches for a CUDA GPU, on a machine
without one, and report what the GPU would be asked for (shared memory, registers, spills).

The interpreter (TRITON_INTERPRET=1, the CPU tests) checks the kernels' indexing and math, but
never runs triton's GPU compiler: a tl.dot shape the GPU rejects, a tile whose shared memory
exceeds the SM's, or a kernel that spills registers shows only on the GPU. This runs the real
launchers (lora_segments, lora_combine, expert_glu; forward and backward) on CPU tensors with a
stand-in driver whose target is the GPU; each launch is compiled through ptxas to a cubin and
not run (the outputs stay zero). So the specializations compiled are exactly those a training
step on that GPU would compile, with the GPU tile sizes (Settings' kernel_* fields, MIXLOOM_KERNEL_BLOCK_M ..., apply).

    python bench/cubin_check.py [--arch 90] [--dtypes bf16 fp16 fp32] [--json F]

Exit status 1 when a kernel fails to compile or does not fit the SM. Needs TRITON_INTERPRET
unset (it refuses otherwise: the kernels must be the compiled ones).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Shared memory a block may opt in to, per compute capability (CUDA programming guide, table
# "technical specifications per compute capability"); registers per SM are 64K 32-bit on all.
SMEM_PER_BLOCK = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
REGS_PER_SM = 65536
MAX_REGS_PER_THREAD = 255

_DTYPES = ("bf16", "fp16", "fp32")


@dataclass
class Compiled:
    """One kernel specialization, as compiled for the target."""

    kernel: str
    case: str  # which launcher call asked for it
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    shared: int = 0  # bytes of shared memory per block
    registers: int | None = None  # per thread, from the cubin
    local_bytes: int | None = None  # per thread: register spills
    error: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and not self.problems


class _TargetDriver:
    """Stands in for the CUDA driver: names the target, owns no device."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        return self.target

    def is_active(self) -> bool:
        return True


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, local memory bytes) per thread, read from the cubin by cuobjdump (shipped
    with triton's NVIDIA backend); local memory in a triton kernel is register spills. Nones
    when cuobjdump is not there."""
    import triton.backends.nvidia as nvidia

    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=False
        ).stdout
    regs = re.search(r"REG:(\d+)", text)
    local = [int(m) for m in re.findall(r"(?:STACK|LOCAL):(\d+)", text)]
    return (int(regs.group(1)) if regs else None, sum(local) if local else None)


def _limits(c: Compiled, arch: int) -> None:
    smem = SMEM_PER_BLOCK.get(arch)
    if smem is not None and c.shared > smem:
        c.problems.append(f"shared memory {c.shared} B > {smem} B per block on sm_{arch}")
    if c.registers is not None:
        if c.registers > MAX_REGS_PER_THREAD:
            c.problems.append(f"{c.registers} registers per thread > {MAX_REGS_PER_THREAD}")
        if c.registers * 32 * c.num_warps > REGS_PER_SM:
            c.problems.append(
                f"{c.registers} registers x {32 * c.num_warps} threads > {REGS_PER_SM} per SM"
            )


def _cases(dtype_names: list[str]) -> list[tuple[str, Any]]:
    """(name, thunk) pairs: each thunk runs one public kernel function forward and backward,
    with the triton backend, on CPU tensors shaped like a MixLoRA layer (small T; the tile
    sizes, not T, decide the specializations)."""
    import torch

    from mixloom.kernels import (
        LoraStack,
        dropout_keep,
        expert_glu,
        group_pairs,
        lora_combine,
        lora_segments,
    )

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    T, H, I, E, R = 96, 256, 688, 8, 16  # noqa: E741 - I is the intermediate size
    cases: list[tuple[str, Any]] = []
    for name in dtype_names:
        dt = dtypes[name]

        def run(kind: str, dt: torch.dtype = dt) -> None:
            g = torch.Generator().manual_seed(0)
            top = torch.stack(
                [torch.randperm(E, generator=g)[:2] for _ in range(T)]
            )  # (T, 2) two experts a token, as MixLoRA top-2
            w = torch.rand(T, 2, generator=g, requires_grad=True)
            pairs = group_pairs(top, E, weights=w, with_tiles=True)
            P = pairs.num_pairs
            scale = torch.full((E,), 2.0)

            def lora(n_in: int, n_out: int) -> LoraStack:
                A = torch.randn(E, R, n_in, generator=g).to(dt).requires_grad_()
                B = torch.randn(E, n_out, R, generator=g).to(dt).requires_grad_()
                return LoraStack(A, B, scale)

            def rnd(*shape: int) -> torch.Tensor:
                return torch.randn(*shape, generator=g).to(dt).requires_grad_()

            per_pair = kind.endswith("_per_pair")  # dropout: one input row per pair
            x = rnd(P, H) if per_pair else rnd(T, H)
            kw: dict[str, Any] = dict(per_pair=per_pair, backend="triton")
            if kind.startswith("segments"):
                y = lora_segments(x, lora(H, I), pairs, **kw)
            elif kind == "combine":
                y = lora_combine(rnd(P, I), lora(I, H), pairs, T, per_pair=True, backend="triton")
            else:  # glu
                gate, up = rnd(T, I), rnd(T, I)
                z, zsum = expert_glu(x, x, gate, up, lora(H, I), lora(H, I), pairs, **kw)
                y = torch.cat([z.flatten(), zsum.flatten()])
            y.float().sum().backward()

        for kind in ("segments", "segments_per_pair", "combine", "glu", "glu_per_pair"):
            cases.append((f"{kind}/{name}", lambda kind=kind, run=run: run(kind)))

    def keep() -> None:  # dropout masks: no float data, one specialization
        rows = 2 * T
        seeds = torch.tensor([1, 2], dtype=torch.int64)
        job = (torch.arange(rows) % 2).to(torch.int32)
        dropout_keep(seeds, job, torch.arange(rows), torch.zeros(rows, dtype=torch.int32), H)

    cases.append(("dropout_keep", keep))
    return cases


def check(arch: int = 90, dtype_names: list[str] | None = None) -> list[Compiled]:
    """Compile what the launchers launch, for sm_<arch>; one Compiled per distinct kernel
    specialization (first case that asked for it)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime import driver

    from mixloom.kernels import common

    if common.INTERPRETED:
        raise RuntimeError("cubin_check compiles for the GPU: run it with TRITON_INTERPRET unset")

    target = GPUTarget("cuda", arch, 32)
    seen: dict[Any, Compiled] = {}
    current = {"case": ""}

    def compile_instead_of_launch(*, key: Any, fn: Any, compile: dict, **_: Any) -> bool:
        jit = fn.jit_function
        ident = (fn.name, str(key))
        if ident not in seen:
            consts = {jit.arg_names[path[0]]: str(v) for path, v in compile["constants"].items()}
            c = Compiled(
                fn.name, current["case"], consts, compile["num_warps"], compile["num_stages"]
            )
            try:
                src = ASTSource(
                    jit, compile["signature"], compile["constants"], compile["configs"][0]
                )
                opts = {k: compile[k] for k in ("num_warps", "num_stages", "num_ctas")}
                k = triton.compile(src, target=target, options=opts)
                c.shared = int(k.metadata.shared)
                c.registers, c.local_bytes = _resource_usage(k.asm["cubin"])
                _limits(c, arch)
            except Exception as e:  # noqa: BLE001 - reported, not raised: see every kernel
                c.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
            seen[ident] = c
        return True  # handled: the launch is skipped

    def on_any_device(*ts: Any) -> None:  # CPU tensors stand in for CUDA ones
        return None

    saved_hook = knobs.runtime.jit_cache_hook
    saved_check = common.check_device
    saved_driver = driver._active  # None until first asked: reset_active() would need a GPU
    driver.set_active(_TargetDriver(target))
    knobs.runtime.jit_cache_hook = compile_instead_of_launch
    common.check_device = on_any_device
    try:
        for name, thunk in _cases(list(dtype_names or _DTYPES)):
            current["case"] = name
            thunk()
    finally:
        knobs.runtime.jit_cache_hook = saved_hook
        common.check_device = saved_check
        driver._active = saved_driver
    return list(seen.values())


def _table(results: list[Compiled], arch: int) -> str:
    keys = (
        "BLOCK_M",
        "BLOCK_N",
        "BLOCK_K",
        "BLOCK_R",
        "BLOCK_P",
        "BLOCK_1",
        "BLOCK_2",
        "BLOCK_G",
        "DOT",
    )
    lines = [
        f"sm_{arch}: {len(results)} kernel specializations",
        "",
        "| kernel | first asked by | flags | tiles | warps | stages | smem KiB | regs | local B "
        "| ok |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for c in results:
        tiles = " ".join(
            f"{k.replace('BLOCK_', '')}={c.constexprs[k].replace('triton.language.', '')}"
            for k in keys
            if k in c.constexprs
        )
        flags = " ".join(k for k, v in c.constexprs.items() if v == "True" and k != "DOT_FP32")
        status = "yes" if c.ok else (c.error or "; ".join(c.problems))
        lines.append(
            f"| {c.kernel} | {c.case} | {flags} | {tiles} | {c.num_warps} | {c.num_stages} | "
            f"{c.shared / 1024:.1f} | {c.registers if c.registers is not None else '?'} | "
            f"{c.local_bytes if c.local_bytes is not None else '?'} | {status} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (H100/H200: 90)")
    p.add_argument("--dtypes", nargs="+", choices=_DTYPES, default=list(_DTYPES))
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    results = check(a.arch, a.dtypes)
    print(_table(results, a.arch))
    if a.json:
        with open(a.json, "w") as f:
            json.dump([asdict(c) | {"ok": c.ok} for c in results], f, indent=1)
    bad = [c for c in results if not c.ok]
    if bad:
        print(f"\n{len(bad)} of {len(results)} do not compile or fit sm_{a.arch}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
