"""The ``vidlang`` entry point: dispatches to the commands registered in :mod:`vidlang.commands`.

This package also holds the Lightning side of ``vidlang fit|validate|test``: :mod:`vidlang.cli.lightning`
(the LightningCLI) and :mod:`vidlang.cli.progress_bar` (progress as lines outside a terminal).

Errors. A user error -- a :class:`~vidlang.errors.VidlangUserError` (bad config value, missing, unsafe or
wrong-kind checkpoint, ...), a :class:`~vidlang.data.formats.base.FormatError` (malformed annotation file) or a
command-line parse error -- prints one line on stderr and exits with status 2. Every other exception is a bug
and keeps its traceback. ``vidlang --debug COMMAND ...`` or ``VIDLANG_DEBUG=1`` prints the traceback of user
errors too.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from vidlang import __version__

DEBUG_ENV = "VIDLANG_DEBUG"


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors (``PROG: error: MESSAGE (see PROG --help)``, exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def one_line(message: object) -> str:
    """A message on one line (its lines joined by ``; ``, or by a space after a colon)."""
    out = ""
    for line in (ln.strip() for ln in str(message).splitlines()):
        if line:
            out += line if not out else (" " if out.endswith(":") else "; ") + line
    return out


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is the user's to fix (module docstring): then it is reported on one line."""
    from vidlang.errors import VidlangUserError

    if isinstance(err, VidlangUserError):
        return True
    from vidlang.data.formats.base import FormatError

    return isinstance(err, FormatError)


def error_message(err: BaseException) -> str:
    # KeyError subclasses quote their message in str(); show the text itself
    text = err.args[0] if isinstance(err, KeyError) and len(err.args) == 1 else err
    return one_line(text) or type(err).__name__


def debug_requested() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def build_parser() -> argparse.ArgumentParser:
    from vidlang.commands import load_all

    parser = OneLineParser(
        prog="vidlang", description="Adapt image CLIP models to video (retrieval, recognition, chat)."
    )
    parser.add_argument("--version", action="version", version=f"vidlang {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of user errors too (or set {DEBUG_ENV}=1)")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    registry = load_all()
    for name in registry:
        cmd = registry.get(name)()
        if getattr(cmd, "passthrough", False):
            sub.add_parser(name, help=cmd.help, add_help=False)
            continue
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_cmd=cmd)
    return parser


def run(argv: list[str]) -> int:
    """Dispatch ``argv`` (without the global options) to its command; exceptions propagate."""
    from vidlang.commands import load_all

    registry = load_all()
    if argv and argv[0] in registry:
        cmd = registry.get(argv[0])()
        if getattr(cmd, "passthrough", False):
            return int(cmd.run_argv(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    return int(args._cmd.run(args) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested()
    while argv and argv[0] == "--debug":  # global option, before the command
        debug = True
        argv.pop(0)
    try:
        return run(argv)
    except Exception as err:
        if not is_user_error(err):
            raise
        if debug:
            traceback.print_exc()
        sys.stdout.flush()
        print(f"error: {error_message(err)}", file=sys.stderr, flush=True)
        return 2

