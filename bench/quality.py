"""Quality: LoRA vs MixLoRA trained by mixloom at matched trainable parameters, on the
MixLoRA paper's tasks, scored on questions never trained on, beside the base model.

What runs, top-down (one process, one base model):
1. Rows. Per task, `mixloom data task`'s rows (`mixloom.eval.tasks.training_rows`) of its
   `train` split, written to JSONL files and read back as `mixloom train` reads them; the
   `validation` split picks the learning rate, the `test` split is reported. The three never
   share a question (mixloom/eval/tasks.py says which official rows each holds).
2. Learning rate. On `--search-task` only, LoRA and MixLoRA at each of `--lrs` (seed 0)
   train fused in one TrainingSession and are scored on validation rows; each method keeps
   its best rate (ties: the lower), and that job is its seed-0 job of the task (the same
   rows, seed and rate). Test rows play no part.
3. Training. Every (task, method, seed) job at its method's rate trains in ONE
   TrainingSession: each fused step holds rows of every running job (mixloom's normal mode).
4. Scoring. Per task, the base and that task's adapters in one fused evaluation
   (`mixloom.eval.evaluate`) on the test rows, under the protocol that matches the rows
   (`--format cloze`: the cloze protocol, acc and acc_norm; `--format paper`: the paper's),
   plus the base under lm-eval's own zero-shot protocol (loglik) for reference.

Matched parameters: MixLoRA (attention LoRA r on q/k/v/o, `--experts` experts of rank r on
gate/up/down, top-k router) against a LoRA on all seven projections whose rank is the
nearest to the same count; both counts are printed and stored.

Usage:
  python bench/quality.py                          # all eight tasks, seeds 0,1,2 (a GPU)
  OMP_NUM_THREADS=1 python bench/quality.py --tasks arc_easy,piqa,winogrande --seeds 0,1 \\
      --train-rows 64 --test-rows 60 --lr lora=3e-3 --lr mixlora=1e-3 --epochs 2 \\
      --batch-size 4 --per-task --no-lm-eval-base   # QUALITY.md's 2-core CPU run (31 min)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixloom.config import ModelSettings  # noqa: E402
from mixloom.eval.results import EvalResults, format_table  # noqa: E402
from mixloom.eval.scorer import evaluate  # noqa: E402
from mixloom.eval.tasks import load_task, task_names, training_rows  # noqa: E402
from mixloom.jobspec import LoraHyperparameters, MixLoraHyperparameters  # noqa: E402
from mixloom.model.base import load_base_model  # noqa: E402
from mixloom.trainer.job import TrainingState  # noqa: E402
from mixloom.trainer.session import TrainingSession  # noqa: E402

METHODS = ("lora", "mixlora")


@dataclass(frozen=True)
class Setup:
    base_model: str
    fmt: str
    epochs: int
    batch_size: int
    max_seq_len: int
    r: int  # MixLoRA's attention and expert rank
    experts: int
    top_k: int
    lora_r: int  # the matched LoRA's rank

    def hyperparameters(self, method: str, lr: float) -> LoraHyperparameters:
        train = dict(
            n_epochs=self.epochs,
            batch_size=self.batch_size,
            learning_rate=lr,
            max_seq_len=self.max_seq_len,
            lora_dropout=0.05,
        )
        if method == "lora":
            return LoraHyperparameters(r=self.lora_r, lora_alpha=2 * self.lora_r, **train)
        return MixLoraHyperparameters(
            r=self.r,
            lora_alpha=2 * self.r,
            num_experts=self.experts,
            top_k=self.top_k,
            router_aux_loss_coef=0.01,  # the paper's
            **train,
        )


def matched_lora_rank(config: Any, r: int, experts: int) -> tuple[int, int, int]:
    """(LoRA rank, LoRA parameters, MixLoRA parameters) per layer: the LoRA on all seven
    projections whose count is nearest MixLoRA's (attention r, E experts of rank r, router)."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    attention = (h + h) + (h + kv) + (h + kv) + (h + h)  # q, k, v, o: in + out per rank
    mlp = 3 * (h + i)  # gate, up, down
    mixlora = r * attention + experts * r * mlp + experts * h
    rank = round(mixlora / (attention + mlp))
    return rank, rank * (attention + mlp), mixlora


def _encode_task(
    session: TrainingSession, task: str, split: str, setup: Setup, n: int | None, folder: Path
) -> Any:
    path = folder / f"{task}-{split}-{setup.fmt}.jsonl"
    rows = training_rows(load_task(task, split), setup.fmt)[:n]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return session.encode(path, setup.hyperparameters("lora", 1e-4))


def train_fused(
    session: TrainingSession, jobs: dict[str, tuple[LoraHyperparameters, int, Any]], folder: Path
) -> dict[str, Any]:
    """Train `jobs` (name -> hyperparameters, seed, rows) together to the end; returns their
    time, tokens and last losses."""
    from tqdm import tqdm

    for name, (hp, seed, rows) in jobs.items():
        session.add(name, hp, seed=seed, rows=rows, folder=folder / name, resume=False)
    total = sum(session.jobs[n].total_steps for n in jobs)
    bar = tqdm(total=total, unit="step", desc="train", dynamic_ncols=True, file=sys.stderr)
    start, tokens, last = time.time(), 0, {}
    while session.active:
        result = session.step()
        for s in result.jobs:
            if s.job.state == TrainingState.FAILED:
                raise RuntimeError(f"{s.name} failed: {s.job.error}")
            if s.metrics is not None:
                last[s.name] = round(s.metrics["train_loss"], 4)
                tokens += s.metrics["tokens"]
                bar.update(1)
    bar.close()
    seconds = time.time() - start
    return {
        "seconds": round(seconds, 1),
        "tokens": tokens,
        "tokens_per_second": round(tokens / seconds, 1),
        "final_train_loss": last,
    }


def _progress(desc: str) -> Any:
    from tqdm import tqdm

    bar = tqdm(unit="seq", desc=desc, dynamic_ncols=True, file=sys.stderr)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return update


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def table(runs: dict[str, Any], metric: str) -> str:
    """Per task: base (same protocol; and lm-eval's zero-shot), each method's mean ± sd over
    seeds and each seed's value, in percent."""
    head = "| task | test n | base (lm-eval 0-shot) | base | LoRA | MixLoRA | LoRA seeds | MixLoRA seeds |"
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for task, run in runs.items():
        res = EvalResults.from_json(run["results"])
        base = res.get(None, task)
        lm = (
            EvalResults.from_json(run["base_lm_eval"]).get(None, task)
            if "base_lm_eval" in run
            else None
        )
        if base is None or getattr(base, metric) is None:
            continue
        cells = {}
        for method in METHODS:
            vals = [
                getattr(r, metric)
                for r in res.results
                if r.adapter and r.adapter.startswith(f"{task}-{method}-")
            ]
            cells[method] = (_mean_sd(vals), " ".join(f"{100 * v:.1f}" for v in vals))
        lm_value = getattr(lm, metric) if lm else None
        lines.append(
            f"| {task} | {base.n} | {'-' if lm_value is None else f'{100 * lm_value:.1f}'} | "
            f"{100 * getattr(base, metric):.1f} | {cells['lora'][0]} | {cells['mixlora'][0]} | "
            f"{cells['lora'][1]} | {cells['mixlora'][1]} |"
        )
    return "\n".join(lines)


def _search(
    session: TrainingSession, setup: Setup, task: str, lrs: list[float], args: Any, work: Path
) -> tuple[dict[str, float], dict[str, str], dict[str, Any]]:
    """Each method at each rate (seed 0) trained fused on `task`'s train rows and scored on
    its validation rows; returns the rate each keeps, the job kept as its seed-0 job on
    `task`, and what the search saw. The other search jobs are removed."""
    rows = _encode_task(session, task, "train", setup, args.train_rows, work)
    names = {(m, lr): f"{task}-{m}-s0-lr{lr:.0e}" for m in METHODS for lr in lrs}
    jobs = {name: (setup.hyperparameters(m, lr), 0, rows) for (m, lr), name in names.items()}
    trained = train_fused(session, jobs, work)
    res = evaluate(
        session.model,
        session.base.tokenizer,
        [None, *jobs],
        [load_task(task, "validation")],
        protocol=args.fmt,
        limit=args.valid_rows,
        batch_tokens=args.eval_tokens,
        progress=_progress("validation"),
    )
    print(f"validation ({task}):\n{format_table(res)}", file=sys.stderr)
    best = {}
    for m in METHODS:
        scores = [(res.get(names[m, lr], task).acc, -lr, lr) for lr in lrs]  # type: ignore[union-attr]
        best[m] = max(scores)[2]
    kept = {m: names[m, best[m]] for m in METHODS}
    for name in set(jobs) - set(kept.values()):
        session.remove(name)
    return best, kept, {"task": task, "training": trained, "validation": res.to_json()}


def _write(path: str, out: dict[str, Any], started: float) -> None:
    out["seconds"] = round(time.time() - started, 1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(path)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--base-model", default="smollm2-135m")
    p.add_argument("--tasks", default=",".join(task_names()))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--format", dest="fmt", default="cloze", choices=("cloze", "paper"))
    p.add_argument("--train-rows", type=int, help="first N train rows per task (default all)")
    p.add_argument("--valid-rows", type=int, default=200)
    p.add_argument("--test-rows", type=int, help="first N test questions per task (default all)")
    p.add_argument("--lrs", default="2e-4,5e-4,1e-3,2e-3", help="learning rates to search")
    p.add_argument(
        "--lr",
        action="append",
        default=[],
        metavar="METHOD=RATE",
        help="a method's rate, found by an earlier search (both given: no search)",
    )
    p.add_argument("--search-task", help="the task the rates are picked on (default: the first)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--r", type=int, default=8, help="MixLoRA's attention and expert rank")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument(
        "--per-task",
        action="store_true",
        help="train and score one task's jobs at a time (a CPU's memory: ten jobs' kept "
        "activations took 15 GB); a job's result is the same either way",
    )
    p.add_argument("--eval-batch-tokens", type=int, help="default: 4096 on a CPU, 65536 on a GPU")
    p.add_argument(
        "--no-lm-eval-base",
        action="store_true",
        help="skip the base's lm-eval zero-shot column (a CPU saves a sixth of the scoring)",
    )
    p.add_argument("--json", default="bench/results/quality.json")
    args = p.parse_args()

    tasks = [load_task(t).name for t in args.tasks.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    given = {m: float(r) for m, _, r in (x.partition("=") for x in args.lr)}
    base = load_base_model(args.base_model)
    session = TrainingSession(base, ModelSettings(base_model=args.base_model), tune_allocator=True)
    tok = base.tokenizer
    args.eval_tokens = args.eval_batch_tokens or (65536 if base.device.type == "cuda" else 4096)
    lora_r, lora_params, mix_params = matched_lora_rank(base.model.config, args.r, args.experts)
    setup = Setup(
        args.base_model,
        args.fmt,
        args.epochs,
        args.batch_size,
        args.max_seq_len,
        args.r,
        args.experts,
        args.top_k,
        lora_r,
    )
    out: dict[str, Any] = {
        "setup": setup.__dict__,
        "seeds": seeds,
        "device": str(base.device),
        "dtype": str(base.dtype),
        "protocol": args.fmt,
        "rows": {"train": args.train_rows, "validation": args.valid_rows, "test": args.test_rows},
    }
    work = Path(tempfile.mkdtemp(prefix="mixloom-quality-"))
    started = time.time()

    # 1-2. each method's learning rate, on the search task's train and validation rows
    search_task = load_task(args.search_task or tasks[0]).name
    kept: dict[str, str] = {}
    if set(given) == set(METHODS):
        best = given
    else:
        best, kept, out["search"] = _search(
            session, setup, search_task, [float(x) for x in args.lrs.split(",")], args, work
        )
    out["learning_rates"] = best
    # 3-4. every (task, method, seed) job trained fused (all at once, or a task at a time),
    # then per task the base and its adapters scored in one fused pass on the test rows
    jobs: dict[str, dict[str, Any]] = {}
    for task in tasks:
        rows = _encode_task(session, task, "train", setup, args.train_rows, work)
        jobs[task] = {
            f"{task}-{m}-s{seed}": (setup.hyperparameters(m, best[m]), seed, rows)
            for m in METHODS
            for seed in seeds
            if not (task == search_task and seed == 0 and m in kept)  # the kept search job
        }
        out.setdefault("train_rows", {})[task] = len(rows)
    counts = {}
    for m in METHODS:  # exact counts, from an adapter of each kind
        session.add(
            f"count-{m}",
            setup.hyperparameters(m, 1e-4),
            seed=0,
            rows=rows,
            folder=work / m,
            resume=False,
        )
        counts[m] = sum(x.numel() for x in session.model.adapter_parameters(f"count-{m}"))
        session.remove(f"count-{m}")
    out["trainable_parameters"] = {
        **counts,
        "per_layer": {"lora": lora_params, "mixlora": mix_params},
    }
    print(f"learning rates {best}; trainable parameters {counts}", file=sys.stderr)

    groups = [[t] for t in tasks] if args.per_task else [tasks]
    runs: dict[str, Any] = {}
    out["training"] = []
    for group in groups:
        todo = {name: job for t in group for name, job in jobs[t].items()}
        out["training"].append({"tasks": group, **train_fused(session, todo, work)})
        for task in group:
            names = sorted([*todo, *kept.values()])
            names = [n for n in names if n.startswith(f"{task}-")]
            test = load_task(task, "test")
            res = evaluate(
                session.model,
                tok,
                [None, *names],
                [test],
                protocol=args.fmt,
                limit=args.test_rows,
                batch_tokens=args.eval_tokens,
                progress=_progress(task),
            )
            runs[task] = {"results": res.to_json()}
            print(f"test ({task}):\n{format_table(res)}", file=sys.stderr)
            if not args.no_lm_eval_base:
                ref = evaluate(
                    session.model,
                    tok,
                    [None],
                    [test],
                    protocol="loglik",
                    limit=args.test_rows,
                    batch_tokens=args.eval_tokens,
                )
                runs[task]["base_lm_eval"] = ref.to_json()
            if args.per_task:
                for name in names:
                    session.remove(name)
        # what is scored so far, kept at once: a run stopped by a time limit (bench/gpu.sh)
        # still leaves every finished task's numbers
        _write(args.json, {**out, "runs": runs, "complete": False}, started)
    out["runs"] = runs
    out["complete"] = True
    _write(args.json, out, started)
    print(f"\n{args.fmt} rows, {args.fmt} protocol; percent; mean ± sd over seeds {seeds}\n")
    print("acc\n\n" + table(runs, "acc"))
    if args.fmt == "cloze":
        print("\nacc_norm\n\n" + table(runs, "acc_norm"))
    print(f"\n{out['seconds']:.0f} s; results in {args.json}")


if __name__ == "__main__":
    main()
