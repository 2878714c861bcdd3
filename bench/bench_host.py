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

`--gpu-path` runs the step as a GPU would, minus the device: the triton kernel backend and the
counter-based dropout kernel, with every triton launch counted and skipped (TRITON_INTERPRET=1,
the interpreter's launch replaced by a counter), so values are garbage and the trainer's
non-finite checks are switched off. "launches" are then the aten ops that are neither views nor
allocations, plus the triton launches: what a GPU pays a kernel launch for. (On the CPU path
the same ops are counted, though some of them would not be launches: the dropout bits drawn
on the host.) The triton launcher's own host cost on a GPU (argument binding, ~10-20 us a
launch) is not in the milliseconds. The draw of an adapter's dropout seeds is counted as a
launch here, though on a GPU it runs on the host: a few ops a job a step.

Usage: python bench/bench_host.py [--jobs 1 4 16] [--layers 4] [--steps 5] [--gpu-path]
"""

from __future__ import annotations

import argparse
import collections
import copy
import os
import sys
import time
import types
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e as e2e  # noqa: E402  (the workload, models and hyperparameters)

# aten ops that only make a new view of existing memory (or read a scalar): no kernel launch
_VIEWS = {
    "alias", "as_strided", "detach", "expand", "lift_fresh", "narrow", "permute", "reshape",
    "select", "slice", "split", "split_with_sizes", "squeeze", "t", "transpose", "unbind",
    "unsqueeze", "view", "_unsafe_view", "_local_scalar_dense", "scalar_tensor",
}  # fmt: skip
_ALLOCATIONS = {"empty", "empty_like", "new_empty", "empty_strided"}  # the caching allocator's
_TRITON_LAUNCHES: collections.Counter[str] = collections.Counter()


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    def launches(self) -> int:
        """Ops that launch a kernel on a GPU: aten ops other than views and allocations."""
        return sum(
            n
            for op, n in self.ops.items()
            if op.split(".")[1] not in _VIEWS and op.split(".")[1] not in _ALLOCATIONS
        )


def _gpu_path() -> None:
    """Triton backend and counter-based dropout, launches counted and skipped (see above)."""
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["MIXLOOM_DROPOUT_RNG"] = "counter"
    import triton.runtime.interpreter as interpreter

    def counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        _TRITON_LAUNCHES[self.fn.__name__] += 1

    interpreter.InterpretedFunction.run = counted  # type: ignore[method-assign]
    import mixloom.trainer.fused as fused

    fused.math = types.SimpleNamespace(isfinite=lambda value: True)  # type: ignore[attr-defined]


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


def mixloom_step(spec: dict, jobs: int, recompute: bool, backend: str = "torch"):  # type: ignore[no-untyped-def]
    from mixloom.data.tokenize import EncodedRow
    from mixloom.jobspec import MixLoraHyperparameters
    from mixloom.model.adapter_model import AdapterModel
    from mixloom.model.specs import AdapterSpec
    from mixloom.trainer.fused import FusedTrainer
    from mixloom.trainer.host import tune_cpu_allocator
    from mixloom.trainer.job import TrainingJob

    model = AdapterModel(e2e._random_model(spec), backend=backend, recompute=recompute)
    if model.device.type == "cpu":  # as `mixloom train` on a CPU does
        tune_cpu_allocator()
    trainer = FusedTrainer(model, pad_id=0)
    for i, ids in enumerate(e2e._rows(spec, jobs)):
        hp = MixLoraHyperparameters(
            r=e2e.RANK, lora_alpha=e2e.ALPHA, lora_dropout=e2e.DROPOUT, num_experts=e2e.EXPERTS,
            top_k=e2e.TOP_K, batch_size=1, n_epochs=1000, max_seq_len=len(ids),
            train_on_inputs=True, learning_rate=1e-4,
        )  # fmt: skip
        adapter = AdapterSpec.from_hyperparameters(f"t{i}", hp, seed=i)
        trainer.add_job(
            TrainingJob(name=f"t{i}", adapter=adapter, hp=hp, rows=[EncodedRow(ids, ids)])
        )
    return trainer.step


def measure(make, layers: int, steps: int) -> tuple[float, int, int]:  # type: ignore[no-untyped-def]
    """(ms per step, aten ops per step, launches per step) of the step `make(spec)` builds."""
    step = make(_spec(layers))
    for _ in range(2):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    ms = (time.perf_counter() - t) / steps * 1000
    _TRITON_LAUNCHES.clear()
    with _CountOps() as count:
        step()
    return ms, sum(count.ops.values()), count.launches() + sum(_TRITON_LAUNCHES.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--gpu-path", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.gpu_path:
        _gpu_path()
    backend = "triton" if args.gpu_path else "torch"
    L = args.layers
    path = (
        "GPU path (triton backend, counter-based dropout; launches counted, not run)"
        if args.gpu_path
        else "CPU path (torch backend, dropout bits from PCG64)"
    )
    print(f"hidden 64, {L} and {2 * L} layers, 256 tokens a step, 1 thread, {args.steps} steps,")
    print(path)
    print(
        "\n| system | jobs | host ms per layer | aten ops per layer | launches per layer "
        "| ms per step (L layers) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
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
                    lambda s, k=jobs, r=recompute: mixloom_step(s, k, r, backend),
                )
            )
    for name, jobs, make in rows:
        ms1, ops1, n1 = measure(make, L, args.steps)
        ms2, ops2, n2 = measure(make, 2 * L, args.steps)
        print(
            f"| {name} | {jobs} | {(ms2 - ms1) / L:.1f} | {(ops2 - ops1) / L:,.0f} "
            f"| {(n2 - n1) / L:,.0f} | {ms1:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
