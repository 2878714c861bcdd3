"""Activation memory, side by side: bytes autograd saves for the backward of one training step.

Peak RSS on a CPU mixes the allocator, Python and the weights into one number; what a training
step really adds, and what grows with the layer count, is what autograd keeps for the backward.
This counts it exactly (torch.autograd.graph.saved_tensors_hooks, each storage once, no
parameters), on the same workload as bench_e2e.py's CPU proxy:
- mixloom: K MixLoRA jobs fused (8 experts, top-2, r=16, all 7 projections), one step;
- peft:    one plain-LoRA job (r=16, all 7 projections), one step: the memory anchor of the
           DESIGN targets ("four MixLoRA jobs within PEFT's single-job memory").
Rows at `--layers` and twice that give the per-layer figure (the part that scales with depth).

Usage: python bench/bench_saved.py [--jobs 1 4] [--dropout 0.05 0.0] [--layers 4]
       python bench/bench_saved.py --config gpu --tokens 1024 --layers 1   (LLaMA-2-7B widths,
       bf16, on the CPU: saved bytes do not depend on the device; they scale with the tokens)
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e as e2e  # noqa: E402  (the workload, models and hyperparameters)


class SavedBytes:
    """Sums the storages autograd saves in the forward (each once), as a context manager
    around one training step. The model's parameters and buffers are not activations and are
    excluded, views of them too (a linear saves its weight as a transposed view, which is no
    Parameter). Saves made once the backward has begun (a recomputation's, freed at once)
    are not what the forward keeps, and are not counted."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.storages: dict[int, int] = {}
        tensors = [*model.parameters(), *model.buffers()]
        self.model_storages = {t.untyped_storage().data_ptr() for t in tensors}
        self.backward_began = False

    def __enter__(self) -> SavedBytes:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._hooks.__enter__()
        self._backward = torch.Tensor.backward

        def backward(t: torch.Tensor, *args: object, **kwargs: object) -> None:
            self.backward_began = True
            self._backward(t, *args, **kwargs)  # type: ignore[arg-type]

        torch.Tensor.backward = backward  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        torch.Tensor.backward = self._backward  # type: ignore[method-assign]
        self._hooks.__exit__(*exc)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if not self.backward_began and s.data_ptr() not in self.model_storages:
            self.storages[s.data_ptr()] = max(self.storages.get(s.data_ptr(), 0), s.nbytes())
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    @property
    def mib(self) -> float:
        return sum(self.storages.values()) / 2**20


def saved_mixloom(spec: dict, jobs: int, dropout: float, recompute: bool = True) -> float:
    from mixloom.data.tokenize import EncodedRow
    from mixloom.jobspec import MixLoraHyperparameters
    from mixloom.model.adapter_model import AdapterModel
    from mixloom.model.specs import AdapterSpec
    from mixloom.trainer.fused import FusedTrainer
    from mixloom.trainer.host import tune_cpu_allocator
    from mixloom.trainer.job import TrainingJob

    model = AdapterModel(e2e._random_model(spec), backend="torch", recompute=recompute)
    if model.device.type == "cpu":  # as `mixloom train` on a CPU does
        tune_cpu_allocator()
    trainer = FusedTrainer(model, pad_id=0)
    for i, ids in enumerate(e2e._rows(spec, jobs)):
        hp = MixLoraHyperparameters(
            r=e2e.RANK, lora_alpha=e2e.ALPHA, lora_dropout=dropout, num_experts=e2e.EXPERTS,
            top_k=e2e.TOP_K, batch_size=1, n_epochs=1000, max_seq_len=len(ids),
            train_on_inputs=True, learning_rate=1e-4,
        )  # fmt: skip
        adapter = AdapterSpec.from_hyperparameters(f"t{i}", hp, seed=i)
        trainer.add_job(
            TrainingJob(name=f"t{i}", adapter=adapter, hp=hp, rows=[EncodedRow(ids, ids)])
        )
    with SavedBytes(model.model) as count:
        trainer.step()
    return count.mib


def saved_peft(spec: dict, dropout: float) -> float:
    import torch.distributed.tensor  # noqa: F401  (peft touches it without importing it)
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=e2e.RANK, lora_alpha=e2e.ALPHA, lora_dropout=dropout, target_modules=e2e.PROJECTIONS,
        task_type="CAUSAL_LM",
    )  # fmt: skip
    model = get_peft_model(e2e._random_model(spec), cfg)
    ids = torch.tensor(e2e._rows(spec, 1))
    with SavedBytes(model) as count:
        model(input_ids=ids, labels=ids).loss.backward()
    return count.mib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--dropout", type=float, nargs="+", default=[0.05, 0.0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--kept", action="store_true", help="also rows with recompute=False")
    ap.add_argument("--config", choices=sorted(e2e.CONFIGS), default="cpu")
    ap.add_argument("--tokens", type=int, default=None, help="tokens a step (config's default)")
    args = ap.parse_args()
    spec = copy.deepcopy(e2e.CONFIGS[args.config])
    spec["tokens"] = args.tokens or spec["tokens"]
    print(f"{args.config} config {spec['model']}, {spec['tokens']} tokens a step, {spec['dtype']}")
    print("\n| system | jobs | dropout | saved MiB | saved MiB per layer |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for dropout in args.dropout:
        rows = [("peft, plain LoRA", 1, lambda s, d=dropout: saved_peft(s, d))]
        rows += [
            (
                f"mixloom, MixLoRA fused{label}",
                k,
                lambda s, k=k, d=dropout, r=r: saved_mixloom(s, k, d, r),
            )
            for k in args.jobs
            for label, r in ((", recomputed", True), (", kept", False))
            if args.kept or r
        ]
        for name, jobs, fn in rows:
            spec["model"]["num_hidden_layers"] = args.layers
            at = fn(spec)
            spec["model"]["num_hidden_layers"] = 2 * args.layers
            per_layer = (fn(spec) - at) / args.layers
            print(f"| {name} | {jobs} | {dropout} | {at:,.0f} | {per_layer:,.1f} |", flush=True)


if __name__ == "__main__":
    main()
