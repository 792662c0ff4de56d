"""``vidlang demo``: train and evaluate a tiny text-video retrieval model on the synthetic corpus (CPU)."""

from __future__ import annotations

import argparse
from dataclasses import fields

from vidlang.commands import COMMANDS


@COMMANDS.register("demo")
class DemoCommand:
    help = "generate the synthetic corpus, train a tiny retrieval model on the CPU, evaluate it, run a query"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from vidlang.demo import DemoConfig

        for f in fields(DemoConfig):
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                                help=f"(default: {f.default})")  # fmt: skip

    def run(self, args: argparse.Namespace) -> int:
        from vidlang.demo import DemoConfig, run_demo

        cfg = DemoConfig(**{f.name: getattr(args, f.name) for f in fields(DemoConfig)})
        run_demo(cfg)
        return 0
