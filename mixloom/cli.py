"""The `mixloom` command. Each area registers its own subcommands; heavy imports stay lazy."""

from __future__ import annotations

import argparse
import importlib
import sys

from mixloom.errors import MixloomError

# Modules exposing `register(subparsers)`. Each handler is stored as `func` on its parser.
_COMMAND_MODULES = [
    "mixloom.trainer.cli",  # train, generate
    "mixloom.storage.cli",  # tenants, keys, db
    "mixloom.server.cli",  # api
    "mixloom.scheduler.cli",  # worker, serve
    "mixloom.clients.cli",  # models, files, jobs, adapters (HTTP client)
    "mixloom.eval.cli",  # eval, data task
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixloom", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MixloomError as exc:
        print(f"mixloom {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
