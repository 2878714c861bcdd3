"""Helpers for the storage tests."""

from __future__ import annotations

import os

import pytest


def need(problem: str | None) -> None:
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(problem)
    pytest.skip(problem)
