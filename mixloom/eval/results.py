"""Evaluation results: one record per (adapter, task), JSON in and out, and the table that
`mixloom eval` prints (base vs each adapter, per task, with the difference).

Torch-free, so that whatever stores or shows results (the worker's job record, the API, a
client) reads them with the same code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

BASE = "base"  # how the base model (adapter None) is shown


def mean_stderr(values: Sequence[float]) -> float | None:
    """lm-eval's standard error of a mean: the sample standard deviation (n - 1) over
    sqrt(n); None below two values."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


@dataclass(frozen=True)
class TaskResult:
    """One adapter's score on one task. `acc_norm` is None where the protocol has none."""

    task: str
    adapter: str | None  # None: the base model
    split: str
    protocol: str
    num_fewshot: int
    n: int  # questions scored
    acc: float
    acc_stderr: float | None
    acc_norm: float | None = None
    acc_norm_stderr: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskResult:
        values: dict[str, Any] = {k: data.get(k) for k in cls.__dataclass_fields__}
        return cls(**values)


@dataclass(frozen=True)
class EvalResults:
    results: tuple[TaskResult, ...]

    def get(self, adapter: str | None, task: str) -> TaskResult | None:
        return next((r for r in self.results if r.adapter == adapter and r.task == task), None)

    @property
    def adapters(self) -> list[str | None]:
        return list(dict.fromkeys(r.adapter for r in self.results))

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(r.task for r in self.results))

    def to_json(self) -> dict[str, Any]:
        return {"object": "evaluation.results", "data": [r.to_json() for r in self.results]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EvalResults:
        return cls(tuple(TaskResult.from_json(r) for r in data["data"]))


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _cell(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "-"
    return f"{_pct(value)} ± {_pct(stderr)}" if stderr is not None else _pct(value)


def format_table(results: EvalResults, *, metric: str = "acc") -> str:
    """A Markdown table in percent: per task, the base model (when scored) and each adapter,
    with each adapter's difference from the base in points."""
    adapters = results.adapters
    with_base = None in adapters
    head = ["task", "n"]
    for a in adapters:
        name = BASE if a is None else a
        head.append(f"{name} {metric}")
        if with_base and a is not None:
            head.append(f"{name} - {BASE}")
    rows = [head, ["---"] + ["---:"] * (len(head) - 1)]
    for task in results.tasks:
        base = results.get(None, task)
        base_value = getattr(base, metric) if base else None
        first = next(r for r in results.results if r.task == task)
        row = [task, str(first.n)]
        for a in adapters:
            r = results.get(a, task)
            value = getattr(r, metric) if r else None
            row.append(_cell(value, getattr(r, f"{metric}_stderr") if r else None))
            if with_base and a is not None:
                diff = None if value is None or base_value is None else value - base_value
                row.append("-" if diff is None else f"{100 * diff:+.1f}")
        rows.append(row)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)
