"""End-to-end training throughput, side by side: mixloom fused vs PEFT vs MoE-PEFT.

Systems, each in its own subprocess (clean peak-memory numbers, and MoE-PEFT in its own venv):
- mixloom:  K MixLoRA jobs (8 experts, top-2, r=16, all 7 projections) in one fused step
            (mixloom.trainer.FusedTrainer), kernel backend auto (triton on CUDA).
- peft:     K plain-LoRA jobs (r=16, all 7 projections), one after another: PEFT cannot
            train several adapters in one batch (PEERS.md). K=1 is the single-tenant anchor.
            Adapter activations are recomputed in the backward on a GPU, kept on a CPU
            (AdapterModel's default); mixloom-recompute and mixloom-kept force either way:
            the speed/memory trade, measured.
- moe-peft: K MixLoRA jobs fused by MoE-PEFT 2.0.2 (bench/peer_moe_peft.py, run in
            bench/.venv-moe-peft made by bench/setup_peers.sh).

Workload: a random-init LLaMA-shaped model; every step holds `tokens` tokens split evenly into
K jobs of one sequence each (4 jobs x 1024 tokens at the GPU config); loss on every token; one
AdamW step per job per step. tokens/s counts every token of the step; memory is the peak
allocated on the GPU, or the peak RSS of the process on CPU.

Configs: `gpu` is DESIGN.md section 7's (LLaMA-2-7B shape, bf16, 4096 tokens/step); `cpu` is
PEERS.md's CPU proxy (hidden 576, 4 layers, vocab 49152, 1024 tokens/step, fp32).

`--profile DIR`: after the timed steps, one more step of mixloom or PEFT under torch's profiler;
DIR gets its busiest ops as a table (profile_<system>_<K>.md), and the result a "device busy"
share: the union of the step's kernel intervals over the unprofiled step time. Well under 100%
on a GPU means the device waited for the host (launch overhead, Python, reads).

Usage: python bench/bench_e2e.py [--config cpu|gpu] [--jobs 1 4 16]
           [--systems mixloom mixloom-recompute mixloom-kept peft moe-peft] [--steps 3] [--warmup 1]
           [--json PATH] [--profile DIR]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
MOE_PEFT_PY = BENCH / ".venv-moe-peft" / "bin" / "python"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CONFIGS = {
    "gpu": dict(
        model=dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
            max_position_embeddings=4096,
            rope_theta=10000.0,
        ),
        dtype="bfloat16",
        tokens=4096,
    ),
    "cpu": dict(
        model=dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=4,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            max_position_embeddings=2048,
            rope_theta=100000.0,
        ),
        dtype="float32",
        tokens=1024,
    ),
}
RANK, ALPHA, DROPOUT, EXPERTS, TOP_K = 16, 32, 0.05, 8, 2


# ---- workers (run in a subprocess) -----------------------------------------------------------


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _random_model(spec: dict):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, spec["dtype"])
    cfg = LlamaConfig(**spec["model"], tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(_device()):  # initialise in place: a 7B init on the host takes minutes
        model = LlamaForCausalLM(cfg).to(dtype)
    model.requires_grad_(False)
    return model


def _rows(spec: dict, jobs: int) -> list[list[int]]:
    import torch

    per_job = spec["tokens"] // jobs
    g = torch.Generator().manual_seed(1)
    vocab = spec["model"]["vocab_size"]
    return [torch.randint(3, vocab, (per_job,), generator=g).tolist() for _ in range(jobs)]


def _timed_steps(step, steps: int, warmup: int) -> float:
    """Seconds per step (mean over `steps` after `warmup`)."""
    import torch

    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - t0) / steps


def _profiled(step, steps_seconds: float, out: str | None, label: str) -> dict:  # type: ignore[no-untyped-def]
    """One more step under torch's profiler (see --profile): its busiest ops into
    out/profile_<label>.md; -> the step's kernel count and device-busy share."""
    if out is None:
        return {}
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=activities) as prof:
        step()
        sync()
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == DeviceType.CUDA
    )
    busy, end = 0, None
    for lo, hi in spans:  # union of the kernels' intervals, in microseconds
        if end is None or lo > end:
            busy += hi - lo
            end = hi
        elif hi > end:
            busy += hi - end
            end = hi
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=30)
    path = Path(out) / f"profile_{label}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"{label}: {len(spans)} kernels, device busy {busy / 1e3:.1f} ms of a "
        f"{steps_seconds * 1e3:.1f} ms step (unprofiled)\n\n{table}\n"
    )
    if not cuda:
        return {}
    return dict(kernels=len(spans), device_busy=busy / 1e6 / steps_seconds)


def _peak_mib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peft_step(spec: dict, jobs: int):  # type: ignore[no-untyped-def]
    """PEFT's side: K plain-LoRA adapters on one model, one AdamW each; the step trains them
    one after another, each on its own sequence."""
    import torch
    import torch.distributed.tensor  # noqa: F401  (peft touches it without importing it)
    from peft import LoraConfig, get_peft_model

    model = _random_model(spec)
    cfg = LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=PROJECTIONS,
        task_type="CAUSAL_LM",
    )  # fmt: skip
    names = [f"t{i}" for i in range(jobs)]
    pm = get_peft_model(model, cfg, adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, cfg)
    opts = {}
    for n in names:
        # PEFT keeps adapter weights in fp32 over a bf16 base (autocast_adapter_dtype)
        params = [p for name, p in pm.named_parameters() if f".{n}." in name]
        opts[n] = torch.optim.AdamW(params, lr=1e-4)
    dev = _device()
    batches = [torch.tensor([r], device=dev) for r in _rows(spec, jobs)]

    def step():
        for n, ids in zip(names, batches, strict=True):
            pm.base_model.set_adapter(n)
            pm(input_ids=ids, labels=ids).loss.backward()
            opts[n].step()
            opts[n].zero_grad(set_to_none=True)

    return step


def worker_peft(spec: dict, jobs: int, steps: int, warmup: int, profile: str | None = None) -> dict:
    step = peft_step(spec, jobs)
    sec = _timed_steps(step, steps, warmup)
    peak = _peak_mib()
    return dict(
        seconds_per_step=sec, peak_mib=peak, **_profiled(step, sec, profile, f"peft_{jobs}")
    )


def worker_mixloom(
    spec: dict,
    jobs: int,
    steps: int,
    warmup: int,
    profile: str | None = None,
    recompute: bool | None = None,
) -> dict:
    from mixloom.data.tokenize import EncodedRow
    from mixloom.jobspec import MixLoraHyperparameters
    from mixloom.kernels import resolve_backend
    from mixloom.model.adapter_model import AdapterModel
    from mixloom.model.specs import AdapterSpec
    from mixloom.trainer.fused import FusedTrainer
    from mixloom.trainer.host import tune_cpu_allocator
    from mixloom.trainer.job import TrainingJob

    model = _random_model(spec)
    backend = resolve_backend("auto", _device())  # MIXLOOM_KERNEL_BACKEND overrides
    am = AdapterModel(model, backend=backend, recompute=recompute)
    if am.device.type == "cpu":  # as `mixloom train` on a CPU does
        tune_cpu_allocator()
    trainer = FusedTrainer(am, pad_id=0)
    for i, ids in enumerate(_rows(spec, jobs)):
        hp = MixLoraHyperparameters(
            r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, num_experts=EXPERTS, top_k=TOP_K,
            batch_size=1, n_epochs=1000, max_seq_len=len(ids), train_on_inputs=True,
            learning_rate=1e-4,
        )  # fmt: skip
        name = f"t{i}"
        adapter = AdapterSpec.from_hyperparameters(name, hp, seed=i)
        trainer.add_job(TrainingJob(name=name, adapter=adapter, hp=hp, rows=[EncodedRow(ids, ids)]))
    sec = _timed_steps(trainer.step, steps, warmup)
    peak = _peak_mib()
    mode = {None: "", True: "_recompute", False: "_kept"}[recompute]
    extra = _profiled(trainer.step, sec, profile, f"mixloom{mode}_{jobs}")
    return dict(seconds_per_step=sec, peak_mib=peak, backend=backend, **extra)


# ---- driver ----------------------------------------------------------------------------------


def run_one(
    system: str, config: str, jobs: int, steps: int, warmup: int, profile: str | None = None
) -> dict:
    spec = CONFIGS[config]
    args = dict(system=system, config=config, jobs=jobs, steps=steps, warmup=warmup)
    if system == "moe-peft":
        if not MOE_PEFT_PY.exists():
            return dict(error="no bench/.venv-moe-peft: run bench/setup_peers.sh")
        cmd = [str(MOE_PEFT_PY), str(BENCH / "peer_moe_peft.py"), json.dumps({**args, **spec})]
    else:
        worker = {**args, "profile": profile}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(worker)]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT ") :])
            res["tokens_per_s"] = spec["tokens"] / res["seconds_per_step"]
            return res
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return dict(error=" | ".join(tail) or f"exit {proc.returncode}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default=None)
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--systems", nargs="+", default=["mixloom", "peft", "moe-peft"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--profile", default=None, help="folder for one profiled step's tables")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        w = json.loads(args.worker)
        fn = {
            "peft": worker_peft,
            "mixloom": worker_mixloom,  # recompute as AdapterModel chooses: on GPU, off on CPU
            # adapter activations recomputed in the backward, or kept for it, whatever the device
            "mixloom-recompute": functools.partial(worker_mixloom, recompute=True),
            "mixloom-kept": functools.partial(worker_mixloom, recompute=False),
        }[w["system"]]
        res = fn(CONFIGS[w["config"]], w["jobs"], w["steps"], w["warmup"], w.get("profile"))
        print("RESULT " + json.dumps(res), flush=True)
        return

    import torch

    config = args.config or ("gpu" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    mem = "peak GPU MiB" if torch.cuda.is_available() else "peak RSS MiB"
    print(f"config {config} on {where}: {json.dumps(CONFIGS[config])}", flush=True)
    rows = []
    for system in args.systems:
        for jobs in args.jobs:
            res = run_one(system, config, jobs, args.steps, args.warmup, args.profile)
            rows.append(dict(system=system, jobs=jobs, **res))
            print(f"  {system} K={jobs}: {res}", file=sys.stderr, flush=True)
    busy = any("device_busy" in r for r in rows)
    extra = " kernels | device busy |" if busy else ""
    print(f"\n| system | jobs | tokens/s | s/step | {mem} |{extra}")
    print("| --- | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if busy else ""))
    for r in rows:
        if "error" in r:
            print(f"| {r['system']} | {r['jobs']} | failed: {r['error'][:120]} | | |")
            continue
        line = (
            f"| {r['system']} | {r['jobs']} | {r['tokens_per_s']:,.0f} | "
            f"{r['seconds_per_step']:.3f} | {r['peak_mib']:,.0f} |"
        )
        if busy:
            k, b = r.get("kernels"), r.get("device_busy")
            line += f" {k:,} | {b:.0%} |" if k is not None else " | |"
        print(line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(config=config, rows=rows)))


if __name__ == "__main__":
    main()
