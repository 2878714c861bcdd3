"""Shared fixtures: tiny random LLaMA models that run in well under a second."""

from __future__ import annotations

import pytest
from tiny import tiny_llama


@pytest.fixture
def tiny_model():  # type: ignore[no-untyped-def]
    return tiny_llama()
