"""Host-side cost of a training step, side by side: what the Python and dispatch work of one step
costs per layer, with the math made negligible (hidden 64), mixloom fused vs PEFT.

On a GPU the host queues kernels while the device runs earlier ones; a step is host-bound when
its host work per layer exceeds the device's. The device time of a LLaMA-2-7B layer at 4096
tokens is about 0.559 s / 32 = 17 ms for PEFT's LoRA step on an H200 (bench/RESULTS.md,
2026-11-28); the host time per layer measured here, on this machine's CPU, says how close
mixloom's fused step comes to that, at K = 1, 4 and 16 jobs, and what recomputing adapter
activations adds. Layers at L and 2L give the per-layer figure; aten ops per layer are
counted with a dispatch mode (each is at least one kernel launch on a GPU).

Workload: bench_e2e's (MixLoRA, 8 experts, top-2, r=16, dropout 0.05, all 7 projections) on a
LLaMA with hidden 64, intermediate 128, vocabulary 256, 256 tokens a step; one thread.

`--gpu-dropout` draws dropout bits as the GPU path does (one torch.randint from the job's
stream), not as the CPU path does (a seed, then numpy's PCG64): op counts as a GPU sees them.

Usage: python bench/bench_host.py [--jobs 1 4 16] [--layers 4] [--steps 5] [--gpu-dropout]
"""

from __future__ import annotations

import argparse
import collections
import copy
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e as e2e  # noqa: E402  (the workload, models and hyperparameters)


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _spec(layers: int) -> dict:
    spec = copy.deepcopy(e2e.CONFIGS["cpu"])
    spec["model"].update(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    spec["tokens"] = 256
    return spec


def mixloom_step(spec: dict, jobs: int, recompute: bool):  # type: ignore[no-untyped-def]
    from mixloom.data.tokenize import EncodedRow
    from mixloom.jobspec import MixLoraHyperparameters
    from mixloom.model.adapter_model import AdapterModel
    from mixloom.model.specs import AdapterSpec
    from mixloom.trainer.fused import FusedTrainer
    from mixloom.trainer.job import Job

    model = AdapterModel(e2e._random_model(spec), backend="torch", recompute=recompute)
    trainer = FusedTrainer(model, pad_id=0)
    for i, ids in enumerate(e2e._rows(spec, jobs)):
        hp = MixLoraHyperparameters(
            r=e2e.RANK, lora_alpha=e2e.ALPHA, lora_dropout=e2e.DROPOUT, num_experts=e2e.EXPERTS,
            top_k=e2e.TOP_K, batch_size=1, n_epochs=1000, max_seq_len=len(ids),
            train_on_inputs=True, learning_rate=1e-4,
        )  # fmt: skip
        adapter = AdapterSpec.from_hyperparameters(f"t{i}", hp, seed=i)
        trainer.add_job(Job(name=f"t{i}", adapter=adapter, hp=hp, rows=[EncodedRow(ids, ids)]))
    return trainer.step


def measure(make, layers: int, steps: int) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    """(ms per step, aten ops per step) of the step `make(spec)` builds."""
    step = make(_spec(layers))
    for _ in range(2):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    ms = (time.perf_counter() - t) / steps * 1000
    with _CountOps() as count:
        step()
    return ms, sum(count.ops.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--gpu-dropout", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.gpu_dropout:
        from mixloom.model import layers

        def gpu_path_bits(gen: torch.Generator, count: int, device: torch.device) -> torch.Tensor:
            words = torch.randint(
                -(2**63), 2**63 - 1, ((count + 3) // 4,), dtype=torch.int64, generator=gen
            )
            bits = words.view(torch.int16)
            return bits if bits.shape[0] == count else bits[:count]

        layers.random_bits = gpu_path_bits  # type: ignore[assignment]
    L = args.layers
    path = "GPU-path" if args.gpu_dropout else "CPU-path"
    print(f"hidden 64, {L} and {2 * L} layers, 256 tokens a step, 1 thread, {args.steps} steps,")
    print(f"{path} dropout bits")
    print("\n| system | jobs | host ms per layer | aten ops per layer | ms per step (L layers) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    rows = []
    for jobs in args.jobs:
        rows.append(
            (
                f"peft, LoRA, {jobs} job(s) one after another",
                jobs,
                lambda s, k=jobs: e2e.peft_step(s, k),
            )
        )
        for recompute in (False, True):
            label = "recomputed" if recompute else "kept"
            rows.append(
                (
                    f"mixloom, MixLoRA fused, {label}",
                    jobs,
                    lambda s, k=jobs, r=recompute: mixloom_step(s, k, r),
                )
            )
    for name, jobs, make in rows:
        ms1, ops1 = measure(make, L, args.steps)
        ms2, ops2 = measure(make, 2 * L, args.steps)
        print(
            f"| {name} | {jobs} | {(ms2 - ms1) / L:.1f} | {(ops2 - ops1) / L:,.0f} | {ms1:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
