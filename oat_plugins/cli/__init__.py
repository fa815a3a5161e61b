"""The ``oat-plugins`` command line. Each command is one module of this package exposing
``register(subparsers)`` (adds its parser, with ``set_defaults(func=run)``) and ``run(args)``.

Errors: a bad argument, or an expected user error raised by a command (see
:func:`is_user_error`), is reported as one line ``oat-plugins <command>: error: <message>`` on
stderr with exit status 2. Anything else is a bug and keeps its traceback; ``--debug`` (or
``OAT_PLUGINS_DEBUG=1``) shows the traceback of user errors too."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from ._config import with_config

COMMANDS: tuple[str, ...] = (
    "train",
    "eval",
    "export",
    "demo",
    "gdws",
    "benchmark",
    "leaderboard",
    "info",
)
"""Command modules, in the order ``--help`` lists them."""


DEBUG_ENV = "OAT_PLUGINS_DEBUG"
"""Set to a non-empty value other than ``0`` to get tracebacks, as with ``--debug``."""

_USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, TypeError, FileNotFoundError, FileExistsError, IsADirectoryError,
    NotADirectoryError, PermissionError,
)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block); the sub-command parsers
    are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is an expected consequence of bad input (reported in one line) rather
    than a bug: our validation's ValueError / TypeError, missing or unusable files, and
    timm's unknown model name (a RuntimeError)."""
    if isinstance(err, _USER_ERRORS):
        return True
    return isinstance(err, RuntimeError) and str(err).startswith("Unknown model")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="oat-plugins",
        description="Once-for-all conditional robustness for timm backbones.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of every error (also: {DEBUG_ENV}=1)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        if getattr(args, "config", None) is not None:  # the file's options, then the command line's
            args = parser.parse_args(with_config(argv, args))
        return int(args.func(args) or 0)
    except Exception as err:
        if debug or not is_user_error(err):
            raise
        print(f"oat-plugins {args.command}: error: {_one_line(err) or type(err).__name__}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
