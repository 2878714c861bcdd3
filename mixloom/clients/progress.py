"""How far a job has got: total optimizer steps, progress and ETA from its metrics.

The dashboard's JavaScript (server/static/app.js, `totalSteps`) computes the same thing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mixloom.clients.types import Job, Metric


def total_steps(job: Job, training_rows: int | None, latest: Metric | None = None) -> int | None:
    """The metrics' own `total_steps` when the worker reports it; otherwise
    ceil(rows / batch_size) * n_epochs, capped by max_steps."""
    if latest is not None:
        reported = latest.metrics.get("total_steps")
        if isinstance(reported, int) and reported > 0:
            return reported
    hp = job.hyperparameters
    max_steps = hp.get("max_steps")
    estimate = None
    if training_rows:
        batch = max(1, int(hp.get("batch_size") or 1))
        estimate = math.ceil(training_rows / batch) * max(1, int(hp.get("n_epochs") or 1))
    if isinstance(max_steps, int) and max_steps > 0:
        return min(max_steps, estimate) if estimate else max_steps
    return estimate


@dataclass(frozen=True)
class Progress:
    step: int
    total: int | None
    fraction: float | None  # 0..1
    eta_s: float | None
    tokens_per_second: float | None


def progress(job: Job, metrics: list[Metric], training_rows: int | None) -> Progress:
    """Progress from a job's metric series (oldest first)."""
    latest = metrics[-1] if metrics else None
    total = total_steps(job, training_rows, latest)
    step = latest.step if latest else 0
    if job.status == "succeeded" and total:
        step = max(step, total)
    fraction = min(1.0, step / total) if total else None
    eta = None
    reported = latest.metrics.get("eta_seconds") if latest else None
    if isinstance(reported, int | float) and job.status == "running":
        eta = float(reported)
    elif total and len(metrics) >= 2 and job.status == "running":
        first, last = metrics[0], metrics[-1]
        per_step = (last.created_at - first.created_at) / max(1, last.step - first.step)
        eta = max(0.0, (total - step) * per_step)
    tps = latest.metrics.get("tokens_per_second") if latest else None
    return Progress(
        step=step,
        total=total,
        fraction=fraction,
        eta_s=eta,
        tokens_per_second=float(tps) if isinstance(tps, int | float) else None,
    )
