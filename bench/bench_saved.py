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
    """Sums the storages autograd saves (each once; parameters excluded)."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            s = t.untyped_storage()
            self.storages[s.data_ptr()] = max(self.storages.get(s.data_ptr(), 0), s.nbytes())
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    @property
    def mib(self) -> float:
        return sum(self.storages.values()) / 2**20


def saved_mixloom(spec: dict, jobs: int, dropout: float) -> float:
    from mixloom.data.tokenize import EncodedRow
    from mixloom.jobspec import MixLoraHyperparameters
    from mixloom.model.adapter_model import AdapterModel
    from mixloom.model.specs import AdapterSpec
    from mixloom.trainer.fused import FusedTrainer
    from mixloom.trainer.job import Job

    trainer = FusedTrainer(AdapterModel(e2e._random_model(spec), backend="torch"), pad_id=0)
    for i, ids in enumerate(e2e._rows(spec, jobs)):
        hp = MixLoraHyperparameters(
            r=e2e.RANK, lora_alpha=e2e.ALPHA, lora_dropout=dropout, num_experts=e2e.EXPERTS,
            top_k=e2e.TOP_K, batch_size=1, n_epochs=1000, max_seq_len=len(ids),
            train_on_inputs=True, learning_rate=1e-4,
        )  # fmt: skip
        adapter = AdapterSpec.from_hyperparameters(f"t{i}", hp, seed=i)
        trainer.add_job(Job(name=f"t{i}", adapter=adapter, hp=hp, rows=[EncodedRow(ids, ids)]))
    count = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(count.pack, count.unpack):
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
    count = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(count.pack, count.unpack):
        model(input_ids=ids, labels=ids).loss.backward()
    return count.mib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--dropout", type=float, nargs="+", default=[0.05, 0.0])
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    spec = copy.deepcopy(e2e.CONFIGS["cpu"])
    print(f"CPU proxy {spec['model']}, {spec['tokens']} tokens a step, fp32")
    print("\n| system | jobs | dropout | saved MiB | saved MiB per layer |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for dropout in args.dropout:
        rows = [("peft, plain LoRA", 1, lambda s, d=dropout: saved_peft(s, d))]
        rows += [
            ("mixloom, MixLoRA fused", k, lambda s, k=k, d=dropout: saved_mixloom(s, k, d))
            for k in args.jobs
        ]
        for name, jobs, fn in rows:
            spec["model"]["num_hidden_layers"] = args.layers
            at = fn(spec)
            spec["model"]["num_hidden_layers"] = 2 * args.layers
            per_layer = (fn(spec) - at) / args.layers
            print(f"| {name} | {jobs} | {dropout} | {at:,.0f} | {per_layer:,.1f} |", flush=True)


if __name__ == "__main__":
    main()
