"""Preference rows (DPO): a good pair parses to the conversation ending in the preferred
answer plus the other one; every bad pair is named by file, line and field; and
`file_format` tells a stored file's format from its first row."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mixloom.data.formats import (
    Example,
    Format,
    file_format,
    load_jsonl,
    parse_jsonl_bytes,
    validate_jsonl_bytes,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"


def jsonl(*rows: object) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def answer(content: Any, role: Any = "assistant") -> list[dict[str, Any]]:
    return [{"role": role, "content": content}]


def pair(
    *messages: tuple[str, str], good: Any = "4", bad: Any = "5", **keys: Any
) -> dict[str, Any]:
    turns = [{"role": r, "content": c} for r, c in messages or (("user", "2+2="),)]
    return {
        "input": {"messages": turns},
        "preferred_output": answer(good),
        "non_preferred_output": answer(bad),
        **keys,
    }


CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}


def test_a_pair_parses_to_its_conversation_the_preferred_answer_and_the_other() -> None:
    row = pair(
        ("system", "Be brief."),
        ("user", "2+2="),
        ("assistant", "4"),
        ("user", "and 3+3?"),
        good="6",
        bad="7",
        tools=[{"type": "function", "function": {"name": "add"}}],
        parallel_tool_calls=True,
        metadata={"id": 1},
    )
    [ex] = parse_jsonl_bytes(jsonl(row), filename="pairs.jsonl")
    assert ex == Example(
        (
            ("system", "Be brief."),
            ("user", "2+2="),
            ("assistant", "4"),
            ("user", "and 3+3?"),
            ("assistant", "6"),
        ),
        Format.PREFERENCE,
        "pairs.jsonl:1",
        frozenset({2}),  # the input's answer is context; only the final one is compared
        "7",
    )


def test_other_formats_have_no_rejected_answer() -> None:
    [ex] = parse_jsonl_bytes(jsonl(CHAT), filename="chat.jsonl")
    assert ex.rejected is None


@pytest.mark.parametrize(
    ("row", "where", "needle"),
    [
        (
            {k: v for k, v in pair().items() if k != "non_preferred_output"},
            "pairs.jsonl:2: non_preferred_output",
            "missing",
        ),
        (
            {k: v for k, v in pair().items() if k != "preferred_output"},
            "pairs.jsonl:2: preferred_output",
            "missing",
        ),
        (
            pair(good="4", bad=" 4\n"),
            "pairs.jsonl:2: non_preferred_output[0].content",
            "preferred_output and non_preferred_output are the same answer; a pair teaches nothing",
        ),
        (pair(good=" "), "pairs.jsonl:2: preferred_output[0].content", "is empty"),
        (pair(bad=5), "pairs.jsonl:2: non_preferred_output[0].content", "expected a string"),
        (
            pair(non_preferred_output=answer("5", role="user")),
            "pairs.jsonl:2: non_preferred_output[0].role",
            "must be \"assistant\" (got 'user')",
        ),
        (
            pair(preferred_output=answer("4") + answer("four")),
            "pairs.jsonl:2: preferred_output",
            "has 2 messages; give exactly one assistant message",
        ),
        (pair(preferred_output=[]), "pairs.jsonl:2: preferred_output", "is empty"),
        (
            pair(non_preferred_output={"role": "assistant", "content": "5"}),
            "pairs.jsonl:2: non_preferred_output",
            "expected a list of one assistant message, got an object",
        ),
        (
            pair(("user", "2+2="), ("assistant", "4")),
            "pairs.jsonl:2: input.messages[1].role",
            "it must end with the user message",
        ),
        (pair(("system", "Be brief.")), "pairs.jsonl:2: input.messages[0].role", "must end"),
        (
            pair(("user", "a"), ("system", "s"), ("user", "b")),
            "pairs.jsonl:2: input.messages[1].role",
            "only be the first",
        ),
        (pair(("user", " ")), "pairs.jsonl:2: input.messages[0].content", "is empty"),
        (pair(("bot", "hi")), "pairs.jsonl:2: input.messages[0].role", "unknown role 'bot'"),
        (
            pair(input={"messages": [{"role": "user", "content": "a", "weight": 1}]}),
            "pairs.jsonl:2: input.messages[0].weight",
            "takes no weight",
        ),
        (pair(input={"messages": []}), "pairs.jsonl:2: input.messages", "is empty"),
        (pair(input={}), "pairs.jsonl:2: input.messages", "missing"),
        (pair(input="2+2="), "pairs.jsonl:2: input", "expected an object"),
        (
            {k: v for k, v in pair().items() if k != "input"},
            "pairs.jsonl:2: input",
            "missing",
        ),
    ],
)
def test_each_bad_pair_is_named_by_line_and_field(row: Any, where: str, needle: str) -> None:
    _, problems = validate_jsonl_bytes(jsonl(pair(), row), filename="pairs.jsonl")
    assert len(problems) == 1, problems
    assert problems[0].where == where and needle in problems[0].message, problems


def test_every_problem_of_a_pair_is_reported_at_once() -> None:
    row = pair(("user", "a"), ("assistant", "b"), good="", non_preferred_output="x")
    _, problems = validate_jsonl_bytes(jsonl(row), filename="pairs.jsonl")
    assert [p.where for p in problems] == [
        "pairs.jsonl:1: input.messages[1].role",
        "pairs.jsonl:1: preferred_output[0].content",
        "pairs.jsonl:1: non_preferred_output",
    ]


def test_a_pair_after_a_chat_row_is_a_mixed_file() -> None:
    _, problems = validate_jsonl_bytes(jsonl(CHAT, pair()), filename="train.jsonl")
    assert [str(p) for p in problems] == [
        "train.jsonl:2: this row is preference but the file is chat (from line 1); put each "
        "format in its own file"
    ]
    _, problems = validate_jsonl_bytes(jsonl(pair(), CHAT), filename="train.jsonl")
    assert [p.where for p in problems] == ["train.jsonl:2"]
    assert "this row is chat but the file is preference" in problems[0].message


def test_an_alpaca_row_with_an_object_input_is_still_alpaca() -> None:
    row = {"instruction": "Sort", "input": {"messages": []}, "output": "1 3"}
    _, problems = validate_jsonl_bytes(jsonl(row), filename="a.jsonl")
    assert [str(p) for p in problems] == ["a.jsonl:1: input: expected a string, got an object"]


def test_unknown_keys_name_the_preference_format() -> None:
    _, problems = validate_jsonl_bytes(jsonl({"chosen": "a"}), filename="x.jsonl")
    assert "non_preferred_output" in problems[0].message


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([pair(), pair()], Format.PREFERENCE),
        ([CHAT], Format.CHAT),
        ([{"prompt": "2+2=", "completion": "4"}], Format.PROMPT_COMPLETION),
        ([{"instruction": "Greet", "output": "Hello"}], Format.ALPACA),
        ([{"text": "Once upon a time"}], Format.TEXT),
        ([{"query": "2+2=", "choices": ["4", "5"], "gold": 0}], None),  # an evals file
    ],
)
def test_file_format_reads_the_first_row(
    tmp_path: Path, rows: list[Any], expected: Format | None
) -> None:
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"\xef\xbb\xbf\n  \r\n" + jsonl(*rows))
    assert file_format(path) == expected


def test_file_format_reads_no_further_than_the_first_row(tmp_path: Path) -> None:
    path = tmp_path / "f.jsonl"
    path.write_bytes(jsonl(pair()) + b"not json at all\n" + b"\xff" * 10)
    assert file_format(path) is Format.PREFERENCE
    path.write_bytes(b"")
    assert file_format(path) is None
    with pytest.raises(OSError):
        file_format(tmp_path / "gone.jsonl")


def test_the_dpo_demo_files_are_valid_pairs() -> None:
    train = load_jsonl(EXAMPLES / "dpo_demo.jsonl")
    valid = load_jsonl(EXAMPLES / "dpo_demo_valid.jsonl")
    assert (len(train), len(valid)) == (265, 30)
    for ex in train + valid:
        assert ex.format is Format.PREFERENCE and ex.messages[-2][0] == "user"
        assert ex.rejected and ex.rejected.strip() != ex.messages[-1][1].strip()
    pairs = [(e.messages, e.rejected) for e in train + valid]
    assert len(set(pairs)) == len(pairs)  # none twice, so none both trained on and held out
