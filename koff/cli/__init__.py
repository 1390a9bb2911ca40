"""The ``koff`` command line."""

from __future__ import annotations

import argparse
import sys

from koff import __version__
from koff.cli import add_domain_cmd, analyze_cmd, decompose_cmd, eval_cmd, export_cmd, plan_cmd, runtime_cmd, serve_cmd
from koff.cli.common import resolve_args, setup_logging
from koff.errors import KoffError

COMMANDS = [eval_cmd, decompose_cmd, plan_cmd, export_cmd, runtime_cmd, add_domain_cmd, serve_cmd, analyze_cmd]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="koff",
        description="Decompose a pretrained LLM into a sparse shared backbone and swappable per-domain memories.",
    )
    parser.add_argument("--version", action="version", version=f"koff {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = resolve_args(parser, argv)
    setup_logging(args.verbose, args.quiet)
    try:
        return args.func(args)
    except KoffError as err:  # every refusal: one line, no traceback
        print(f"koff: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a file the user named cannot be read or written (missing, no permission, disk full)
        print(f"koff: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("koff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
