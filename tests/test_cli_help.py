"""`mixloom --help` says what mixloom is and where to start; every command and option has a
line of help a user understands."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from mixloom.cli import build_parser

# mixloom/eval/cli.py's commands belong to the evaluation work in progress (not checked here)
UNCHECKED = {("mixloom", "data"), ("mixloom", "eval")}


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> Iterator[str]:
    """What has no help: `mixloom jobs create --seed`, `mixloom keys revoke key`, ..."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                if path + (name,) in UNCHECKED:
                    continue
                if not helps.get(name):
                    yield " ".join(path + (name,))
                yield from _walk(sub, path + (name,))
        elif not action.help or action.help == argparse.SUPPRESS:
            yield " ".join(path) + " " + (action.option_strings or [action.dest])[0]


def test_every_command_and_option_has_help() -> None:
    assert list(_walk(build_parser(), ("mixloom",))) == []


def test_the_description_says_what_mixloom_is_and_where_to_start() -> None:
    text = build_parser().format_help()
    assert "Each area registers" not in text  # no developer's note
    assert "LoRA and MixLoRA" in text
    assert "mixloom serve --port 8000" in text and "127.0.0.1:8000" in text
    assert "./mixloom-data" in text and "MIXLOOM_DATA_DIR" in text
