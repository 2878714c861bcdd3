"""What a test needs from outside the repository (a service, a package, a program, a file):
without it the test skips on a developer's machine and FAILS in CI (CI=true), so CI never
passes by skipping. GPU-only tests are marked `gpu` instead; `-m 'not gpu'` deselects them."""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest


def missing(problem: str) -> NoReturn:
    """Stop this test (or module) because `problem` keeps it from running: say what to install."""
    if os.environ.get("CI") == "true":
        pytest.fail(problem, pytrace=False)
    pytest.skip(problem, allow_module_level=True)


def need(problem: str | None) -> None:
    """`missing(problem)` unless there is no problem (None)."""
    if problem is not None:
        missing(problem)


def need_module(name: str, install: str) -> ModuleType:
    """The module `name`, or `missing` with how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(f"{name} cannot be imported ({exc}); {install}")
