"""``vidlang bench NAME``: run a registered benchmark."""

from __future__ import annotations

import argparse

from vidlang.commands import COMMANDS


@COMMANDS.register("bench")
class BenchCommand:
    help = "run a benchmark (decode, loader, model, temporal, ...)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from vidlang.bench import load_all

        sub = parser.add_subparsers(dest="bench", required=True, metavar="NAME")
        for name in load_all():
            bench = load_all().get(name)()
            p = sub.add_parser(name, help=bench.help, description=bench.help)
            bench.add_arguments(p)
            p.set_defaults(_bench=bench)

    def run(self, args: argparse.Namespace) -> int:
        return int(args._bench.run(args) or 0)
