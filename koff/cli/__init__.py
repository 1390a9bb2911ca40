"""The ``koff`` command line.

Nothing heavy is imported at module level: the commands (and torch, transformers under them) are
imported inside ``main``'s error handling, so a Ctrl-C while they load is one line, not a traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys

from koff import __version__


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` runs and temporary files are removed."""


def build_parser() -> argparse.ArgumentParser:
    from koff.cli import add_domain_cmd, analyze_cmd, decompose_cmd, eval_cmd, export_cmd, plan_cmd, runtime_cmd, serve_cmd

    parser = argparse.ArgumentParser(
        prog="koff",
        description="Decompose a pretrained LLM into a sparse shared backbone and swappable per-domain memories.",
    )
    parser.add_argument("--version", action="version", version=f"koff {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (eval_cmd, decompose_cmd, plan_cmd, export_cmd, runtime_cmd, add_domain_cmd, serve_cmd, analyze_cmd):
        command.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    previous = _on_sigterm(_terminate)
    try:
        from koff.cli.common import resolve_args, setup_logging
        from koff.errors import KoffError

        try:
            args = resolve_args(build_parser(), argv)
            setup_logging(args.verbose, args.quiet)
            return args.func(args)
        except KoffError as err:  # every refusal: one line, no traceback
            return _fail(err)
        except OSError as err:  # a file the user named cannot be read or written (missing, no permission, disk full)
            return _fail(err)
    except Terminated:
        print("koff: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("koff: interrupted", file=sys.stderr)
        return 130
    finally:
        _on_sigterm(previous)


def _fail(err: Exception) -> int:
    print(f"koff: error: {err}", file=sys.stderr)
    return 2


def _terminate(signum, frame) -> None:
    raise Terminated()


def _on_sigterm(handler):
    """Install ``handler`` for SIGTERM (from the main thread only: elsewhere Python cannot); the previous one back."""
    if handler is None:
        return None
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


if __name__ == "__main__":
    sys.exit(main())
