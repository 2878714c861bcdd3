"""Strict JSON: what a data line or a request body may hold, with a message for each refusal.

Python's `json.loads` takes more than RFC 8259 allows and fails in ways that are not
`JSONDecodeError`: `NaN` and `Infinity` literals pass, `1e999` becomes inf, an integer of
5,000 digits raises a plain ValueError (the interpreter's 4,300-digit limit), and 100,000
nested brackets raise RecursionError. `loads` turns all of these, and strings that are not
text (a lone surrogate escape such as ``"\\ud800"``, a ``"\\u0000"``), into one
`StrictJSONError` whose message says what is wrong and where.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 64  # arrays and objects inside each other; training rows nest 3 deep
MAX_INT_DIGITS = 1000  # Python refuses to read more than 4,300 digits; no field needs 1,000


class StrictJSONError(ValueError):
    """Text that is not JSON we accept; the message says why (no trailing period)."""


def loads(text: str, *, non_finite: bool = False) -> Any:
    """Parse JSON text, refusing what RFC 8259 leaves undefined or Python mishandles.

    Raises StrictJSONError for invalid JSON (with the column), nesting deeper than
    MAX_DEPTH, integers over MAX_INT_DIGITS digits, strings holding an unpaired surrogate
    or a NUL character, and, unless `non_finite`, NaN/Infinity and numbers out of a
    double's range (the API's request bodies allow them: their models name the field).
    """
    numbers: dict[str, Any] = {}
    if not non_finite:
        numbers = {"parse_float": _float, "parse_constant": _constant}
    try:
        value = json.loads(text, parse_int=_int, **numbers)
    except json.JSONDecodeError as e:
        raise StrictJSONError(f"invalid JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise StrictJSONError(f"nested deeper than {MAX_DEPTH} levels") from None
    # Cheap guards first: without this many brackets the depth cannot be over the limit,
    # and text decoded from UTF-8 only holds a surrogate or NUL through a \u escape.
    if text.count("[") + text.count("{") > MAX_DEPTH or "\\u" in text:
        _check_tree(value)
    return value


def _int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise StrictJSONError(
            f"an integer of {len(digits.lstrip('-')):,} digits (at most {MAX_INT_DIGITS:,})"
        )
    return int(digits)


def _float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise StrictJSONError(f"the number {_clip(literal)} is out of range for a double")
    return value


def _constant(name: str) -> float:
    raise StrictJSONError(f"{name} is not a JSON value; use a number or null")


def _check_tree(value: Any) -> None:
    """Depth and string contents, walked without recursion."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            items = list(node.keys()) + list(node.values())
        elif isinstance(node, list):
            items = node
        else:
            _check_text(node)
            continue
        if depth > MAX_DEPTH:
            raise StrictJSONError(f"nested deeper than {MAX_DEPTH} levels")
        stack.extend((item, depth + 1) for item in items)


def _check_text(value: Any) -> None:
    if not isinstance(value, str):
        return
    if "\x00" in value:
        raise StrictJSONError(
            f"the string {_clip(repr(value[:60]))} holds a NUL character (\\u0000), which is not text"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise StrictJSONError(
            f"the string {_clip(repr(value[:60]))} holds an unpaired surrogate escape "
            f"\\u{ord(value[e.start]):04x} at character {e.start + 1}, which is not text"
        ) from None


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"
