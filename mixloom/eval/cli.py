"""`mixloom eval` (score a base model and adapters on multiple-choice tasks, here) and
`mixloom data task` (a task's rows as training JSONL)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mixloom.eval.protocols import PROTOCOLS
from mixloom.eval.tasks import SPLITS, TRAINING_FORMATS


def register(sub: Any) -> None:
    e = sub.add_parser(
        "eval",
        help="score a base model and adapters on multiple-choice tasks (lm-eval's or the "
        "MixLoRA paper's protocol), all adapters in one fused pass",
    )
    e.add_argument(
        "--base-model",
        help="the base model: smollm2-135m, a Hugging Face folder or hub id (default: the one "
        "the adapters name, else smollm2-135m)",
    )
    e.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="DIR|ZIP",
        help="an adapter folder or downloaded .zip (LoRA or MixLoRA); repeat for several",
    )
    e.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="ID",
        help="a fine-tuned model of yours on a mixloom server (a job's ft:... id, or a "
        "checkpoint's ...:ckpt-step-N): its adapter is downloaded through the API and scored "
        "here; repeat for several",
    )
    e.add_argument("--base-url", help="with --model: the server (default $MIXLOOM_BASE_URL)")
    e.add_argument("--api-key", help="with --model: your key (default $MIXLOOM_API_KEY)")
    e.add_argument(
        "--tasks",
        required=True,
        help="comma-separated: arc_easy, arc_challenge, boolq, openbookqa, piqa, social_iqa, "
        'hellaswag, winogrande, or a .jsonl of {"query", "choices", "gold"} rows',
    )
    e.add_argument("--split", default="test", choices=SPLITS, help="built-in tasks' split")
    e.add_argument("--limit", type=int, help="the first N questions of each task")
    e.add_argument(
        "--num-fewshot", type=int, default=0, help="examples before each question (loglik only)"
    )
    e.add_argument(
        "--protocol",
        default="loglik",
        choices=PROTOCOLS,
        help="loglik: lm-evaluation-harness's acc/acc_norm; paper: the MixLoRA paper's "
        "labelled-choices prompt (for adapters trained on `mixloom data task --format paper`); "
        "cloze: lm-eval's rule on rows rendered as mixloom trains (--format cloze)",
    )
    e.add_argument(
        "--rendering",
        choices=("chat", "plain"),
        help="paper/cloze: how the adapters' training rows became text (default: what the "
        "adapters recorded; chat for the base alone)",
    )
    e.add_argument("--no-base", action="store_true", help="score the adapters only")
    e.add_argument("--json", metavar="FILE", help="write the results as JSON")
    e.add_argument("--dtype", default="auto", help="float32, bfloat16, float16, auto")
    e.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, auto")
    e.add_argument(
        "--batch-tokens", type=int, help="tokens per fused forward, all adapters' copies included"
    )
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=_eval)

    d = sub.add_parser("data", help="training data helpers")
    dsub = d.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    t = dsub.add_parser(
        "task",
        help="a task's rows as training JSONL: the MixLoRA paper's instruction format "
        "(--format paper) or lm-eval's cloze form; train/validation never share a question "
        "with test",
    )
    t.add_argument("name", help="a built-in task, or a .jsonl of choice rows")
    t.add_argument("--split", default="train", choices=SPLITS)
    t.add_argument("--format", default="paper", choices=TRAINING_FORMATS)
    t.add_argument("--limit", type=int, help="the first N rows")
    t.add_argument("-o", "--output", required=True, help="the JSONL file to write")
    t.set_defaults(func=_data_task)


def _data_task(args: argparse.Namespace) -> int:
    from mixloom.eval.tasks import load_task, training_rows

    task = load_task(args.name, args.split, param="name")
    rows = training_rows(task, args.format)[: args.limit]
    out = Path(args.output)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{out}: {len(rows)} rows of {task.name} ({task.split}, {args.format} format)")
    return 0


def _adapter_names(dirs: list[str]) -> list[str]:
    """Each folder's name, made unique (a/final and b/final: final, final-2)."""
    names: list[str] = []
    for d in dirs:
        base = Path(d).resolve().name or "adapter"
        name, i = base, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.append(name)
    return names


def _downloaded(model_ids: list[str], args: argparse.Namespace, tmp: Path) -> list[Path]:
    """Each fine-tuned model's adapter, downloaded through the API into `tmp` and unpacked."""
    from mixloom.clients import Client
    from mixloom.errors import EvaluationError
    from mixloom.model_ids import parse_fine_tuned_model_id

    folders = []
    with Client(args.base_url, args.api_key) as client:
        for i, model_id in enumerate(model_ids):
            parts = parse_fine_tuned_model_id(model_id)
            if parts is None:
                raise EvaluationError(
                    f"--model {model_id}: not a fine-tuned model's id (ft:...:ftjob-..., or "
                    "its :ckpt-step-N); a base model is scored with --base-model",
                    param="--model",
                )
            client.get_model(model_id)  # NotFoundError (exit 1) for what is not yours
            checkpoint = None
            if parts.step is not None:
                checkpoint = next(
                    (
                        c.id
                        for c in client.iter_checkpoints(parts.job_id)
                        if c.step_number == parts.step
                    ),
                    None,
                )
                if checkpoint is None:
                    raise EvaluationError(
                        f"--model {model_id}: job {parts.job_id} has no checkpoint at step "
                        f"{parts.step}",
                        param="--model",
                    )
            print(f"downloading {model_id} ...", file=sys.stderr)
            folders.append(
                client.download_adapter(
                    parts.job_id, tmp / f"{i}/", checkpoint_id=checkpoint, extract=True
                )
            )
    return folders


def _base_of(adapters: list[Path], given: str | None) -> str:
    """The base to score on: as given, else the one every adapter names."""
    from mixloom.errors import EvaluationError
    from mixloom.model.base import DEFAULT_MODEL_ID
    from mixloom.model.formats import adapter_base

    if given:
        return given
    named = {adapter_base(a) for a in adapters}
    if len(named) > 1:
        raise EvaluationError(
            f"the adapters name different base models ({', '.join(sorted(named))}); score "
            "them in separate runs, or pass --base-model",
            param="--base-model",
        )
    return named.pop() if named else DEFAULT_MODEL_ID


def _eval(args: argparse.Namespace) -> int:
    import tempfile

    from mixloom.errors import EvaluationError
    from mixloom.eval.tasks import load_task
    from mixloom.model.formats import adapter_folder

    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    if not names:
        raise EvaluationError("--tasks names no task", param="--tasks", code="unknown_task")
    if args.no_base and not (args.adapter or args.model):
        raise EvaluationError(
            "--no-base with no --adapter or --model leaves nothing to score", param="--no-base"
        )
    tasks = [load_task(n, args.split, param="--tasks") for n in names]
    with tempfile.TemporaryDirectory(prefix="mixloom-eval-") as tmp:
        folders = [adapter_folder(a, Path(tmp) / f"a{i}") for i, a in enumerate(args.adapter)]
        folders += _downloaded(args.model, args, Path(tmp) / "models")
        labels = _adapter_names(args.adapter) + list(args.model)
        return _score(args, tasks, folders, labels)


def _score(
    args: argparse.Namespace, tasks: list[Any], folders: list[Path], labels: list[str]
) -> int:
    from tqdm import tqdm

    from mixloom.errors import EvaluationError
    from mixloom.eval.results import format_table
    from mixloom.eval.scorer import DEFAULT_BATCH_TOKENS, evaluate
    from mixloom.model.adapter_model import AdapterModel
    from mixloom.model.base import load_base_model
    from mixloom.model.formats import load_adapter_into, read_metadata

    recorded = {read_metadata(d).rendering for d in folders}
    rendering = args.rendering or (recorded.pop() if len(recorded) == 1 else "chat")
    if not args.rendering and len(recorded) > 1 and args.protocol != "loglik":
        raise EvaluationError(
            "the adapters were trained with different renderings (chat and plain); the "
            f"{args.protocol} protocol asks each in its own form: score them in separate runs, "
            "or pass --rendering",
            param="--rendering",
        )
    base_model = _base_of(folders, args.base_model)
    print(f"loading {base_model} ...", file=sys.stderr)
    base = load_base_model(base_model, dtype=args.dtype, device=args.device)
    model = AdapterModel(base.model)
    adapters: list[str | None] = [] if args.no_base else [None]
    for folder, name in zip(folders, labels, strict=True):
        load_adapter_into(model, folder, name, pack_group="eval")
        adapters.append(name)
    bar = tqdm(unit="seq", disable=args.no_progress, dynamic_ncols=True, file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        results = evaluate(
            model,
            base.tokenizer,
            adapters,
            tasks,
            protocol=args.protocol,
            num_fewshot=args.num_fewshot,
            limit=args.limit,
            batch_tokens=args.batch_tokens or DEFAULT_BATCH_TOKENS,
            progress=progress,
            rendering=rendering,
        )
    finally:
        bar.close()
    shots = f", {args.num_fewshot}-shot" if args.num_fewshot else ""
    print(f"protocol {args.protocol}{shots}, split {args.split}; percent ± standard error\n")
    print(format_table(results, metric="acc"))
    if any(r.acc_norm is not None for r in results.results):
        print()
        print(format_table(results, metric="acc_norm"))
    if args.json:
        Path(args.json).write_text(json.dumps(results.to_json(), indent=1) + "\n")
    return 0
