"""`mixloom files|jobs|adapters|models|usage|chat`: the API from a shell, through `Client`.

The server and key come from --base-url / $MIXLOOM_BASE_URL (default
http://127.0.0.1:8000) and --api-key / $MIXLOOM_API_KEY. --json prints the API's objects.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from mixloom.clients.client import API_KEY_ENV, BASE_URL_ENV, DEFAULT_BASE_URL, Client
from mixloom.clients.errors import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    ConflictError,
    NotFoundError,
)
from mixloom.clients.progress import progress, total_steps
from mixloom.clients.types import File, Job, Metric, Model
from mixloom.errors import MixloomError
from mixloom.jobspec import method_body

STATUSES = ("validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled")


class ClientCommandError(MixloomError):
    """A client command was given something it cannot use (the message says what)."""


def explain(exc: MixloomError) -> str:
    """An error of a client command as its user reads it: the server's message, and what to
    type next where the server cannot know (a flag, an environment variable, a command)."""
    message = str(exc)
    if isinstance(exc, AuthenticationError):
        if exc.code == "missing_api_key":
            return (
                f"no API key: give --api-key KEY or set {API_KEY_ENV}=KEY (an admin makes one "
                "with `mixloom tenants create NAME`, run where `mixloom serve` runs)"
            )
        if exc.code == "invalid_api_key":
            return (
                f"the server refused the API key (unknown or revoked): check --api-key or "
                f"${API_KEY_ENV}, or ask an admin for a new one (`mixloom keys create TENANT`)"
            )
    if isinstance(exc, APIConnectionError):
        return f"{message}; `mixloom serve` starts one here"
    if isinstance(exc, ConflictError) and exc.code == "adapter_not_ready":
        return f"{message}; `mixloom jobs watch JOB_ID` follows it to the end"
    if isinstance(exc, NotFoundError) and exc.param in ("job_id", "file_id", "checkpoint_id"):
        what = {"job_id": "jobs", "file_id": "files", "checkpoint_id": "jobs"}[exc.param]
        return f"{message} (`mixloom {what} list` shows yours)"
    return message


def register(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--base-url",
        default=None,
        help=f"the mixloom server (default ${BASE_URL_ENV} or {DEFAULT_BASE_URL})",
    )
    common.add_argument("--api-key", default=None, help=f"your API key (default ${API_KEY_ENV})")
    common.add_argument("--json", action="store_true", help="print the API's JSON objects")

    models = sub.add_parser("models", help="base models and your fine-tuned models")
    msub = models.add_subparsers(dest="action", metavar="ACTION", required=True)
    msub.add_parser(
        "list", parents=[common], help="list the base models, then your fine-tuned models"
    ).set_defaults(func=_models_list)
    mg = msub.add_parser("get", parents=[common], help="show one model (or a checkpoint model)")
    mg.add_argument("model_id", help="a base model's id, or ft:... of yours")
    mg.set_defaults(func=_models_get)
    md = msub.add_parser(
        "delete",
        parents=[common],
        help="delete a fine-tuned model's weights (the job stays), or a checkpoint model",
    )
    md.add_argument("model_id", help="ft:... (a job's fine_tuned_model, or a checkpoint's)")
    md.set_defaults(func=_models_delete)

    files = sub.add_parser("files", help="upload and manage JSONL training files")
    fsub = files.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = fsub.add_parser(
        "upload", parents=[common], help="upload a JSONL file (checked line by line)"
    )
    up.add_argument(
        "path",
        type=Path,
        help="a JSONL file: chat, prompt/completion, alpaca or text rows, or preference pairs",
    )
    up.add_argument(
        "--purpose",
        default="fine-tune",
        choices=["fine-tune", "evals"],
        help='fine-tune (training rows, the default) or evals (an evaluation task: {"query", '
        '"choices", "gold"} rows)',
    )
    up.set_defaults(func=_files_upload)
    fl = fsub.add_parser("list", parents=[common], help="list your files, newest first")
    _list_options(fl)
    fl.set_defaults(func=_files_list)
    fg = fsub.add_parser("get", parents=[common], help="show one file")
    fg.add_argument("file_id", help="the file's id (file-...)")
    fg.set_defaults(func=_files_get)
    fd = fsub.add_parser("delete", parents=[common], help="delete a file no unfinished job uses")
    fd.add_argument("file_id", help="the file's id (file-...)")
    fd.set_defaults(func=_files_delete)

    jobs = sub.add_parser("jobs", help="create, list, watch and control fine-tuning jobs")
    jsub = jobs.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = jsub.add_parser("create", parents=[common], help="create a fine-tuning job")
    create.add_argument(
        "--training-file",
        required=True,
        help="a file id (file-...) or a local JSONL path to upload",
    )
    create.add_argument("--validation-file", help="a file id or a local JSONL path")
    create.add_argument(
        "--method",
        choices=("lora", "mixlora"),
        default="lora",
        help="the adapter to train: lora (default) or mixlora (a mixture of LoRA experts)",
    )
    create.add_argument(
        "--objective",
        choices=("supervised", "dpo"),
        default="supervised",
        help="supervised (default: learn the answers) or dpo (learn to prefer "
        "preferred_output over non_preferred_output: a file of preference rows; "
        "--hp beta=0.1)",
    )
    create.add_argument("--model", help="base model id (default: the server's first)")
    create.add_argument(
        "--hp",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a hyperparameter, e.g. --hp r=16 --hp learning_rate=1e-4 "
        "--hp target_modules=q_proj,v_proj (repeat)",
    )
    create.add_argument("--seed", type=int, help="the same seed and data, the same adapter")
    create.add_argument(
        "--suffix", help="up to 64 letters, digits, '_', '.', '-': part of the model's id"
    )
    create.add_argument(
        "--metadata",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a pair kept and shown with the job (repeat; up to 16)",
    )
    create.add_argument(
        "--evaluate",
        metavar="TASKS",
        help="once trained, score the adapter and the base on these tasks (comma-separated: "
        "arc_easy, piqa, ... or ids of files uploaded with --purpose evals)",
    )
    create.add_argument(
        "--eval-limit", type=int, default=200, help="questions per task to evaluate (default 200)"
    )
    create.add_argument("--watch", action="store_true", help="then watch it to the end")
    create.set_defaults(func=_jobs_create)
    jl = jsub.add_parser("list", parents=[common], help="list your jobs, newest first")
    _list_options(jl)
    jl.add_argument("--status", choices=STATUSES, help="only the jobs in this state")
    jl.set_defaults(func=_jobs_list)
    for name, helptext, func in (
        ("get", "show a job and its progress", _jobs_get),
        ("cancel", "cancel a job", _jobs_cancel),
        ("pause", "pause a job (a running one checkpoints first)", _jobs_pause),
        ("resume", "queue a paused job again", _jobs_resume),
        ("watch", "live progress bar with loss until the job ends", _jobs_watch),
        ("events", "a job's events, oldest first", _jobs_events),
        (
            "evaluation",
            "a job's evaluation: its adapter against the base, per task",
            _jobs_evaluation,
        ),
    ):
        p = jsub.add_parser(name, parents=[common], help=helptext)
        p.add_argument("job_id", help="the job's id (ftjob-...)")
        p.set_defaults(func=func)

    adapters = sub.add_parser("adapters", help="download trained adapters")
    asub = adapters.add_subparsers(dest="action", metavar="ACTION", required=True)
    dl = asub.add_parser(
        "download", parents=[common], help="download a job's adapter zip (or a checkpoint's)"
    )
    dl.add_argument("job_id", help="the job (ftjob-...) whose adapter to download")
    dl.add_argument("--checkpoint", help="a checkpoint id (ftckpt-...); default: the final adapter")
    dl.add_argument(
        "-o",
        "--output",
        default=".",
        help="a file name, or a directory (existing, or written with a trailing '/') for the "
        "server's file name (default: here)",
    )
    dl.add_argument(
        "--extract",
        action="store_true",
        help="unpack it: into --output as a folder (a directory: a folder in it named after "
        "the archive), ready for PEFT or mixloom generate --adapter",
    )
    dl.add_argument(
        "--format",
        choices=("safetensors", "mixlora"),
        help="safetensors (default): the files as stored; mixlora: adapter_model.bin in place "
        "of the safetensors file, for the `mixlora` package (MixLoRA adapters)",
    )
    dl.set_defaults(func=_adapters_download)
    rm = asub.add_parser(
        "delete",
        parents=[common],
        help="delete a finished job's adapter zip (or its checkpoints), freeing storage",
    )
    rm.add_argument("job_id", help="the job's id (ftjob-...)")
    which = rm.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", help="one checkpoint id (ftckpt-...) instead")
    which.add_argument("--all-checkpoints", action="store_true", help="every checkpoint instead")
    rm.set_defaults(func=_adapters_delete)

    usage = sub.add_parser(
        "usage", parents=[common], help="what you store and run, against your quotas"
    )
    usage.set_defaults(func=_usage)

    chat = sub.add_parser(
        "chat",
        parents=[common],
        help="chat with a base model or one of your fine-tuned models (streams the answer)",
    )
    chat.add_argument(
        "model",
        help="a base model's id, ft:... of yours (mixloom models list), or a job's id (ftjob-...): "
        "the model it made",
    )
    chat.add_argument("-m", "--message", help="send this one message, print the answer, exit")
    chat.add_argument("--system", help="a system message first")
    sampling_options(chat)
    chat.set_defaults(func=_chat)


def sampling_options(parser: argparse.ArgumentParser) -> None:
    """The decoding flags of `mixloom chat` and `mixloom generate`."""
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most")
    parser.add_argument(
        "--temperature", type=float, default=0.7, help="0: greedy; higher: more varied"
    )
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="sample from the likeliest tokens up to this mass"
    )
    parser.add_argument("--seed", type=int, help="the same seed, the same answer")


def _chat(args: argparse.Namespace) -> int:
    """One message (--message), or a conversation read from stdin line by line (interactive
    on a terminal: `/exit` or Ctrl-D ends it); the whole conversation goes with each turn."""
    client = _client(args)
    model = args.model
    if model.startswith("ftjob-"):
        job = client.get_job(model)
        if not job.fine_tuned_model:
            raise ClientCommandError(
                f"job {model} is {job.status} and has made no model yet; "
                f"`mixloom jobs watch {model}` follows it"
            )
        model = job.fine_tuned_model
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = args.message is None and sys.stdin.isatty()
    if interactive:
        print(f"chatting with {model}; /exit or Ctrl-D to end", file=sys.stderr)
    turns = iter([args.message]) if args.message is not None else _lines(interactive)
    for text in turns:
        if not text.strip():
            continue
        if text.strip() in ("/exit", "/quit"):
            break
        messages.append({"role": "user", "content": text})
        stream = client.chat(model, messages, stream=True, **_sampling(args))
        messages.append({"role": "assistant", "content": print_stream(stream)})
    return 0


def _lines(interactive: bool) -> Any:
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not interactive and not line:
            return
        yield line.rstrip("\n")


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    given = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
    }
    return {k: v for k, v in given.items() if v is not None}


def print_stream(stream: Any) -> str:
    """Print a CompletionStream's text as it comes, then (to stderr) its tokens, tokens/s and
    time to the first token; returns the text."""
    parts = []
    for delta in stream:
        sys.stdout.write(delta.text)
        sys.stdout.flush()
        parts.append(delta.text)
    sys.stdout.write("\n")
    tokens = (stream.usage or {}).get("completion_tokens")
    print(
        generation_stats(tokens, stream.time_to_first_token, stream.tokens_per_second),
        file=sys.stderr,
    )
    return "".join(parts)


def generation_stats(tokens: int | None, first: float | None, rate: float | None) -> str:
    """`[12 tokens, 31.5 tokens/s, first after 0.21 s]`, the parts that are known."""
    parts = [
        f"{tokens} tokens" if tokens is not None else None,
        f"{rate:.1f} tokens/s" if rate is not None else None,
        f"first after {first:.2f} s" if first is not None else None,
    ]
    return "[" + ", ".join(p for p in parts if p) + "]"


def _list_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=int, default=20, help="page size (1-100)")
    parser.add_argument("--after", help="the last id of the previous page")
    parser.add_argument("--all", action="store_true", help="every page, not just one")


def _client(args: argparse.Namespace) -> Client:
    return Client(args.base_url, args.api_key)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _when(ts: int | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _file_row(f: File) -> list[str]:
    return [f.id, f.filename, str(f.rows), str(f.bytes), _when(f.created_at)]


JOB_HEADER = ["ID", "STATUS", "METHOD", "MODEL", "SUFFIX", "TOKENS", "CREATED"]


def _job_row(j: Job) -> list[str]:
    status = j.status + (f" ({j.requested_action} requested)" if j.requested_action else "")
    return [
        j.id,
        status,
        j.method_label,
        j.model,
        j.suffix or "-",
        str(j.trained_tokens or 0),
        _when(j.created_at),
    ]


# --- models ---------------------------------------------------------------------------


def _model_rows(models: list[Model]) -> None:
    _table(
        [[m.id, str(m.max_position_embeddings), m.owned_by, m.description] for m in models],
        ["ID", "CONTEXT", "OWNER", "DESCRIPTION"],
    )


def _models_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        models = client.list_models()
    if args.json:
        _print_json([m.raw for m in models])
    else:
        _model_rows(models)
    return 0


def _models_get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        model = client.get_model(args.model_id)
    if args.json:
        _print_json(model.raw)
    else:
        _model_rows([model])
    return 0


def _models_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        deleted = client.delete_model(args.model_id)
    print(json.dumps(deleted.raw) if args.json else f"deleted {deleted.id}")
    return 0


# --- files ----------------------------------------------------------------------------


def _files_upload(args: argparse.Namespace) -> int:
    if not args.path.exists():
        raise ClientCommandError(f"{args.path}: no such file; give the path of a JSONL file")
    if not args.path.is_file():
        raise ClientCommandError(f"{args.path} is not a file; give the path of a JSONL file")
    with _client(args) as client:
        f = client.upload_file(args.path, purpose=args.purpose)
    if args.json:
        _print_json(f.raw)
    else:
        print(f"{f.id}\t{f.filename}\t{f.rows} rows")
    return 0


def _files_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.all:
            rows = list(client.iter_files(page_size=min(100, args.limit)))
            more = False
        else:
            page = client.list_files(after=args.after, limit=args.limit)
            rows, more = page.data, page.has_more
    if args.json:
        _print_json([f.raw for f in rows])
    else:
        _table([_file_row(f) for f in rows], ["ID", "FILENAME", "ROWS", "BYTES", "CREATED"])
        if more:
            print(f"(more: --after {rows[-1].id}, or --all)")
    return 0


def _files_get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        f = client.get_file(args.file_id)
    if args.json:
        _print_json(f.raw)
    else:
        _table([_file_row(f)], ["ID", "FILENAME", "ROWS", "BYTES", "CREATED"])
    return 0


def _files_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete_file(args.file_id)
    print(
        json.dumps({"id": args.file_id, "deleted": True})
        if args.json
        else f"deleted {args.file_id}"
    )
    return 0


# --- jobs -----------------------------------------------------------------------------


def parse_hyperparameter(text: str) -> tuple[str, Any]:
    """ "r=16" -> ("r", 16); JSON values are decoded, "a,b" becomes a list, else a string."""
    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
        raise ClientCommandError(f"--hp {text!r}: write NAME=VALUE, e.g. --hp r=16")
    raw = raw.strip()
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = [v.strip() for v in raw.split(",") if v.strip()] if "," in raw else raw
    if isinstance(value, float) and not math.isfinite(value):
        raise ClientCommandError(f"--hp {text!r}: give a finite number")
    return name.strip(), value


def _file_id(client: Client, value: str, flag: str) -> str:
    """A file id as given (file-...), or a local JSONL file uploaded first."""
    path = Path(value)
    if path.is_file():
        f = client.upload_file(path)
        print(f"uploaded {path} as {f.id} ({f.rows} rows)", file=sys.stderr)
        return f.id
    if value.startswith("file-") and not path.exists():
        return value
    if path.is_dir():
        raise ClientCommandError(f"{flag} {value}: a directory; give a JSONL file or a file id")
    raise ClientCommandError(
        f"{flag} {value}: no such local file (nor a file id: those start with 'file-'); give "
        "the path of a JSONL file, or the id `mixloom files upload PATH` printed"
    )


def parse_metadata(pairs: list[str]) -> dict[str, str] | None:
    """["team=search", "run=3"] -> {"team": "search", "run": "3"}: values stay strings."""
    out = {}
    for text in pairs:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise ClientCommandError(f"--metadata {text!r}: write KEY=VALUE, e.g. team=search")
        out[key.strip()] = value
    return out or None


def _jobs_create(args: argparse.Namespace) -> int:
    hp = dict(parse_hyperparameter(h) for h in args.hp)
    metadata = parse_metadata(args.metadata)
    with _client(args) as client:
        training = _file_id(client, args.training_file, "--training-file")
        validation = (
            _file_id(client, args.validation_file, "--validation-file")
            if args.validation_file
            else None
        )
        job = client.create_job(
            training_file=training,
            validation_file=validation,
            model=args.model,
            method=method_body(args.objective, args.method, hp),
            seed=args.seed,
            suffix=args.suffix,
            metadata=metadata,
            evaluation=(
                {
                    "tasks": [t.strip() for t in args.evaluate.split(",") if t.strip()],
                    "limit": args.eval_limit,
                }
                if args.evaluate
                else None
            ),
        )
        if args.json:
            _print_json(job.raw)
        else:
            print(f"{job.id}\t{job.status}")
        if args.watch:
            return _watch(client, job.id, quiet=args.json)
    return 0


def _jobs_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.all:
            rows = list(client.iter_jobs(status=args.status, page_size=min(100, args.limit)))
            more = False
        else:
            page = client.list_jobs(after=args.after, limit=args.limit, status=args.status)
            rows, more = page.data, page.has_more
    if args.json:
        _print_json([j.raw for j in rows])
    else:
        _table([_job_row(j) for j in rows], JOB_HEADER)
        if more:
            print(f"(more: --after {rows[-1].id}, or --all)")
    return 0


def _training_rows(client: Client, job: Job) -> int | None:
    try:
        return client.get_file(job.training_file).rows
    except APIError:
        return None  # the file was deleted after the job finished


def _jobs_get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.get_job(args.job_id)
        if args.json:
            _print_json(job.raw)
            return 0
        metrics = list(client.iter_metrics(job.id))
        p = progress(job, metrics, _training_rows(client, job))
    print(f"{job.id}  {job.status}  {job.method_label} on {job.model}")
    if job.suffix:
        print(f"  suffix: {job.suffix}")
    for key, value in (job.metadata or {}).items():
        print(f"  metadata {key}: {value}")
    if job.requested_action:
        print(f"  {job.requested_action} requested")
    if job.queue_position:
        print(f"  queue position: {job.queue_position}")
    step = f"{p.step}/{p.total}" if p.total else str(p.step)
    pct = f" ({p.fraction:.0%})" if p.fraction is not None else ""
    print(f"  step {step}{pct}")
    loss = metrics[-1].train_loss if metrics else None
    if loss is not None:
        print(f"  loss {loss:.4f}")
    preference = _preference(metrics[-1]) if metrics else {}
    if preference:
        print("  reward " + ", ".join(f"{name} {value}" for name, value in preference.items()))
    if p.tokens_per_second is not None:
        print(f"  {p.tokens_per_second:.0f} tokens/s")
    if p.eta_s is not None:
        print(f"  ETA {p.eta_s:.0f} s")
    if job.error:
        print(f"  error: {job.error.message}")
    if job.fine_tuned_model:
        print(f"  model: {job.fine_tuned_model}")
    if job.adapter_available:
        print(f"  adapter: mixloom adapters download {job.id}")
    return 0


def _transition(args: argparse.Namespace, action: str) -> int:
    with _client(args) as client:
        job = getattr(client, f"{action}_job")(args.job_id)
    if args.json:
        _print_json(job.raw)
    else:
        _table([_job_row(job)], JOB_HEADER)
    return 0


def _jobs_cancel(args: argparse.Namespace) -> int:
    return _transition(args, "cancel")


def _jobs_pause(args: argparse.Namespace) -> int:
    return _transition(args, "pause")


def _jobs_resume(args: argparse.Namespace) -> int:
    return _transition(args, "resume")


def _jobs_events(args: argparse.Namespace) -> int:
    with _client(args) as client:
        events = list(client.iter_events(args.job_id))[::-1]
    if args.json:
        _print_json([e.raw for e in events])
    else:
        for e in events:
            print(f"{_when(e.created_at)}  {e.level:<7} {e.message}")
    return 0


def _jobs_evaluation(args: argparse.Namespace) -> int:
    with _client(args) as client:
        evaluation = client.get_evaluation(args.job_id)
    if args.json:
        _print_json(evaluation)
        return 0
    status = evaluation["status"]
    if status != "succeeded":
        error = evaluation.get("error") or {}
        why = {
            "not_requested": "the job asked for no evaluation (jobs create --evaluate TASKS)",
            "pending": "pending: the job is scored once it has trained",
            "failed": f"failed: {error.get('message')} (the job itself is unaffected)",
        }[status]
        print(f"{args.job_id}: evaluation {why}")
        return 1 if status == "failed" else 0
    base = {r["task"]: r for r in evaluation["results"] if r["model"] == "base"}
    rows = []
    for r in evaluation["results"]:
        if r["model"] == "base":
            continue
        b = base.get(r["task"])
        rows.append(
            [
                r["task"],
                str(r["n"]),
                _pct(b["acc"]) if b else "-",
                _pct(r["acc"]),
                f"{100 * (r['acc'] - b['acc']):+.1f}" if b else "-",
            ]
        )
    _table(rows, ["TASK", "N", "BASE ACC", "ADAPTER ACC", "DIFF (POINTS)"])
    return 0


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _jobs_watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _watch(client, args.job_id, quiet=args.json)


def _watch(client: Client, job_id: str, *, quiet: bool = False) -> int:
    """A progress bar over optimizer steps with the latest loss; events print above it.
    Exit status 0 if the job succeeded, 1 if it failed or was cancelled."""
    from tqdm import tqdm

    job = client.get_job(job_id)
    rows = _training_rows(client, job)
    bar = tqdm(
        total=total_steps(job, rows),
        desc=job_id,
        unit="step",
        disable=quiet,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    status = job.status
    try:
        for message in client.stream(job_id):
            if message.event == "metrics":
                metric = Metric.from_json(message.data)
                reported = metric.metrics.get("total_steps")
                if isinstance(reported, int) and reported != bar.total:
                    bar.total = reported
                bar.update(max(0, metric.step - bar.n))
                bar.set_postfix(_postfix(metric), refresh=True)
            elif message.event == "event":
                bar.write(
                    f"{_when(message.data.get('created_at'))}  {message.data.get('message')}",
                    file=sys.stderr,
                )
            elif message.event == "end":
                status = str(message.data.get("status", status))
    finally:
        bar.close()
    if status not in ("succeeded", "failed", "cancelled"):
        status = client.get_job(job_id).status
    if quiet:
        _print_json(client.get_job(job_id).raw)
    else:
        print(f"{job_id} {status}")
    return 0 if status == "succeeded" else 1


def _postfix(metric: Metric) -> dict[str, str]:
    out = {}
    if metric.train_loss is not None:
        out["loss"] = f"{metric.train_loss:.4f}"
    out.update(_preference(metric))
    val = metric.metrics.get("valid_loss")
    if isinstance(val, int | float):
        out["valid_loss"] = f"{val:.4f}"
    val_acc = metric.metrics.get("valid_reward_accuracy")
    if isinstance(val_acc, int | float):
        out["valid_acc"] = f"{val_acc:.2f}"
    tps = metric.metrics.get("tokens_per_second")
    if isinstance(tps, int | float):
        out["tok/s"] = f"{tps:.0f}"
    return out


def _preference(metric: Metric) -> dict[str, str]:
    """A DPO step's reward accuracy and margin (`acc 0.62`, `margin 0.41`); nothing for a
    supervised step, which has neither."""
    out = {}
    acc = metric.metrics.get("reward_accuracy")
    if isinstance(acc, int | float):
        out["acc"] = f"{acc:.2f}"
    margin = metric.metrics.get("reward_margin")
    if isinstance(margin, int | float):
        out["margin"] = f"{margin:.3g}"
    return out


# --- adapters -------------------------------------------------------------------------


def _adapters_download(args: argparse.Namespace) -> int:
    with _client(args) as client:
        path = client.download_adapter(
            args.job_id,
            args.output,
            checkpoint_id=args.checkpoint,
            format=args.format,
            extract=args.extract,
        )
    size = sum(p.stat().st_size for p in path.iterdir()) if path.is_dir() else path.stat().st_size
    if args.json:
        _print_json({"job_id": args.job_id, "path": str(path), "bytes": size})
    else:
        print(path)
    return 0


def _adapters_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.checkpoint or args.all_checkpoints:
            deleted = client.delete_checkpoints(args.job_id, checkpoint_id=args.checkpoint)
            what = f"{len(deleted)} checkpoint(s)"
        else:
            deleted = [client.delete_adapter(args.job_id)]
            what = "the adapter"
    if args.json:
        _print_json([d.raw for d in deleted])
    else:
        freed = sum(d.bytes for d in deleted)
        print(f"deleted {what} of {args.job_id}, freeing {freed:,} bytes")
    return 0


# --- usage ----------------------------------------------------------------------------


def _usage(args: argparse.Namespace) -> int:
    with _client(args) as client:
        u = client.usage()
    if args.json:
        _print_json(u.raw)
        return 0
    share = u.stored_bytes / u.max_total_bytes if u.max_total_bytes else 0.0
    _table(
        [
            ["files", f"{u.file_bytes:,}", ""],
            ["checkpoints", f"{u.checkpoint_bytes:,}", ""],
            ["adapters", f"{u.adapter_bytes:,}", ""],
            ["stored", f"{u.stored_bytes:,}", f"{u.max_total_bytes:,} ({share:.0%} used)"],
            ["waiting jobs", str(u.waiting_jobs), str(u.max_queued_jobs)],
            ["running jobs", str(u.running_jobs), str(u.max_running_jobs)],
        ],
        ["", "USED", "QUOTA"],
    )
    print(f"largest upload: {u.max_file_bytes:,} bytes")
    return 0
