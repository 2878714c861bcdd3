"""lm-evaluation-harness as the oracle: the same rows written to local files, scored by
lm-eval's own HF model offline, in a subprocess (so its logging, caches and imports stay
out of the test process).

Built-in tasks are run through lm-eval's OWN task YAMLs (`include:` of the installed file,
only the dataset swapped for a local JSON file), so the prompts are lm-eval's, not a copy
of ours: each Doc is written back in the dataset's schema (`raw_row`). HellaSwag's YAML
preprocesses raw rows the package does not hold; its rows go in already processed (the
package holds lm-eval's process_docs output) and the YAML's process_docs is switched off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from mixloom.eval.tasks import Doc

_OFFICIAL = {  # our task -> lm-eval's YAML (relative to lm_eval/tasks)
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "piqa": "piqa/piqa.yaml",
    "social_iqa": "siqa/siqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
}


def _between(text: str, prefix: str, suffix: str) -> str:
    assert text.startswith(prefix) and text.endswith(suffix), text
    return text[len(prefix) : len(text) - len(suffix)]


def raw_row(task: str, doc: Doc) -> dict[str, Any]:
    """The Doc in its dataset's schema: what lm-eval's YAML for the task reads."""
    letters = [chr(65 + i) for i in range(len(doc.choices))]
    choices = {"text": list(doc.choices), "label": letters}
    if task in ("arc_easy", "arc_challenge"):
        q = _between(doc.query, "Question: ", "\nAnswer:")
        return {"question": q, "choices": choices, "answerKey": letters[doc.gold]}
    if task == "openbookqa":
        return {"question_stem": doc.query, "choices": choices, "answerKey": letters[doc.gold]}
    if task == "boolq":
        passage, _, question = _between(doc.query, "", "?\nAnswer:").rpartition("\nQuestion: ")
        return {"passage": passage, "question": question, "label": doc.gold}
    if task == "piqa":
        goal = _between(doc.query, "Question: ", "\nAnswer:")
        return {"goal": goal, "sol1": doc.choices[0], "sol2": doc.choices[1], "label": doc.gold}
    if task == "social_iqa":
        context, _, question = _between(doc.query, "Q: ", "\nA:").rpartition(" ")
        answers = {f"answer{k}": c for k, c in zip("ABC", doc.choices, strict=True)}
        return {"context": context, "question": question, **answers, "label": str(doc.gold + 1)}
    if task == "hellaswag":
        return {"query": doc.query, "choices": list(doc.choices), "label": doc.gold}
    if task == "winogrande":
        assert doc.target is not None
        prefix = os.path.commonprefix(list(doc.choices))
        options = [c[len(prefix) :] for c in doc.choices]
        return {
            "sentence": f"{prefix}_ {doc.target}",
            "option1": options[0],
            "option2": options[1],
            "answer": str(doc.gold + 1),
        }
    raise KeyError(task)


def choice_file_yaml(name: str, data: Path) -> dict[str, Any]:
    """A user's {"query", "choices", "gold"} file as an lm-eval task (PEERS.md's recipe)."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{query}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }


def official_yaml(task: str, name: str, data: Path) -> dict[str, Any]:
    """lm-eval's own YAML for `task`, reading `data` (a JSONL of raw_row) as its test split."""
    import lm_eval

    cfg: dict[str, Any] = {
        "include": str(Path(lm_eval.__file__).parent / "tasks" / _OFFICIAL[task]),
        "task": name,
        "tag": [],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "training_split": None,
        "validation_split": None,
        "test_split": "test",
    }
    if task == "hellaswag":
        cfg["process_docs"] = None
    return cfg


def write_task(folder: Path, name: str, rows: list[dict[str, Any]], cfg: dict[str, Any]) -> None:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


_CHILD = r"""
import json, sys
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

a = json.loads(sys.argv[1])
res = simple_evaluate(
    model="hf",
    model_args=f"pretrained={a['model']},dtype=float32",
    tasks=a["tasks"],
    num_fewshot=a["num_fewshot"],
    limit=a["limit"],
    batch_size=a["batch_size"],
    device="cpu",
    task_manager=TaskManager(include_path=a["include"]),
    log_samples=True,
)
out = {}
for t in a["tasks"]:
    samples = sorted(res["samples"][t], key=lambda s: s["doc_id"])
    out[t] = {
        "metrics": res["results"][t],
        "lls": [[float(r[0]) for r in s["filtered_resps"]] for s in samples],
        "requests": [[list(x[:2]) for x in s["arguments"]] for s in samples],
    }
print("@@RESULT@@" + json.dumps(out))
"""


def run_lm_eval(
    model: Path,
    include: Path,
    tasks: list[str],
    *,
    limit: int | None = None,
    num_fewshot: int = 0,
    batch_size: int = 16,
    cache: Path,
    timeout: float = 600,
) -> dict[str, Any]:
    """lm-eval on `tasks` (defined under `include`); per task its metrics ("acc,none", ...),
    each doc's choice log-likelihoods and its (context, continuation) requests."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(cache),
        "TOKENIZERS_PARALLELISM": "false",
    }
    args = {
        "model": str(model),
        "include": str(include),
        "tasks": tasks,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "batch_size": batch_size,
    }
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    marker = "@@RESULT@@"
    line = next((x for x in proc.stdout.splitlines() if x.startswith(marker)), None)
    assert line is not None, f"lm-eval failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(line[len(marker) :])
