"""`mixloom train CONFIG`: train every job of a config fused, on one base model."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from mixloom.errors import ConfigError, DataError, Problem, ProblemList, pydantic_problems
from mixloom.jobspec import JobSpec, parse_job


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model: str = "smollm2-135m"  # the embedded default, a local HF folder or a hub id
    output_dir: str = "runs"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: fp32 CPU, bf16 GPU
    device: str = "auto"
    kernel_backend: Literal["auto", "torch", "triton"] = "auto"
    recompute: bool | None = None  # adapter activations recomputed in the backward; None: on GPU
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
    for i, job in parsed:
        for key in ("training_file", "validation_file"):
            value = getattr(job, key)
            if value is not None and not (base / value).exists():
                problems.add(f"{path}: jobs[{i}].{key}", f"file {value!r} does not exist")
    jobs = [job for _, job in parsed]
    problems.raise_if_any(ConfigError)
    return cfg, jobs, base


def _metric_line(m: Any, job: Any, tokens_per_s: float, shared: list[str]) -> dict[str, Any]:
    return {
        "step": m.step,
        "epoch": job.epoch,
        "loss": m.step_loss,
        "aux_loss": m.aux_loss,
        "lr": m.lr,
        "grad_norm": m.grad_norm,
        "tokens_seen": job.tokens_seen,
        "tokens_per_s": round(tokens_per_s, 1),
        "router_load": m.router_load,
        "shared_with": [s for s in shared if s != m.name],
        "time": time.time(),
    }


def train(
    config_path: str | Path, *, resume: bool = False, progress: bool = True
) -> dict[str, str]:
    """Run a train config to the end. Returns each job's final status."""
    from tqdm import tqdm

    from mixloom import kernels
    from mixloom.data.formats import load_jsonl
    from mixloom.data.tokenize import encode_dataset, pad_id_of
    from mixloom.model.adapter_model import AdapterModel
    from mixloom.model.base import load_base_model
    from mixloom.model.formats import save_adapter
    from mixloom.model.specs import AdapterSpec
    from mixloom.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from mixloom.trainer.fused import FusedTrainer
    from mixloom.trainer.job import Job, JobStatus

    cfg, specs, base_dir = read_config(config_path)
    base = load_base_model(cfg.base_model, dtype=cfg.dtype, device=cfg.device)
    problems = ProblemList()
    jobs: list[Job] = []
    for spec in specs:
        hp = spec.method.hyperparameters
        try:
            rows = encode_dataset(
                load_jsonl(base_dir / spec.training_file),
                base.tokenizer,
                max_seq_len=hp.max_seq_len,
                train_on_inputs=hp.train_on_inputs,
            ).rows
            val = (
                encode_dataset(
                    load_jsonl(base_dir / spec.validation_file),
                    base.tokenizer,
                    max_seq_len=hp.max_seq_len,
                    train_on_inputs=hp.train_on_inputs,
                ).rows
                if spec.validation_file
                else []
            )
        except DataError as exc:
            problems.problems.extend(exc.problems)
            continue
        adapter = AdapterSpec.from_hyperparameters(spec.name, hp, seed=spec.seed)
        jobs.append(Job(spec.name, adapter, hp, rows, seed=spec.seed, validation_rows=val))
    problems.raise_if_any(DataError)

    backend = kernels.resolve_backend(cfg.kernel_backend, base.device)
    model = AdapterModel(base.model, backend=backend, recompute=cfg.recompute)
    trainer = FusedTrainer(model, pad_id_of(base.tokenizer))
    out_root = Path(cfg.output_dir)
    if not out_root.is_absolute():
        out_root = base_dir / out_root
    for job in jobs:
        ckpt = latest_checkpoint(out_root / job.name / "checkpoints") if resume else None
        trainer.add_job(job, resume=load_checkpoint(ckpt) if ckpt else None)
        if ckpt:
            print(f"{job.name}: resuming from {ckpt} (step {job.step})", file=sys.stderr)
        (out_root / job.name).mkdir(parents=True, exist_ok=True)

    def finish(job: Job) -> None:
        folder = out_root / job.name
        if job.status == JobStatus.SUCCEEDED:
            ckpt = folder / "checkpoints" / f"step-{job.step}"
            save_checkpoint(trainer, job.name, ckpt, base.name_or_path)
            save_adapter(model, job.name, folder, base.name_or_path)
        else:
            (folder / "error.txt").write_text((job.error or "failed") + "\n")

    total = sum(j.total_steps for j in jobs)
    bar = tqdm(
        total=total,
        initial=sum(j.step for j in jobs),
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
    )
    finished: set[str] = set()
    last_loss: dict[str, float] = {}
    metric_files = {j.name: open(out_root / j.name / "metrics.jsonl", "a") for j in jobs}  # noqa: SIM115
    for job in jobs:  # the starting point, to compare the final validation loss against
        if job.step == 0 and job.validation_rows:
            line = {"step": 0, "val_loss": trainer.validation_loss(job.name), "time": time.time()}
            metric_files[job.name].write(json.dumps(line) + "\n")
    try:
        while trainer.active:
            report = trainer.step()
            for m in report.jobs:
                job = trainer.jobs[m.name]
                if m.stepped and m.step_loss is not None:
                    line = _metric_line(m, job, report.tokens_per_s, report.shared_with)
                    every = job.hp.checkpoint_every
                    if every and job.step % every == 0 and not job.done:
                        save_checkpoint(
                            trainer,
                            job.name,
                            out_root / job.name / "checkpoints" / f"step-{job.step}",
                            base.name_or_path,
                        )
                    if job.done:
                        line["val_loss"] = trainer.validation_loss(job.name)
                    metric_files[m.name].write(json.dumps(line) + "\n")
                    metric_files[m.name].flush()
                    last_loss[m.name] = m.step_loss
                    bar.update(1)
                if job.status != JobStatus.RUNNING and m.name not in finished:
                    finished.add(m.name)
                    finish(job)
                    if job.status == JobStatus.FAILED:
                        bar.write(f"{job.name}: FAILED: {job.error}")
                        bar.update(job.total_steps - job.step)
            losses = " ".join(f"{k}={v:.3f}" for k, v in last_loss.items())
            bar.set_postfix_str(f"{losses} {report.tokens_per_s:,.0f} tok/s")
        for job in jobs:
            if job.name not in finished:
                if job.done and job.status == JobStatus.RUNNING:
                    job.status = JobStatus.SUCCEEDED
                finish(job)
    finally:
        bar.close()
        for f in metric_files.values():
            f.close()
    return {j.name: j.status.value for j in jobs}
