"""strict_json.loads: what json.loads takes or trips on, refused with a reason."""

from __future__ import annotations

import math

import pytest

from mixloom.data.strict_json import MAX_DEPTH, StrictJSONError, loads


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[" * 100_000, "nested deeper than 64 levels"),  # json.loads: RecursionError
        ('{"a":' * 50_000 + "1" + "}" * 50_000, "nested deeper than 64 levels"),
        ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), "nested deeper than 64 levels"),
        ("9" * 5000, "an integer of 5,000 digits"),  # json.loads: ValueError
        ("-" + "9" * 1001, "an integer of 1,001 digits"),
        ("1e999", "out of range"),  # json.loads: inf
        ("[NaN]", "NaN is not a JSON value"),  # json.loads: nan
        ('{"x": -Infinity}', "-Infinity is not a JSON value"),
        ('"\\ud800"', "unpaired surrogate escape \\ud800 at character 1"),
        ('{"\\udc00x": 1}', "unpaired surrogate escape \\udc00"),
        ('["a\\u0000"]', "NUL character"),
        ('{"a": 1', "invalid JSON: Expecting ',' delimiter at column 8"),
        ("\ufeff{}", "invalid JSON: Unexpected UTF-8 BOM"),
    ],
)
def test_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(StrictJSONError) as err:
        loads(text)
    assert reason in str(err.value)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("[" * MAX_DEPTH + "]" * MAX_DEPTH, None),
        ("9" * 1000, int("9" * 1000)),
        ("0." + "1" * 5000, None),
        ('"\\ud83d\\ude00 caf\\u00e9"', "\U0001f600 café"),
        ('{"[": "{{{{", "x": [1, 2.5, null, true]}', {"[": "{{{{", "x": [1, 2.5, None, True]}),
    ],
)
def test_accepted(text: str, value: object) -> None:
    got = loads(text)
    if value is not None:
        assert got == value


def test_request_bodies_keep_non_finite_numbers_for_their_models() -> None:
    got = loads("[NaN, Infinity, 1e999]", non_finite=True)
    assert math.isnan(got[0]) and got[1] == got[2] == math.inf
    with pytest.raises(StrictJSONError, match="digits"):
        loads("9" * 5000, non_finite=True)
