"""The worker's side of a job's evaluation (a job's `evaluation` field): once the job has
trained, its adapter (still loaded) and the base model are scored on the tasks it named, in
one fused eval-mode pass (mixloom/eval), and the results stored with the job.

The base model's scores depend only on the task and the evaluation's settings, so a worker
keeps them (`base_scores`) and scores the base once per task for every job that asks the same.
"""

from __future__ import annotations

from typing import Any

from mixloom.eval.results import TaskResult
from mixloom.eval.scorer import evaluate
from mixloom.eval.tasks import load_task

BASE = "base"  # the base model's name in a job's results


def evaluate_job(
    model: Any,  # model.adapter_model.AdapterModel, the job's adapter loaded in it
    tokenizer: Any,
    adapter: str,
    sources: list[str],
    request: dict[str, Any],
    *,
    base_scores: dict[tuple[Any, ...], dict[str, Any]],
    rendering: str = "chat",
) -> list[dict[str, Any]]:
    """Results, base first, per task: {model, task, n, acc, acc_stderr, acc_norm,
    acc_norm_stderr}, each task named as the job named it (never a server path). Raises
    EvaluationError for a task it cannot load or score.

    `rendering`: how the job's rows became text (chat or plain); the paper and cloze
    protocols ask the adapter, and the base beside it, in that form."""
    names = list(request["tasks"])
    settings = (
        request.get("limit"),
        request.get("protocol", "loglik"),
        request.get("num_fewshot", 0),
        rendering,
    )
    tasks = [load_task(src, param=f"evaluation.tasks[{i}]") for i, src in enumerate(sources)]
    keys = [(src, *settings) for src in sources]
    missing = any(k not in base_scores for k in keys)
    scored = evaluate(
        model,
        tokenizer,
        [adapter, None] if missing else [adapter],
        tasks,
        protocol=settings[1],
        num_fewshot=settings[2],
        limit=settings[0],
        rendering=rendering,
    )
    out = []
    for name, task, key in zip(names, tasks, keys, strict=True):
        if missing:
            base = scored.get(None, task.name)
            assert base is not None
            base_scores[key] = _public(BASE, name, base)
        out.append(base_scores[key])
        mine = scored.get(adapter, task.name)
        assert mine is not None
        out.append(_public(adapter, name, mine))
    return out


def _public(model: str, task: str, r: TaskResult) -> dict[str, Any]:
    return {
        "model": model,
        "task": task,
        "n": r.n,
        "acc": r.acc,
        "acc_stderr": r.acc_stderr,
        "acc_norm": r.acc_norm,
        "acc_norm_stderr": r.acc_norm_stderr,
    }


def evaluation_summary(evaluation: dict[str, Any]) -> str:
    """The job event that reports it: each task's accuracy against the base's."""
    if evaluation.get("status") != "succeeded":
        error = evaluation.get("error") or {}
        return f"Evaluation failed (the job itself succeeded): {error.get('message', 'unknown')}"
    results = evaluation["results"]
    base = {r["task"]: r for r in results if r["model"] == BASE}
    parts = []
    for r in results:
        if r["model"] == BASE:
            continue
        b = base.get(r["task"])
        diff = f", {100 * (r['acc'] - b['acc']):+.1f} points" if b else ""
        parts.append(
            f"{r['task']} acc {100 * r['acc']:.1f}% (base {100 * b['acc']:.1f}%{diff}, "
            f"{r['n']} questions)"
            if b
            else f"{r['task']} acc {100 * r['acc']:.1f}%"
        )
    return "Evaluation: " + "; ".join(parts)
