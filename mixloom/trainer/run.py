"""`mixloom train CONFIG`: train every job of a config fused, on one base model.

Every path in a config (base_model when it is a folder, output_dir, each job's
training_file and validation_file) is relative to the config file, so a config and the
files beside it can move together."""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import yaml
from pydantic import ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from mixloom.config import ModelSettings
from mixloom.errors import ConfigError, DataError, Problem, ProblemList, pydantic_problems
from mixloom.jobspec import JobSpec, parse_job

if TYPE_CHECKING:
    from mixloom.trainer.distributed import DataParallel


class TrainConfig(ModelSettings):
    """A train config: how to load the base (ModelSettings, at the top level) and the jobs."""

    model_config = ConfigDict(extra="forbid")

    output_dir: str = "runs"
    jobs: Annotated[list[dict[str, Any]], Field(min_length=1)]


def read_config(path: str | Path) -> tuple[TrainConfig, list[JobSpec], Path]:
    """Parse and validate a YAML/JSON train config; every problem is reported at once."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(
            f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping with base_model, output_dir, jobs"
        )
    try:
        cfg = TrainConfig.model_validate(data)
    except PydanticValidationError as exc:
        raise ConfigError(
            [Problem(f"{path}: {p.where}", p.message) for p in pydantic_problems(exc)]
        ) from None
    problems = ProblemList()
    parsed: list[tuple[int, JobSpec]] = []
    for i, raw in enumerate(cfg.jobs):
        try:
            parsed.append((i, parse_job(raw, where=f"jobs[{i}]")))
        except ConfigError as exc:
            for p in exc.problems:
                problems.add(f"{path}: {p.where}", p.message)
    names = [raw.get("name", "job") for raw in cfg.jobs]
    for name in sorted({n for n in names if names.count(n) > 1}, key=str):
        problems.add(f"{path}: jobs", f"job name {name!r} is used twice; names must be unique")
    base = path.parent
    cfg = cfg.model_copy(update={"base_model": _relative_to(base, cfg.base_model)})
    for i, job in parsed:
        for key in ("training_file", "validation_file"):
            value = getattr(job, key)
            if value is not None and not (base / value).exists():
                problems.add(f"{path}: jobs[{i}].{key}", f"file {value!r} does not exist")
    jobs = [job for _, job in parsed]
    problems.raise_if_any(ConfigError)
    return cfg, jobs, base


def _relative_to(base: Path, base_model: str) -> str:
    """base_model as a folder relative to the config file when it names one there (or is
    written as a path: './', '../', '~'); else as given (the embedded default, a hub id, an
    absolute path)."""
    given = Path(base_model).expanduser()
    if given.is_absolute():
        return str(given)
    candidate = base / given
    if base_model.startswith(("./", "../", "~")) or candidate.exists():
        return str(candidate.resolve())
    return base_model


def train(
    config_path: str | Path, *, resume: bool = False, progress: bool = True
) -> dict[str, str]:
    """Run a train config to the end. Returns each job's final state.

    Under torchrun (WORLD_SIZE > 1) the processes train the config data-parallel
    (trainer/distributed.py): each its share of every micro-batch, rank 0 alone writing
    checkpoints, metrics and adapters."""
    from mixloom.trainer.distributed import DataParallel

    config = read_config(config_path)  # its problems before any process group forms
    parallel = DataParallel.from_env(config[0].device)
    try:
        return _train(config, resume=resume, progress=progress, parallel=parallel)
    finally:
        if parallel is not None:
            parallel.close()


def _train(
    config: tuple[TrainConfig, list[JobSpec], Path],
    *,
    resume: bool,
    progress: bool,
    parallel: DataParallel | None,
) -> dict[str, str]:
    from tqdm import tqdm

    from mixloom.config import get_settings
    from mixloom.trainer.job import TrainingJob, TrainingState
    from mixloom.trainer.session import TrainingSession, metric_object

    cfg, specs, base_dir = config
    out_root = Path(cfg.output_dir)
    if not out_root.is_absolute():
        out_root = base_dir / out_root
    writes = parallel is None or parallel.writes
    if parallel is not None:
        cfg = cfg.model_copy(update={"device": parallel.device})
        progress = progress and writes
    tune = get_settings().cpu_malloc_tuning is not False  # this process only trains
    session = TrainingSession.load(cfg, tune_allocator=tune, parallel=parallel)
    problems = ProblemList()
    encoded = []
    for spec in specs:  # every file's problems first, before any job starts
        hp, preference = spec.method.hyperparameters, spec.method.preference
        try:
            rows = session.encode(base_dir / spec.training_file, hp, preference)
            val = (
                session.encode(base_dir / spec.validation_file, hp, preference)
                if spec.validation_file
                else []
            )
        except DataError as exc:
            problems.problems.extend(exc.problems)
            continue
        encoded.append((spec, rows, val))
    problems.raise_if_any(DataError)
    with parallel.rank_zero_first() if parallel is not None else nullcontext():
        for spec, rows, val in encoded:
            job = session.add(
                spec.name,
                spec.method.hyperparameters,
                seed=spec.seed,
                rows=rows,
                validation_rows=val,
                folder=out_root / spec.name,
                resume=resume,
                preference=spec.method.preference,
            )
            if job.step and writes:
                print(
                    f"{job.name}: resuming from its checkpoint at step {job.step}", file=sys.stderr
                )
    jobs = list(session.jobs.values())

    # one bar in each job's own optimizer steps (the jobs step together, so the longest job
    # is the run's length), each job's step and loss beside it
    bar = tqdm(
        total=max(j.total_steps for j in jobs),
        initial=max(j.step for j in jobs),
        desc=f"{len(jobs)} job{'s' if len(jobs) > 1 else ''}",
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
    )

    def advance() -> None:
        bar.update(max(j.step for j in jobs) - bar.n)

    finished: set[str] = set()
    last_loss: dict[str, float] = {}
    metric_files = {
        j.name: open(out_root / j.name / "metrics.jsonl", "a")  # noqa: SIM115
        for j in jobs
        if writes
    }

    def record(name: str, step: int, values: dict[str, Any]) -> None:
        if not writes:
            return
        metric_files[name].write(json.dumps(metric_object(step, values)) + "\n")
        metric_files[name].flush()

    def finish(job: TrainingJob) -> None:
        finished.add(job.name)
        folder = out_root / job.name
        if not writes:
            return
        if job.state == TrainingState.SUCCEEDED:
            session.finish(job.name)
            session.export(job.name, folder)
        else:
            (folder / "error.txt").write_text((job.error or "failed") + "\n")
            bar.write(f"{job.name}: FAILED: {job.error}")

    try:
        for job in jobs:
            baseline = session.baseline(job.name) if writes else None
            if baseline is not None:
                record(job.name, 0, baseline)
            if job.state != TrainingState.RUNNING:  # resumed from its final checkpoint
                finish(job)
        while session.active:
            result = session.step()
            for s in result.jobs:
                if s.checkpoint_error is not None:  # one user, one disk: stop as before
                    raise s.checkpoint_error
                if s.metrics is not None:
                    record(s.name, s.step, s.metrics)
                    last_loss[s.name] = s.metrics["train_loss"]
                if s.job.state != TrainingState.RUNNING and s.name not in finished:
                    finish(s.job)
            advance()
            each = " ".join(
                f"{j.name} {j.step}/{j.total_steps}"
                + (f" loss={last_loss[j.name]:.3f}" if j.name in last_loss else "")
                for j in jobs
            )
            bar.set_postfix_str(f"{each} {result.report.tokens_per_second:,.0f} tok/s")
    finally:
        bar.close()
        for f in metric_files.values():
            f.close()
    return {j.name: j.state.value for j in jobs}
