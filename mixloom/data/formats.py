"""Training data files: JSONL in five formats, validated line by line.

Torch-free and transformers-free on purpose: the API process validates uploads with it.

One JSON object per line, in one of five formats:

- chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
- prompt/completion: ``{"prompt": "...", "completion": "..."}``
- alpaca: ``{"instruction": "...", "input": "..." (optional), "output": "..."}``
- text: ``{"text": "..."}`` (plain text, loss on every token: continued pretraining, a
  style, raw completions)
- preference (OpenAI's, for DPO jobs): ``{"input": {"messages": [...]},
  "preferred_output": [{"role": "assistant", "content": "..."}],
  "non_preferred_output": [{"role": "assistant", "content": "..."}]}``

Decisions (the API documents the same):

- Blank (or whitespace-only) lines are allowed and skipped; they count for line numbers only.
- A UTF-8 byte-order mark at the start of the file is ignored.
- One format per file: the first valid row fixes it, and rows in another format are
  reported. A mixed file is almost always two files concatenated by mistake, and the loss
  mask differs per format.
- Keys beyond those of the format (``"id"``, ``"metadata"``, ...) are ignored.
- Content must be a non-empty string where the text is trained on or asked about: user
  and assistant messages, ``completion``, ``instruction``, ``output``, ``text``. A system message,
  ``prompt`` and ``input`` may be empty.
- Roles are system, user and assistant (no tool calls yet). A system message may only
  come first; a chat needs at least one assistant message, and every assistant message
  is trained on unless it has ``"weight": 0`` (``weight`` is 0 or 1, assistant only).
- A preference row's ``input.messages`` follow the chat rules, except that they take no
  ``weight`` and need no assistant message, and they must end with a user message: the two
  answers reply to it. ``preferred_output`` and ``non_preferred_output`` are each a list of
  exactly one assistant message, and their contents must differ (ignoring surrounding
  whitespace). OpenAI's ``tools`` and ``parallel_tool_calls`` are ignored, like any other key.
- Validation reports every problem (up to ``max_problems``, then a count of the rest).
- Each line is strict JSON (``strict_json.loads``): no NaN or Infinity, numbers within a
  double's range, integers of at most 1,000 digits, nesting at most 64 deep, and no
  string anywhere in the line holding an unpaired surrogate or NUL escape. A line is at
  most ``MAX_LINE_BYTES`` (1 MiB); a longer one is reported, never read whole.
- Lines end with ``\\n``; a ``\\r`` before it is JSON whitespace, so CRLF files are fine.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO

from mixloom.data import strict_json
from mixloom.errors import DataError, Problem

MAX_LINES = 200_000
MAX_PROBLEMS = 100
# One example per line; 1 MiB is ~250k tokens of English text, far past any max_seq_len.
# Over it, a line is reported without being read whole.
MAX_LINE_BYTES = 1024 * 1024
BOM = b"\xef\xbb\xbf"
_SKIP_CHUNK = 64 * 1024
ROLES = ("system", "user", "assistant")


class Format(StrEnum):
    CHAT = "chat"
    PROMPT_COMPLETION = "prompt_completion"
    ALPACA = "alpaca"
    TEXT = "text"
    PREFERENCE = "preference"


_EXPECTED_KEYS = (
    '{"messages": [...]} (chat), {"prompt", "completion"}, '
    '{"instruction", "input" (optional), "output"} (alpaca), {"text"} (plain text) or '
    '{"input", "preferred_output", "non_preferred_output"} (preference pairs, for dpo)'
)
_ANSWER = '[{"role": "assistant", "content": "..."}]'


@dataclass(frozen=True)
class Example:
    """One training example, normalised to chat messages whatever its file format.

    prompt/completion becomes ``(("user", prompt), ("assistant", completion))``; alpaca
    becomes ``(("user", instruction + "\\n\\n" + input), ("assistant", output))``; text
    becomes ``(("text", text),)``, one piece trained on whole. A preference pair becomes
    its input messages followed by ``("assistant", preferred)``, with the input's own
    assistant messages untrained (only the final answer is compared), and ``rejected``
    the non-preferred answer to that same conversation.
    """

    messages: tuple[tuple[str, str], ...]  # (role, content)
    format: Format
    source: str = ""  # "file.jsonl:12", for messages about this example
    untrained: frozenset[int] = frozenset()  # indices of assistant messages with weight 0
    rejected: str | None = None  # preference rows: the non-preferred last assistant message


def validate_jsonl_file(
    path: str | Path,
    *,
    filename: str,
    max_lines: int = MAX_LINES,
    max_problems: int = MAX_PROBLEMS,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> tuple[int, list[Problem]]:
    """Validate a JSONL training file on disk, one line in memory at a time.

    Returns (number of non-blank lines, problems). An empty problem list means the file
    is good. Each problem's ``where`` is ``"{filename}:{line}"`` or
    ``"{filename}:{line}: {field}"`` (e.g. ``"train.jsonl:12: messages[2].role"``).
    """
    with open(path, "rb") as f:
        rows, _, problems = _scan(
            f, filename, max_lines, max_problems, max_line_bytes, keep_examples=False
        )
    return rows, problems


def validate_jsonl_bytes(
    data: bytes,
    *,
    filename: str,
    max_lines: int = MAX_LINES,
    max_problems: int = MAX_PROBLEMS,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> tuple[int, list[Problem]]:
    """`validate_jsonl_file` for bytes in memory."""
    rows, _, problems = _scan(
        io.BytesIO(data), filename, max_lines, max_problems, max_line_bytes, keep_examples=False
    )
    return rows, problems


def parse_jsonl_bytes(data: bytes, *, filename: str, max_lines: int = MAX_LINES) -> list[Example]:
    """Parse a JSONL training file; raise DataError listing every problem if any."""
    _, examples, problems = _scan(
        io.BytesIO(data), filename, max_lines, MAX_PROBLEMS, MAX_LINE_BYTES, keep_examples=True
    )
    if problems:
        raise DataError(problems)
    return examples


def load_jsonl(path: str | Path, *, max_lines: int = MAX_LINES) -> list[Example]:
    """Read and parse a JSONL training file; raise DataError listing every problem if any."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            _, examples, problems = _scan(
                f, str(path), max_lines, MAX_PROBLEMS, MAX_LINE_BYTES, keep_examples=True
            )
    except OSError as e:
        raise DataError(
            f"cannot read data file: {e.strerror}; check the path", where=str(path)
        ) from e
    if problems:
        raise DataError(problems)
    return examples


def file_format(path: str | Path | BinaryIO) -> Format | None:
    """The format of a file validated already (an upload), from its first non-blank row
    alone: one format per file, so a job's files are checked without reading them whole.
    None when that row is not a training row (a file of evaluation rows, say). OSError
    when the file cannot be read. `path` may be an open binary file (an object store's
    stream), read only as far as that row."""
    if not isinstance(path, str | Path):
        return _first_format(path, "file")
    with open(path, "rb") as f:
        return _first_format(f, str(path))


def _first_format(f: BinaryIO, name: str) -> Format | None:
    for _, raw in _lines(f, MAX_LINE_BYTES):
        if raw is None:
            return None
        if raw.strip():
            example = _parse_line(raw, name, [])
            return None if example is None else example.format
    return None


def _lines(f: BinaryIO, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line without its newline), or None for a line over max_line_bytes,
    which is skipped without being held."""
    for lineno in itertools.count(1):
        raw = f.readline(max_line_bytes + 1)
        if not raw:
            return
        if lineno == 1 and raw.startswith(BOM):
            raw = raw[len(BOM) :]
        if raw.endswith(b"\n"):
            yield lineno, raw[:-1]
        elif len(raw) <= max_line_bytes:
            yield lineno, raw  # the last line, without a newline
        else:
            while (rest := f.readline(_SKIP_CHUNK)) and not rest.endswith(b"\n"):
                pass
            yield lineno, None


def _scan(
    f: BinaryIO,
    filename: str,
    max_lines: int,
    max_problems: int,
    max_line_bytes: int,
    *,
    keep_examples: bool,
) -> tuple[int, list[Example], list[Problem]]:
    problems = _Problems(max_problems)
    examples: list[Example] = []
    file_format: tuple[Format, int] | None = None  # (format, line that fixed it)
    rows = 0
    for lineno, raw in _lines(f, max_line_bytes):
        where = f"{filename}:{lineno}"
        if raw is None:
            rows += 1
            problems.add(
                Problem(
                    where,
                    f"the line is longer than {max_line_bytes:,} bytes; shorten the example "
                    "or split it into several",
                )
            )
            continue
        if not raw.strip():
            continue
        rows += 1
        if rows > max_lines:
            problems.add(
                Problem(where, f"the file has more than {max_lines} lines; split it or remove rows")
            )
            break
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
            for p in row_problems:
                problems.add(p)
        elif example is not None and keep_examples:
            examples.append(example)
    if rows == 0:
        problems.add(Problem(filename, "the file has no examples; upload one JSON object per line"))
    return rows, examples, problems.listed(filename)


class _Problems:
    """The first `limit` problems, and a count of the rest (a bad file must not fill memory)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.shown: list[Problem] = []
        self.hidden = 0

    def add(self, problem: Problem) -> None:
        if len(self.shown) < self.limit:
            self.shown.append(problem)
        else:
            self.hidden += 1

    def listed(self, filename: str) -> list[Problem]:
        if not self.hidden:
            return self.shown
        return [*self.shown, Problem(filename, f"... and {self.hidden} more problems not shown")]


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
        obj = strict_json.loads(text)
    except strict_json.StrictJSONError as e:
        fix = (
            "each line must be one complete JSON object"
            if str(e).startswith("invalid JSON")
            else "fix or remove this line"
        )
        problems.append(Problem(where, f"{e}; {fix}"))
        return None
    if not isinstance(obj, dict):
        problems.append(
            Problem(where, f"expected a JSON object, got {_json_type(obj)}; use {_EXPECTED_KEYS}")
        )
        return None
    if "preferred_output" in obj or "non_preferred_output" in obj:
        return _parse_preference(obj, where, problems)
    if "messages" in obj:
        return _parse_chat(obj, where, problems)
    if "prompt" in obj or "completion" in obj:
        return _parse_prompt_completion(obj, where, problems)
    if "instruction" in obj or "output" in obj:
        return _parse_alpaca(obj, where, problems)
    if isinstance(obj.get("input"), dict):  # alpaca's input is a string
        return _parse_preference(obj, where, problems)
    if "text" in obj:
        text = _text(obj, "text", f"{where}: text", problems, empty_ok=False)
        return None if text is None else Example((("text", text),), Format.TEXT, where)
    keys = ", ".join(_show_key(k) for k in list(obj)[:10]) or "none"
    problems.append(Problem(where, f"unknown format: keys found {keys}; expected {_EXPECTED_KEYS}"))
    return None


def _parse_chat(obj: dict[str, Any], where: str, problems: list[Problem]) -> Example | None:
    start = len(problems)
    parsed = _messages(
        obj["messages"],
        f"{where}: messages",
        problems,
        weights=True,
        when_empty="add user and assistant messages",
    )
    if parsed is None:
        return None
    out, untrained = parsed
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


def _parse_preference(obj: dict[str, Any], where: str, problems: list[Problem]) -> Example | None:
    start = len(problems)
    history = _preference_input(obj, where, problems)
    preferred = _answer(obj, "preferred_output", where, problems)
    rejected = _answer(obj, "non_preferred_output", where, problems)
    if preferred is not None and rejected is not None and preferred.strip() == rejected.strip():
        problems.append(
            Problem(
                f"{where}: non_preferred_output[0].content",
                "preferred_output and non_preferred_output are the same answer; a pair "
                "teaches nothing, so give a worse answer here or drop the row",
            )
        )
    if len(problems) > start or history is None or preferred is None:
        return None
    untrained = frozenset(i for i, (role, _) in enumerate(history) if role == "assistant")
    messages = (*history, ("assistant", preferred))
    return Example(messages, Format.PREFERENCE, where, untrained, rejected)


def _preference_input(
    obj: dict[str, Any], where: str, problems: list[Problem]
) -> list[tuple[str, str]] | None:
    """A preference row's ``input.messages``: the conversation both answers reply to."""
    field = f"{where}: input"
    shape = '{"messages": [...]} ending with a user message'
    if "input" not in obj:
        problems.append(Problem(field, f"missing; add {shape}"))
        return None
    value = obj["input"]
    if not isinstance(value, dict):
        problems.append(Problem(field, f"expected an object {shape}, got {_json_type(value)}"))
        return None
    if "messages" not in value:
        problems.append(Problem(f"{field}.messages", "missing; add the conversation so far"))
        return None
    start = len(problems)
    parsed = _messages(
        value["messages"],
        f"{field}.messages",
        problems,
        weights=False,
        when_empty="add the conversation so far, ending with a user message",
    )
    if parsed is None:
        return None
    last = value["messages"][-1]
    if isinstance(last, dict) and last.get("role") in ("system", "assistant"):
        problems.append(
            Problem(
                f"{field}.messages[{len(value['messages']) - 1}].role",
                f"the input ends with a message of role {last['role']!r}; it must end with "
                "the user message that preferred_output and non_preferred_output answer",
            )
        )
    return None if len(problems) > start else parsed[0]


def _answer(obj: dict[str, Any], key: str, where: str, problems: list[Problem]) -> str | None:
    """The content of a preference row's answer: a list of exactly one assistant message."""
    field = f"{where}: {key}"
    if key not in obj:
        problems.append(Problem(field, f"missing; add {_ANSWER}"))
        return None
    value = obj[key]
    if not isinstance(value, list):
        problems.append(
            Problem(field, f"expected a list of one assistant message, got {_json_type(value)}")
        )
        return None
    if len(value) != 1:
        count = f"has {len(value)} messages" if value else "is empty"
        problems.append(Problem(field, f"{count}; give exactly one assistant message, {_ANSWER}"))
        return None
    (msg,) = value
    if not isinstance(msg, dict):
        problems.append(
            Problem(
                f"{field}[0]", f'expected an object {{"role", "content"}}, got {_json_type(msg)}'
            )
        )
        return None
    role = msg.get("role")
    if role != "assistant":
        got = "missing" if "role" not in msg else f"got {_show(role)}"
        problems.append(Problem(f"{field}[0].role", f'must be "assistant" ({got})'))
    content = _text(msg, "content", f"{field}[0].content", problems, empty_ok=False)
    return content if role == "assistant" else None


def _messages(
    messages: object, field: str, problems: list[Problem], *, weights: bool, when_empty: str
) -> tuple[list[tuple[str, str]], set[int]] | None:
    """Chat messages at `field` as (role, content) pairs, and the indices of those with
    weight 0; None when they are not a non-empty list. Problems go to `problems`."""
    if not isinstance(messages, list):
        problems.append(Problem(field, f"expected a list of messages, got {_json_type(messages)}"))
        return None
    if not messages:
        problems.append(Problem(field, f"is empty; {when_empty}"))
        return None
    out: list[tuple[str, str]] = []
    untrained: set[int] = set()
    for i, msg in enumerate(messages):
        at = f"{field}[{i}]"
        if not isinstance(msg, dict):
            problems.append(
                Problem(at, f'expected an object {{"role", "content"}}, got {_json_type(msg)}')
            )
            continue
        role = msg.get("role")
        if "role" not in msg:
            problems.append(Problem(f"{at}.role", f"missing; use one of {list(ROLES)}"))
        elif not isinstance(role, str) or role not in ROLES:
            problems.append(
                Problem(f"{at}.role", f"unknown role {_show(role)}; use one of {list(ROLES)}")
            )
        elif role == "system" and i > 0:
            problems.append(
                Problem(
                    f"{at}.role",
                    "a system message may only be the first message; move it to the start",
                )
            )
        content = _text(msg, "content", f"{at}.content", problems, empty_ok=role == "system")
        if "weight" in msg:
            weight = msg["weight"]
            if not weights:
                problems.append(
                    Problem(
                        f"{at}.weight",
                        "a preference row's input takes no weight (only the final answers "
                        "are compared); remove it",
                    )
                )
            elif role != "assistant":
                problems.append(Problem(f"{at}.weight", "only assistant messages have a weight"))
            elif isinstance(weight, bool) or weight not in (0, 1):
                problems.append(
                    Problem(f"{at}.weight", f"must be 0 (no loss) or 1 (loss), got {_show(weight)}")
                )
            elif weight == 0:
                untrained.add(i)
        if isinstance(role, str) and content is not None:
            out.append((role, content))
    return out, untrained


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
    if not empty_ok and not value.strip():
        problems.append(Problem(field, "is empty; give the text, or drop this row"))
        return None
    return value


def _show(value: object) -> str:
    """A value for a message: short, and never the whole of a huge one."""
    if isinstance(value, str):
        text = repr(value[:40])
        return text if len(value) <= 40 else f"{text[:-1]}...{text[-1]}"
    if isinstance(value, bool | int | float) or value is None:
        return _clip_number(value)
    return _json_type(value)


def _show_key(key: str) -> str:
    return f'"{key}"' if len(key) <= 40 else f'"{key[:37]}..."'


def _clip_number(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} digits)"


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
