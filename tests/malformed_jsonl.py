"""A corpus of malformed (and tricky but valid) JSONL files, for the upload tests and
bench/bad_inputs.py. Each case is a whole file, named `bad.jsonl` when uploaded: a good
line of a format, then the line under test, so the bad line is line 2 unless noted."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

FILENAME = "bad.jsonl"
PC = b'{"prompt": "2+2=", "completion": "4"}'
CHAT = b'{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}'
ALPACA = b'{"instruction": "Add", "input": "2 2", "output": "4"}'
MIB = 1024 * 1024


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    bad_line: int | None  # None: the file is valid (200)
    needle: str = ""  # also in the error message


def _line(first: bytes, line: bytes | str, needle: str = "", at: int = 2) -> tuple[bytes, int, str]:
    raw = line.encode() if isinstance(line, str) else line
    return first + b"\n" + raw + b"\n", at, needle


def _json(obj: object) -> bytes:
    return json.dumps(obj).encode()


def _chat(*messages: object) -> bytes:
    return _json({"messages": list(messages)})


USER = {"role": "user", "content": "a"}
ASSISTANT = {"role": "assistant", "content": "b"}
WRONG_TYPES: list[tuple[str, object]] = [
    ("null", None),
    ("number", 1),
    ("float", 1.5),
    ("bool", True),
    ("array", ["a"]),
    ("object", {"a": "b"}),
]


def cases() -> Iterator[Case]:
    yield from _generic()
    yield from _encoding()
    yield from _chat_fields()
    yield from _prompt_completion_fields()
    yield from _alpaca_fields()


def _case(name: str, spec: tuple[bytes, int, str]) -> Case:
    data, line, needle = spec
    return Case(name, data, line, needle)


def _valid(name: str, data: bytes) -> Case:
    return Case(name, data, None)


def _generic() -> Iterator[Case]:
    yield _case("deep_brackets_100k", _line(PC, b"[" * 100_000, "nested deeper"))
    deep_obj = b'{"a":' * 50_000 + b"1" + b"}" * 50_000
    yield _case("deep_object_50k", _line(PC, deep_obj, "nested deeper"))
    nested = {"prompt": "a", "completion": "b", "meta": json.loads("[" * 70 + "]" * 70)}
    yield _case("deep_in_extra_key_70", _line(PC, _json(nested), "nested deeper"))
    yield _valid(
        "nested_extra_key_10", PC + b"\n" + _json({**nested, "meta": [[[[[[[[[[]]]]]]]]]]})
    )
    huge = "9" * 5000
    yield _case(
        "int_5000_digits",
        _line(PC, f'{{"prompt": "a", "completion": "b", "id": {huge}}}', "5,000 digits"),
    )
    yield _case(
        "int_5000_digits_negative",
        _line(PC, f'{{"prompt": "a", "completion": "b", "id": -{huge}}}', "digits"),
    )
    yield _case("int_5000_digits_top_level", _line(PC, huge, "digits"))
    yield _valid(
        "int_1000_digits",
        PC + b"\n" + f'{{"prompt": "a", "completion": "b", "id": {"9" * 1000}}}'.encode(),
    )
    for literal in ("1e999", "-1e999", "1.5e400", "1" + "0" * 400 + ".0"):
        yield _case(
            f"float_{literal[:8]}",
            _line(PC, f'{{"prompt": "a", "completion": "b", "x": {literal}}}', "out of range"),
        )
    yield _valid(
        "float_long_mantissa",
        PC + b"\n" + f'{{"prompt": "a", "completion": "b", "x": 0.{"1" * 5000}}}'.encode(),
    )
    for literal in ("NaN", "Infinity", "-Infinity"):
        yield _case(
            f"literal_{literal}",
            _line(PC, f'{{"prompt": "a", "completion": "b", "x": {literal}}}', "not a JSON value"),
        )
    yield _valid("bom_at_start", b"\xef\xbb\xbf" + PC + b"\n")
    yield _case("bom_on_line_2", _line(PC, b"\xef\xbb\xbf" + PC, "BOM"))
    yield _valid("crlf", PC + b"\r\n" + PC + b"\r\n")
    yield _case("cr_only_separators", (PC + b"\r" + PC + b"\r", 1, "Extra data"))
    yield _valid("blank_lines", b"\n\n" + PC + b"\n\n  \n\t\n" + PC + b"\n\n")
    yield Case("only_blank_lines", b"\n \n\t\n", None)  # marked valid here, checked below
    yield _valid("last_line_without_newline", PC + b"\n" + PC)
    yield _case("truncated_last_line", (PC + b"\n" + PC[:20], 2, "invalid JSON"))
    yield _case("truncated_mid_string", (PC + b'\n{"prompt": "abc', 2, "invalid JSON"))
    for name, line in [
        ("trailing_comma", b'{"prompt": "a", "completion": "b",}'),
        ("single_quotes", b"{'prompt': 'a', 'completion': 'b'}"),
        ("comment", b"// a comment"),
        ("two_objects", PC + b" " + PC),
        ("unquoted_key", b'{prompt: "a", "completion": "b"}'),
        ("raw_control_char", b'{"prompt": "a\tb", "completion": "b"}'),
        ("raw_nul_in_string", b'{"prompt": "a\x00b", "completion": "b"}'),
        ("raw_nul_outside", b"\x00" + PC),
        ("bad_escape", b'{"prompt": "a\\q", "completion": "b"}'),
        ("short_unicode_escape", b'{"prompt": "a\\u12", "completion": "b"}'),
        ("hex_number", b'{"prompt": "a", "completion": "b", "x": 0x10}'),
        ("leading_zero", b'{"prompt": "a", "completion": "b", "x": 012}'),
        ("plus_number", b'{"prompt": "a", "completion": "b", "x": +1}'),
    ]:
        yield _case(name, _line(PC, line, "invalid JSON"))
    for name, line in [
        ("top_array", b"[1, 2]"),
        ("top_string", b'"text"'),
        ("top_number", b"42"),
        ("top_null", b"null"),
        ("top_true", b"true"),
    ]:
        yield _case(name, _line(PC, line, "expected a JSON object"))
    yield _case("empty_object", _line(PC, b"{}", "unknown format"))
    yield _case("unknown_keys", _line(PC, b'{"body": "x"}', "unknown format"))
    yield _case("text_among_prompts", _line(PC, b'{"text": "x"}', "this row is text"))
    yield _case("huge_unknown_key", _line(PC, _json({"k" * 100_000: 1}), "unknown format"))
    yield _case("mixed_formats", _line(PC, CHAT, "the file is prompt_completion"))
    yield _case(
        "duplicate_key_last_wins",
        _line(PC, b'{"prompt": "a", "prompt": 1, "completion": "b"}', "expected a string"),
    )
    over = b'{"prompt": "' + b"x" * (MIB + 10) + b'", "completion": "b"}'
    yield _case("line_over_1_mib", _line(PC, over, "longer than"))
    yield _case("line_over_1_mib_then_bad", (PC + b"\n" + over + b"\nnope\n", 2, "bad.jsonl:3"))
    yield _valid(
        "line_just_under_1_mib",
        PC + b"\n" + b'{"prompt": "' + b"x" * (MIB - 100) + b'", "completion": "b"}',
    )
    yield _valid(
        "unicode_text",
        PC
        + b"\n"
        + _json({"prompt": "caf\u00e9 \u4e2d\u6587 \U0001f600", "completion": "\u2028ok"}),
    )
    yield _valid("surrogate_pair_escape", PC + b'\n{"prompt": "\\ud83d\\ude00", "completion": "b"}')


def _encoding() -> Iterator[Case]:
    for name, line in [
        ("invalid_utf8_ff", b'{"prompt": "\xff", "completion": "b"}'),
        ("latin1_e_acute", b'{"prompt": "caf\xe9", "completion": "b"}'),
        ("overlong_slash", b'{"prompt": "\xc0\xaf", "completion": "b"}'),
        ("encoded_surrogate_cesu", b'{"prompt": "\xed\xa0\x80", "completion": "b"}'),
        ("truncated_multibyte", b'{"prompt": "\xe2\x82", "completion": "b"}'),
        ("utf16_line", '{"prompt": "a", "completion": "b"}'.encode("utf-16")),
    ]:
        yield _case(name, _line(PC, line, "UTF-8"))
    for name, line in [
        ("lone_high_surrogate", b'{"prompt": "a", "completion": "b\\ud800"}'),
        ("lone_low_surrogate", b'{"prompt": "\\udc00", "completion": "b"}'),
        ("reversed_pair", b'{"prompt": "\\udc00\\ud800", "completion": "b"}'),
        ("surrogate_in_key", b'{"prompt": "a", "completion": "b", "\\ud800": 1}'),
        ("surrogate_in_extra", b'{"prompt": "a", "completion": "b", "meta": ["\\ud800"]}'),
    ]:
        yield _case(name, _line(PC, line, "surrogate"))
    for name, line in [
        ("nul_escape_in_completion", b'{"prompt": "a", "completion": "b\\u0000"}'),
        ("nul_escape_in_key", b'{"prompt": "a", "completion": "b", "\\u0000": 1}'),
        ("nul_escape_in_chat", _chat(USER, {"role": "assistant", "content": "\x00"})),
    ]:
        yield _case(name, _line(PC if b"prompt" in line else CHAT, line, "NUL"))


def _chat_fields() -> Iterator[Case]:
    for label, value in [*WRONG_TYPES, ("string", "hi"), ("empty", [])]:
        if label != "array":
            yield _case(
                f"chat_messages_{label}", _line(CHAT, _json({"messages": value}), "messages")
            )
    for label, value in [*WRONG_TYPES[:4], ("string", "hi"), ("array", [])]:
        yield _case(f"chat_message_{label}", _line(CHAT, _chat(value, ASSISTANT), "messages[0]"))
    for label, value in [*WRONG_TYPES, ("unknown", "bot"), ("empty", ""), ("upper", "USER")]:
        yield _case(
            f"chat_role_{label}",
            _line(CHAT, _chat({"role": value, "content": "a"}, ASSISTANT), "messages[0].role"),
        )
    yield _case(
        "chat_role_missing", _line(CHAT, _chat({"content": "a"}, ASSISTANT), "messages[0].role")
    )
    for label, value in [*WRONG_TYPES, ("empty", ""), ("blank", "  \n")]:
        yield _case(
            f"chat_content_{label}",
            _line(
                CHAT, _chat({"role": "user", "content": value}, ASSISTANT), "messages[0].content"
            ),
        )
    yield _case(
        "chat_content_missing",
        _line(CHAT, _chat({"role": "user"}, ASSISTANT), "messages[0].content"),
    )
    for label, value in [
        ("string", "1"),
        ("bool", True),
        ("two", 2),
        ("negative", -1),
        ("half", 0.5),
        ("null", None),
        ("array", [1]),
    ]:
        yield _case(
            f"chat_weight_{label}",
            _line(CHAT, _chat(USER, {**ASSISTANT, "weight": value}), "messages[1].weight"),
        )
    yield _case(
        "chat_weight_on_user",
        _line(CHAT, _chat({**USER, "weight": 1}, ASSISTANT), "messages[0].weight"),
    )
    yield _case(
        "chat_only_untrained",
        _line(CHAT, _chat(USER, {**ASSISTANT, "weight": 0}), "no assistant message"),
    )
    yield _case("chat_no_assistant", _line(CHAT, _chat(USER), "no assistant message"))
    yield _case(
        "chat_system_not_first",
        _line(CHAT, _chat(USER, {"role": "system", "content": "s"}, ASSISTANT), "first message"),
    )
    yield _valid(
        "chat_empty_system_first",
        CHAT + b"\n" + _chat({"role": "system", "content": ""}, USER, ASSISTANT),
    )
    yield _valid("chat_weight_float_one", CHAT + b"\n" + _chat(USER, {**ASSISTANT, "weight": 1.0}))
    yield _valid(
        "chat_extra_keys",
        CHAT + b"\n" + _json({"messages": [USER, ASSISTANT], "id": 7, "meta": {"a": [1]}}),
    )


def _prompt_completion_fields() -> Iterator[Case]:
    for field in ("prompt", "completion"):
        for label, value in WRONG_TYPES:
            row = {"prompt": "a", "completion": "b", field: value}
            yield _case(f"pc_{field}_{label}", _line(PC, _json(row), field))
        other = "completion" if field == "prompt" else "prompt"
        yield _case(f"pc_{field}_missing", _line(PC, _json({other: "a"}), field))
    yield _case(
        "pc_completion_empty", _line(PC, _json({"prompt": "a", "completion": ""}), "completion")
    )
    yield _case(
        "pc_completion_blank", _line(PC, _json({"prompt": "a", "completion": " \t"}), "completion")
    )
    yield _valid("pc_prompt_empty", PC + b"\n" + _json({"prompt": "", "completion": "b"}))


def _alpaca_fields() -> Iterator[Case]:
    good = {"instruction": "a", "input": "i", "output": "b"}
    for field in ("instruction", "output", "input"):
        for label, value in WRONG_TYPES:
            if field == "input" and value is None:
                continue  # a null input means none
            yield _case(
                f"alpaca_{field}_{label}", _line(ALPACA, _json({**good, field: value}), field)
            )
    for field in ("instruction", "output"):
        yield _case(f"alpaca_{field}_empty", _line(ALPACA, _json({**good, field: ""}), field))
        row = {k: v for k, v in good.items() if k != field}
        yield _case(f"alpaca_{field}_missing", _line(ALPACA, _json(row), field))
    yield _valid(
        "alpaca_input_missing", ALPACA + b"\n" + _json({"instruction": "a", "output": "b"})
    )
    yield _valid("alpaca_input_null", ALPACA + b"\n" + _json({**good, "input": None}))
    yield _valid("alpaca_input_empty", ALPACA + b"\n" + _json({**good, "input": ""}))


def check(case: Case, status: int, body: dict[str, object]) -> str | None:
    """Why the response to uploading `case` is wrong, or None."""
    if case.name == "only_blank_lines":
        ok = status == 400 and "no examples" in str(body)
        return None if ok else f"{case.name}: {status} {str(body)[:300]}"
    if case.bad_line is None:
        return (
            None if status == 200 else f"{case.name}: expected 200, got {status} {str(body)[:300]}"
        )
    error = body.get("error")
    message = error.get("message", "") if isinstance(error, dict) else ""
    if status != 400 or f"{FILENAME}:{case.bad_line}" not in str(message):
        return (
            f"{case.name}: expected 400 naming line {case.bad_line}, got {status} {str(body)[:300]}"
        )
    if case.needle and case.needle not in str(message):
        return f"{case.name}: {case.needle!r} not in {str(message)[:300]!r}"
    return None
