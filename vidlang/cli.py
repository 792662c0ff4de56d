"""The ``vidlang`` entry point: dispatches to the commands registered in :mod:`vidlang.commands`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vidlang import __version__


def build_parser() -> argparse.ArgumentParser:
    from vidlang.commands import load_all

    parser = argparse.ArgumentParser(
        prog="vidlang", description="Adapt image CLIP models to video (retrieval, recognition, chat)."
    )
    parser.add_argument("--version", action="version", version=f"vidlang {__version__}")
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from vidlang.commands import load_all

    registry = load_all()
    if argv and argv[0] in registry:
        cmd = registry.get(argv[0])()
        if getattr(cmd, "passthrough", False):
            return int(cmd.run_argv(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    return int(args._cmd.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
