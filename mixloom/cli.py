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


DESCRIPTION = """\
mixloom: a fine-tuning server that trains many tenants' LoRA and MixLoRA adapters together,
in one fused step on one frozen base model.

Start here (one machine; run both where the data should live: they share ./mixloom-data,
or $MIXLOOM_DATA_DIR):
  export MIXLOOM_API_KEY=$(mixloom tenants create acme)
  mixloom serve --port 8000
Then, from any shell (the server: $MIXLOOM_BASE_URL, default http://127.0.0.1:8000):
  mixloom jobs create --training-file train.jsonl --method mixlora --watch
Without a server: mixloom train CONFIG. `mixloom COMMAND --help` says more."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixloom",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
        from mixloom.clients.cli import explain

        print(f"mixloom {args.command}: error: {explain(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path the user gave: unreadable, unwritable, missing
        where = f": {exc.filename}" if exc.filename else ""
        print(f"mixloom {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
