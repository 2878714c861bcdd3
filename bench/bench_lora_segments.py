"""Kernel-level benchmark: one expert-LoRA projection, forward and forward+backward, side by side.

Methods, all in one process on the same inputs:
- loop:       per-group Python loop over gathered sorted rows (mixloom.kernels.reference,
              the shape of MoE-PEFT's per-expert loop)
- grouped_mm: torch.nn.functional.grouped_mm on gathered sorted rows (stock torch)
- mixloom_torch: mixloom's torch backend (kernels/grouped.py, the CPU path), as the model
              calls it: grouped_mm too, plus its handling of pairs outside every group
- triton:     mixloom's segmented Triton kernels (GPU only: on CPU triton runs in its
              interpreter, which measures nothing useful, so the CPU table has no triton row)

Three ops:
- segments: gate/up shape. x (T, H) -> pairs (T*k, N), rows gathered per pair.
- combine:  down shape. z per pair (T*k, N) -> (T, H), weighted by the routing weight and
            summed per token (the model's down-projection LoRA).
- glu:      the whole expert gate/up: both LoRA deltas on the gathered frozen gate/up of each
            pair, SiLU*up, and the weighted per-token sum (z (P, N) and zsum (T, N) out);
            unfused (two lora_segments + torch epilogue) vs fused (expert_glu).

Configs: `design` is DESIGN.md section 3 (8 adapters x 8 experts, top-2, r=16, 4096 tokens,
4096 -> 11008, bf16); `cpu` is a small proxy that runs here in about a minute.

Usage: python bench/bench_lora_segments.py [--config design|cpu] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixloom import kernels  # noqa: E402
from mixloom.kernels import LoraStack, reference  # noqa: E402


@dataclass(frozen=True)
class Config:
    tokens: int  # T
    top_k: int
    jobs: int
    experts: int  # per job; G = jobs * experts
    rank: int
    hidden: int  # H
    inter: int  # N (the FFN width)
    dtype: str
    reps: int
    warmup: int


CONFIGS = {
    "design": Config(4096, 2, 8, 8, 16, 4096, 11008, "bfloat16", reps=20, warmup=5),
    "cpu": Config(512, 2, 4, 4, 8, 256, 688, "float32", reps=30, warmup=3),
    # Checks this script's triton rows on CPU (TRITON_INTERPRET=1 --with-triton); times nothing.
    "tiny": Config(64, 2, 2, 4, 8, 32, 48, "float32", reps=1, warmup=0),
}


def make_inputs(cfg: Config, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, cfg.dtype)
    G = cfg.jobs * cfg.experts
    T, H, N, R = cfg.tokens, cfg.hidden, cfg.inter, cfg.rank
    job = torch.arange(T) * cfg.jobs // T  # (T,) rows grouped by job, equal shares
    probs, expert = torch.randn(T, cfg.experts, generator=g).softmax(-1).topk(cfg.top_k, -1)
    groups = job[:, None] * cfg.experts + expert  # (T, k)
    weights = probs / probs.sum(-1, keepdim=True)  # (T, k)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    return dict(
        x=rnd(T, H),
        z=rnd(T * cfg.top_k, N),  # per-pair input of the down projection
        A_up=rnd(G, R, H, std=H**-0.5),
        B_up=rnd(G, N, R, std=R**-0.5),
        gate=rnd(T, N),
        up=rnd(T, N),
        A_gate=rnd(G, R, H, std=H**-0.5),
        B_gate=rnd(G, N, R, std=R**-0.5),
        A_down=rnd(G, R, N, std=N**-0.5),
        B_down=rnd(G, H, R, std=R**-0.5),
        scale=torch.full((G,), 2.0, device=device),
        groups=groups.to(device),
        weights=weights.to(device),
        G=G,
    )


# ---- grouped_mm baseline ---------------------------------------------------------------------


def gmm_segments(x, A, B, pair_scale, offs32, rows):
    xs = x.index_select(0, rows)  # (P, H)
    h = F.grouped_mm(xs, A.transpose(1, 2), offs=offs32)  # (P, R)
    h = h * pair_scale[:, None].to(h.dtype)
    return F.grouped_mm(h, B.transpose(1, 2), offs=offs32)  # (P, N)


def gmm_combine(z, A, B, pair_scale, w, offs32, rows, T):
    h = F.grouped_mm(z, A.transpose(1, 2), offs=offs32)  # (P, R)
    h = h * (pair_scale * w)[:, None].to(h.dtype)
    y = F.grouped_mm(h, B.transpose(1, 2), offs=offs32)  # (P, H)
    return torch.zeros(T, y.shape[1], device=y.device, dtype=y.dtype).index_add(0, rows, y)


def glu_glue(lg, lu, gate, up, w, rows, T):
    """The unfused epilogue around two LoRA deltas: gathered frozen gate/up, SiLU*up, the
    weighted per-token sum (the model's code path before expert_glu)."""
    g = gate.index_select(0, rows) + lg.to(gate.dtype)  # (P, I)
    u = up.index_select(0, rows) + lu.to(up.dtype)  # (P, I)
    z = F.silu(g) * u
    zsum = torch.zeros(T, z.shape[1], device=z.device, dtype=z.dtype)
    return z, zsum.index_add(0, rows, z * w[:, None].to(z.dtype))


# ---- timing ----------------------------------------------------------------------------------


def timed(fn: Callable[[], object], reps: int, warmup: int, device: torch.device) -> float:
    """Median milliseconds of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory that fn() allocates above what is held before it (GPU only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def measure(fn, leaves, ref: list[torch.Tensor], cfg: Config, device: torch.device) -> dict:
    """Times fn's forward and forward+backward; checks output and grads against `ref`."""

    def fwd():
        with torch.no_grad():
            return fn(*leaves)

    out0 = fwd()
    outs0 = out0 if isinstance(out0, tuple) else (out0,)
    gen = torch.Generator().manual_seed(1)
    douts = [torch.randn(o.shape, generator=gen).to(o) for o in outs0]

    def fwd_bwd():
        out = fn(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        return [*outs, *torch.autograd.grad(outs, leaves, douts)]

    got = [t.detach() for t in fwd_bwd()]
    if not ref:
        ref.extend(got)
    return dict(
        fwd_ms=timed(fwd, cfg.reps, cfg.warmup, device),
        fwd_bwd_ms=timed(fwd_bwd, cfg.reps, cfg.warmup, device),
        peak_mib=peak_mib(fwd_bwd, device),
        max_rel_err=max(rel_err(g, r) for g, r in zip(got, ref, strict=True)),
    )


def run(cfg: Config, device: torch.device, use_triton: bool, only: list[str]) -> list[dict]:
    inp = make_inputs(cfg, device)
    G, T = inp["G"], cfg.tokens
    pairs = kernels.group_pairs(inp["groups"], G, weights=inp["weights"], with_tiles=use_triton)
    rows, offsets = pairs.rows, pairs.offsets
    P = pairs.num_pairs
    w = pairs.weights.contiguous()  # (P,)
    offs32 = offsets[1:].to(torch.int32)
    pair_group = torch.searchsorted(offsets[1:], torch.arange(P, device=device), right=True)
    pair_scale = inp["scale"][pair_group]  # (P,)
    scale = inp["scale"]

    def lora(A, B):
        return LoraStack(A, B, scale)

    def with_weights(w):  # the routing weights are a leaf of the timed graph
        return replace(pairs, weights=w)

    seg = {
        "loop": lambda x, A, B: reference.lora_segments(x, lora(A, B), pairs, rows),
        "grouped_mm": lambda x, A, B: gmm_segments(x, A, B, pair_scale, offs32, rows),
    }
    comb = {
        "loop": lambda z, A, B, w: reference.lora_combine(z, lora(A, B), with_weights(w), T),
        "grouped_mm": lambda z, A, B, w: gmm_combine(z, A, B, pair_scale, w, offs32, rows, T),
    }
    glu = {
        "loop": lambda x, gate, up, Ag, Bg, Au, Bu, w: reference.expert_glu(
            x, x, gate, up, lora(Ag, Bg), lora(Au, Bu), with_weights(w), rows
        ),
        "grouped_mm": lambda x, gate, up, Ag, Bg, Au, Bu, w: glu_glue(
            gmm_segments(x, Ag, Bg, pair_scale, offs32, rows),
            gmm_segments(x, Au, Bu, pair_scale, offs32, rows),
            gate,
            up,
            w,
            rows,
            T,
        ),  # fmt: skip
    }

    def ours(backend: str) -> tuple:
        """mixloom's kernels as the model calls them, on `backend`."""

        def segments(x, A, B):
            return kernels.lora_segments(x, lora(A, B), pairs, backend=backend)

        def combine(z, A, B, w):
            p = with_weights(w)
            return kernels.lora_combine(z, lora(A, B), p, T, per_pair=True, backend=backend)

        def expert_glu(x, gate, up, Ag, Bg, Au, Bu, w):
            p = with_weights(w)
            return kernels.expert_glu(
                x, x, gate, up, lora(Ag, Bg), lora(Au, Bu), p, backend=backend
            )

        return segments, combine, expert_glu

    # mixloom's own torch backend (kernels/grouped.py: the CPU path)
    seg["mixloom_torch"], comb["mixloom_torch"], glu["mixloom_torch"] = ours("torch")
    if use_triton:
        seg["triton"], comb["triton"], glu["triton_expert_glu"] = ours("triton")

        def tri_glu_unfused(x, gate, up, Ag, Bg, Au, Bu, w):
            lg = kernels.lora_segments(x, lora(Ag, Bg), pairs, backend="triton")
            lu = kernels.lora_segments(x, lora(Au, Bu), pairs, backend="triton")
            return glu_glue(lg, lu, gate, up, w, rows, T)

        def tri_seg_then_add(z, A, B, w):
            # The unfused alternative to lora_combine: pairs out, then weight and scatter.
            y = kernels.lora_segments(z, lora(A, B), pairs, per_pair=True, backend="triton")
            y = y * w[:, None].to(y.dtype)
            return torch.zeros(T, y.shape[1], device=device, dtype=y.dtype).index_add(0, rows, y)

        glu["triton_segments+torch_epilogue"] = tri_glu_unfused
        comb["triton_segments+index_add"] = tri_seg_then_add

    results = []
    ops = [
        ("segments", seg, [inp["x"], inp["A_up"], inp["B_up"]]),
        ("combine", comb, [inp["z"], inp["A_down"], inp["B_down"], w]),
        (
            "glu",
            glu,
            [inp[k] for k in ("x", "gate", "up", "A_gate", "B_gate", "A_up", "B_up")] + [w],
        ),
    ]
    for op, methods, args in ops:
        leaves = [a.detach().requires_grad_(True) for a in args]
        ref: list[torch.Tensor] = []  # the first method run (the loop, by default) is the reference
        for name, fn in methods.items():
            if only and name not in only:
                continue
            try:
                row = measure(fn, leaves, ref, cfg, device)
            except Exception as e:  # one failing method must not hide the others' numbers
                print(f"{op}/{name} failed: {type(e).__name__}: {e}", file=sys.stderr)
                row = dict(fwd_ms=None, fwd_bwd_ms=None, peak_mib=None, max_rel_err=None)
            results.append(dict(op=op, method=name, **row))
    results.append(
        dict(
            op="group_pairs",
            method="torch (device, no sync)",
            fwd_ms=timed(
                lambda: kernels.group_pairs(
                    inp["groups"], G, weights=inp["weights"], with_tiles=use_triton
                ),
                cfg.reps,
                cfg.warmup,
                device,
            ),
            fwd_bwd_ms=None,
            peak_mib=None,
            max_rel_err=None,
        )
    )
    return results


def table(cfg_name: str, cfg: Config, device: torch.device, results: list[dict]) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [
        f"config {cfg_name} on {device_name(device)}: {asdict(cfg)}",
        "",
        "| op | method | fwd ms | fwd+bwd ms | peak MiB (fwd+bwd) | max rel err vs first row |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['op']} | {r['method']} | {f(r['fwd_ms'], '.3f')} | "
            f"{f(r['fwd_bwd_ms'], '.3f')} | {f(r['peak_mib'], '.0f')} | "
            f"{f(r['max_rel_err'], '.1e')} |"
        )
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--methods", nargs="*", default=[], help="only these (default: all)")
    ap.add_argument(
        "--with-triton", action="store_true", help="triton rows on CPU too (TRITON_INTERPRET=1)"
    )
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = args.config or ("design" if device.type == "cuda" else "cpu")
    cfg = CONFIGS[name]
    results = run(cfg, device, device.type == "cuda" or args.with_triton, args.methods)
    print(table(name, cfg, device, results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(config=name, cfg=asdict(cfg), results=results)))


if __name__ == "__main__":
    main()
