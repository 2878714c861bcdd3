"""JSONL validation: the three formats, and a message naming file, line and field for each bad line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixloom.data.formats import (
    Example,
    Format,
    load_jsonl,
    parse_jsonl_bytes,
    validate_jsonl_bytes,
    validate_jsonl_file,
)
from mixloom.errors import DataError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"


def jsonl(*rows: object) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def only_problem(data: bytes, **kw: int) -> str:
    _, problems = validate_jsonl_bytes(data, filename="train.jsonl", **kw)
    assert len(problems) == 1, problems
    return str(problems[0])


CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}


def test_chat_rows_load_as_messages(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    system = {"role": "system", "content": ""}  # an empty system message is allowed
    path.write_bytes(jsonl({"messages": [system, *CHAT["messages"]], "id": 7}))
    [ex] = load_jsonl(path)
    assert ex == Example(
        (("system", ""), ("user", "Hi"), ("assistant", "Yo")), Format.CHAT, f"{path}:1"
    )


def test_prompt_completion_rows_become_user_assistant(tmp_path: Path) -> None:
    path = tmp_path / "pc.jsonl"
    path.write_bytes(
        jsonl({"prompt": "", "completion": " 4"}, {"prompt": "2+2=", "completion": "4"})
    )
    examples = load_jsonl(path)
    assert [e.messages for e in examples] == [
        (("user", ""), ("assistant", " 4")),
        (("user", "2+2="), ("assistant", "4")),
    ]
    assert {e.format for e in examples} == {Format.PROMPT_COMPLETION}


def test_chat_weight_zero_marks_an_assistant_message_untrained() -> None:
    turns = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "weight": 0},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d", "weight": 1},
    ]
    [ex] = parse_jsonl_bytes(jsonl({"messages": turns}), filename="f.jsonl")
    assert ex.untrained == frozenset({1})


def test_alpaca_input_is_optional_and_joined_to_the_instruction(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(
        jsonl(
            {"instruction": "Sort", "input": "3 1", "output": "1 3"},
            {"instruction": "Greet", "output": "Hello"},
            {"instruction": "Greet", "input": None, "output": "Hello"},
            {"instruction": "Greet", "input": "", "output": "Hello"},
        )
    )
    examples = load_jsonl(path)
    assert examples[0].messages == (("user", "Sort\n\n3 1"), ("assistant", "1 3"))
    assert all(e.messages == (("user", "Greet"), ("assistant", "Hello")) for e in examples[1:])
    assert {e.format for e in examples} == {Format.ALPACA}


def test_blank_lines_crlf_and_bom_are_accepted() -> None:
    line = json.dumps(CHAT).encode()
    data = b"\xef\xbb\xbf" + line + b"\r\n\r\n   \n" + line + b"\r\n"
    rows, problems = validate_jsonl_bytes(data, filename="train.jsonl")
    assert (rows, problems) == (2, [])


@pytest.mark.parametrize("name", ["chat", "prompt_completion", "alpaca", "alpaca_demo_200"])
def test_example_files_are_valid(name: str) -> None:
    examples = load_jsonl(EXAMPLES / f"{name}.jsonl")
    assert len(examples) == (200 if name == "alpaca_demo_200" else 4)


BAD_LINES = [
    (b"\xff\xfe{}", "train.jsonl:2", "not valid UTF-8"),
    (b'{"prompt": "a", "completion": "b"', "train.jsonl:2", "invalid JSON"),
    (b"[1, 2]", "train.jsonl:2", "expected a JSON object, got an array"),
    (b'{"body": "hello"}', "train.jsonl:2", 'unknown format: keys found "body"'),
    (b'{"text": "hello"}', "train.jsonl:2", "this row is text but the file is chat"),
    (b'{"text": " "}', "train.jsonl:2: text", "is empty"),
    (b'{"messages": "hi"}', "train.jsonl:2: messages", "expected a list"),
    (b'{"messages": []}', "train.jsonl:2: messages", "is empty"),
    (b'{"messages": ["hi"]}', "train.jsonl:2: messages[0]", "expected an object"),
    (
        b'{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}',
        "train.jsonl:2: messages[1].role",
        "unknown role 'bot'",
    ),
    (
        b'{"messages": [{"content": "a"}, {"role": "assistant", "content": "b"}]}',
        "train.jsonl:2: messages[0].role",
        "missing",
    ),
    (
        b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]}',
        "train.jsonl:2: messages[1].content",
        "expected a string, got a number",
    ),
    (
        b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}',
        "train.jsonl:2: messages[1].content",
        "is empty",
    ),
    (
        b'{"messages": [{"role": "user", "content": "a"}]}',
        "train.jsonl:2: messages",
        "no assistant message",
    ),
    (
        b'{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},'
        b' {"role": "assistant", "content": "b"}]}',
        "train.jsonl:2: messages[1].role",
        "only be the first",
    ),
    (
        b'{"messages": [{"role": "user", "content": "a", "weight": 1},'
        b' {"role": "assistant", "content": "b"}]}',
        "train.jsonl:2: messages[0].weight",
        "only assistant messages",
    ),
    (
        b'{"messages": [{"role": "user", "content": "a"},'
        b' {"role": "assistant", "content": "b", "weight": 0.5}]}',
        "train.jsonl:2: messages[1].weight",
        "must be 0 (no loss) or 1 (loss), got 0.5",
    ),
    (
        b'{"messages": [{"role": "user", "content": "a"},'
        b' {"role": "assistant", "content": "b", "weight": 0}]}',
        "train.jsonl:2: messages",
        "no assistant message with weight 1",
    ),
    (b'{"prompt": "a"}', "train.jsonl:2: completion", "missing"),
    (
        b'{"prompt": "a", "completion": "b\\ud800"}',
        "train.jsonl:2",
        "unpaired surrogate escape \\ud800 at character 2",
    ),
    (b'{"prompt": ["a"], "completion": "b"}', "train.jsonl:2: prompt", "got an array"),
    (b'{"prompt": "a", "completion": ""}', "train.jsonl:2: completion", "is empty"),
    (b'{"instruction": "", "output": "b"}', "train.jsonl:2: instruction", "is empty"),
    (b'{"instruction": "a", "input": 1, "output": "b"}', "train.jsonl:2: input", "a number"),
    (b'{"instruction": "a"}', "train.jsonl:2: output", "missing"),
]


@pytest.mark.parametrize(("line", "where", "message"), BAD_LINES)
def test_bad_line_names_file_line_and_field(line: bytes, where: str, message: str) -> None:
    data = jsonl(CHAT) + line + b"\n" + jsonl(CHAT)
    text = only_problem(data)
    assert text.startswith(where + ": ")
    assert message in text


def test_invalid_json_gives_the_column() -> None:
    text = only_problem(b'{"prompt": "a" "completion": "b"}\n')
    assert text.startswith("train.jsonl:1: invalid JSON: Expecting ',' delimiter at column 16")


def test_every_problem_is_reported_not_just_the_first() -> None:
    data = b'{"prompt": 1}\nnope\n' + jsonl(CHAT) + b"{}\n"
    rows, problems = validate_jsonl_bytes(data, filename="f.jsonl")
    assert rows == 4
    assert [p.where for p in problems] == [
        "f.jsonl:1: prompt",
        "f.jsonl:1: completion",
        "f.jsonl:2",
        "f.jsonl:4",
    ]


def test_problem_list_is_capped_with_a_count() -> None:
    _, problems = validate_jsonl_bytes(b"x\n" * 30, filename="f.jsonl", max_problems=5)
    assert len(problems) == 6
    assert str(problems[-1]) == "f.jsonl: ... and 25 more problems not shown"


def test_mixed_formats_are_rejected() -> None:
    data = jsonl(CHAT, {"prompt": "a", "completion": "b"})
    text = only_problem(data)
    assert text.startswith("train.jsonl:2: this row is prompt_completion but the file is chat")


def test_empty_file() -> None:
    assert only_problem(b"\n  \n").startswith("train.jsonl: the file has no examples")


def test_too_many_lines() -> None:
    text = only_problem(jsonl(CHAT, CHAT, CHAT), max_lines=2)
    assert text.startswith("train.jsonl:3: the file has more than 2 lines")


def test_load_jsonl_raises_data_error_with_all_problems(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": 1}\n' + jsonl(CHAT) + b"[]\n")
    with pytest.raises(DataError) as err:
        load_jsonl(path)
    wheres = [p.where for p in err.value.problems]
    assert wheres == [f"{path}:1: prompt", f"{path}:1: completion", f"{path}:3"]
    assert "3 problems" in str(err.value)


def test_load_jsonl_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read data file"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_formats_module_imports_neither_torch_nor_transformers() -> None:
    import subprocess
    import sys

    code = (
        "import sys, mixloom.data.formats; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_validate_jsonl_file_reports_long_lines_without_reading_them(tmp_path: Path) -> None:
    path = tmp_path / "f.jsonl"
    short = {"prompt": "a", "completion": "b"}
    long = jsonl({"prompt": "x" * 5000, "completion": "b"}).rstrip(b"\n")
    path.write_bytes(jsonl(short) + long + b"\n" + jsonl(short) + long)  # last: no newline
    rows, problems = validate_jsonl_file(path, filename="f.jsonl", max_line_bytes=4096)
    assert rows == 4
    assert [p.where for p in problems] == ["f.jsonl:2", "f.jsonl:4"]
    assert "longer than 4,096 bytes" in problems[0].message
    assert validate_jsonl_file(path, filename="f.jsonl") == (4, [])
