"""Training data files: JSONL in three formats, validated line by line.

Torch-free and transformers-free on purpose: the API process validates uploads with it.

One JSON object per line, in one of three formats:

- chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
- prompt/completion: ``{"prompt": "...", "completion": "..."}``
- alpaca: ``{"instruction": "...", "input": "..." (optional), "output": "..."}``

Decisions (the API documents the same):

- Blank (or whitespace-only) lines are allowed and skipped; they count for line numbers only.
- A UTF-8 byte-order mark at the start of the file is ignored.
- One format per file: the first valid row fixes it, and rows in another format are
  reported. A mixed file is almost always two files concatenated by mistake, and the loss
  mask differs per format.
- Keys beyond those of the format (``"id"``, ``"metadata"``, ...) are ignored.
- Content must be a non-empty string where the text is trained on or asked about: user
  and assistant messages, ``completion``, ``instruction``, ``output``. A system message,
  ``prompt`` and ``input`` may be empty.
- Roles are system, user and assistant (no tool calls yet). A system message may only
  come first; a chat needs at least one assistant message, and every assistant message
  is trained on unless it has ``"weight": 0`` (``weight`` is 0 or 1, assistant only).
- Validation reports every problem (up to ``max_problems``, then a count of the rest).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from mixloom.errors import DataError, Problem

MAX_LINES = 200_000
MAX_PROBLEMS = 100
ROLES = ("system", "user", "assistant")


class Format(StrEnum):
    CHAT = "chat"
    PROMPT_COMPLETION = "prompt_completion"
    ALPACA = "alpaca"


_EXPECTED_KEYS = (
    '{"messages": [...]} (chat), {"prompt", "completion"}, '
    'or {"instruction", "input" (optional), "output"} (alpaca)'
)


@dataclass(frozen=True)
class Example:
    """One training example, normalised to chat messages whatever its file format.

    prompt/completion becomes ``(("user", prompt), ("assistant", completion))``; alpaca
    becomes ``(("user", instruction + "\\n\\n" + input), ("assistant", output))``.
    """

    messages: tuple[tuple[str, str], ...]  # (role, content)
    format: Format
    source: str = ""  # "file.jsonl:12", for messages about this example
    untrained: frozenset[int] = frozenset()  # indices of assistant messages with weight 0


def validate_jsonl_bytes(
    data: bytes,
    *,
    filename: str,
    max_lines: int = MAX_LINES,
    max_problems: int = MAX_PROBLEMS,
) -> tuple[int, list[Problem]]:
    """Validate a JSONL training file without loading it into examples.

    Returns (number of non-blank lines, problems). An empty problem list means the file
    is good. Each problem's ``where`` is ``"{filename}:{line}"`` or
    ``"{filename}:{line}: {field}"`` (e.g. ``"train.jsonl:12: messages[2].role"``).
    """
    rows, _, problems = _scan(data, filename, max_lines, max_problems)
    return rows, problems


def parse_jsonl_bytes(data: bytes, *, filename: str, max_lines: int = MAX_LINES) -> list[Example]:
    """Parse a JSONL training file; raise DataError listing every problem if any."""
    _, examples, problems = _scan(data, filename, max_lines, MAX_PROBLEMS)
    if problems:
        raise DataError(problems)
    return examples


def load_jsonl(path: str | Path, *, max_lines: int = MAX_LINES) -> list[Example]:
    """Read and parse a JSONL training file; raise DataError listing every problem if any."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(
            f"cannot read data file: {e.strerror}; check the path", where=str(path)
        ) from e
    return parse_jsonl_bytes(data, filename=str(path), max_lines=max_lines)


def _scan(
    data: bytes, filename: str, max_lines: int, max_problems: int
) -> tuple[int, list[Example], list[Problem]]:
    problems: list[Problem] = []
    examples: list[Example] = []
    file_format: tuple[Format, int] | None = None  # (format, line that fixed it)
    rows = 0
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        rows += 1
        if rows > max_lines:
            problems.append(
                Problem(
                    f"{filename}:{lineno}",
                    f"the file has more than {max_lines} lines; split it or remove rows",
                )
            )
            break
        where = f"{filename}:{lineno}"
        row_problems: list[Problem] = []
        example = _parse_line(raw, where, row_problems)
        if example is not None:
            if file_format is None:
                file_format = (example.format, lineno)
            elif example.format != file_format[0]:
                fmt, first = file_format
                row_problems.append(
                    Problem(
                        where,
                        f"this row is {example.format.value} but the file is {fmt.value} "
                        f"(from line {first}); put each format in its own file",
                    )
                )
        if row_problems:
            problems.extend(row_problems)
        elif example is not None:
            examples.append(example)
    if rows == 0:
        problems.append(
            Problem(filename, "the file has no examples; upload one JSON object per line")
        )
    if len(problems) > max_problems:
        rest = len(problems) - max_problems
        problems = problems[:max_problems]
        problems.append(Problem(filename, f"... and {rest} more problems not shown"))
    return rows, examples, problems


def _parse_line(raw: bytes, where: str, problems: list[Problem]) -> Example | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        problems.append(
            Problem(
                where,
                f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                "save the file as UTF-8",
            )
        )
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        problems.append(
            Problem(
                where,
                f"invalid JSON: {e.msg} at column {e.colno}; "
                "each line must be one complete JSON object",
            )
        )
        return None
    if not isinstance(obj, dict):
        problems.append(
            Problem(where, f"expected a JSON object, got {_json_type(obj)}; use {_EXPECTED_KEYS}")
        )
        return None
    if "messages" in obj:
        return _parse_chat(obj, where, problems)
    if "prompt" in obj or "completion" in obj:
        return _parse_prompt_completion(obj, where, problems)
    if "instruction" in obj or "output" in obj:
        return _parse_alpaca(obj, where, problems)
    keys = ", ".join(f'"{k}"' for k in list(obj)[:10]) or "none"
    problems.append(Problem(where, f"unknown format: keys found {keys}; expected {_EXPECTED_KEYS}"))
    return None


def _parse_chat(obj: dict[str, Any], where: str, problems: list[Problem]) -> Example | None:
    messages = obj["messages"]
    if not isinstance(messages, list):
        problems.append(
            Problem(
                f"{where}: messages",
                f"expected a list of messages, got {_json_type(messages)}",
            )
        )
        return None
    if not messages:
        problems.append(Problem(f"{where}: messages", "is empty; add user and assistant messages"))
        return None
    start = len(problems)
    out: list[tuple[str, str]] = []
    untrained: set[int] = set()
    for i, msg in enumerate(messages):
        field = f"{where}: messages[{i}]"
        if not isinstance(msg, dict):
            problems.append(
                Problem(field, f'expected an object {{"role", "content"}}, got {_json_type(msg)}')
            )
            continue
        role = msg.get("role")
        if "role" not in msg:
            problems.append(Problem(f"{field}.role", f"missing; use one of {list(ROLES)}"))
        elif not isinstance(role, str) or role not in ROLES:
            problems.append(
                Problem(f"{field}.role", f"unknown role {role!r}; use one of {list(ROLES)}")
            )
        elif role == "system" and i > 0:
            problems.append(
                Problem(
                    f"{field}.role",
                    "a system message may only be the first message; move it to the start",
                )
            )
        content = _text(msg, "content", f"{field}.content", problems, empty_ok=role == "system")
        if "weight" in msg:
            weight = msg["weight"]
            if role != "assistant":
                problems.append(Problem(f"{field}.weight", "only assistant messages have a weight"))
            elif isinstance(weight, bool) or weight not in (0, 1):
                problems.append(
                    Problem(f"{field}.weight", f"must be 0 (no loss) or 1 (loss), got {weight!r}")
                )
            elif weight == 0:
                untrained.add(i)
        if isinstance(role, str) and content is not None:
            out.append((role, content))
    trained = [i for i, (role, _) in enumerate(out) if role == "assistant" and i not in untrained]
    if len(problems) == start and not trained:
        problems.append(
            Problem(
                f"{where}: messages",
                "has no assistant message with weight 1, so nothing would be trained on; "
                'add {"role": "assistant", "content": ...}',
            )
        )
    if len(problems) > start:
        return None
    return Example(tuple(out), Format.CHAT, where, frozenset(untrained))


def _parse_prompt_completion(
    obj: dict[str, Any], where: str, problems: list[Problem]
) -> Example | None:
    prompt = _text(obj, "prompt", f"{where}: prompt", problems, empty_ok=True)
    completion = _text(obj, "completion", f"{where}: completion", problems, empty_ok=False)
    if prompt is None or completion is None:
        return None
    return Example((("user", prompt), ("assistant", completion)), Format.PROMPT_COMPLETION, where)


def _parse_alpaca(obj: dict[str, Any], where: str, problems: list[Problem]) -> Example | None:
    instruction = _text(obj, "instruction", f"{where}: instruction", problems, empty_ok=False)
    output = _text(obj, "output", f"{where}: output", problems, empty_ok=False)
    extra: str | None = ""
    if obj.get("input") is not None:  # missing or null: no input
        extra = _text(obj, "input", f"{where}: input", problems, empty_ok=True)
    if instruction is None or output is None or extra is None:
        return None
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return Example((("user", user), ("assistant", output)), Format.ALPACA, where)


def _text(
    obj: dict[str, Any], key: str, field: str, problems: list[Problem], *, empty_ok: bool
) -> str | None:
    """obj[key] as a string, or None after recording why it is not a usable one."""
    if key not in obj:
        problems.append(Problem(field, "missing; add it as a string"))
        return None
    value = obj[key]
    if not isinstance(value, str):
        problems.append(Problem(field, f"expected a string, got {_json_type(value)}"))
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        problems.append(
            Problem(
                field,
                f"has an unpaired surrogate escape \\u{ord(value[e.start]):04x} at character "
                f"{e.start + 1}, which is not text; fix the escape or the encoder",
            )
        )
        return None
    if not empty_ok and not value.strip():
        problems.append(Problem(field, "is empty; give the text, or drop this row"))
        return None
    return value


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
