"""``vidlang data check --config CONFIG``: listed vs found vs decodable videos per split, a duration / resolution
summary and warnings when this copy differs from the official split (:mod:`vidlang.data.check`); the JSON report
is written atomically (``--out``)."""

from __future__ import annotations

import argparse
import json

from vidlang.commands import COMMANDS


@COMMANDS.register("data")
class DataCommand:
    help = "dataset tools: 'check' compares a copy of a dataset with the split papers report"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
        check = sub.add_parser("check", help="per split: videos listed / found / decodable, durations, resolutions, "
                                             "differences from the official split")
        check.add_argument("--config", action="append", required=True, metavar="YAML",
                           help="a config with a data section (repeat to merge; later files win)")
        check.add_argument("--split", action="append", choices=["train", "val", "test"],
                           help="check only this split (repeatable; default: every configured split)")
        check.add_argument("--sample", type=int, default=None, metavar="N",
                           help="decode a seeded sample of N found videos per split instead of all")
        check.add_argument("--seed", type=int, default=0, help="seed of --sample (default 0)")
        check.add_argument("--protocol", default=None,
                           help="an evaluation protocol (e.g. msvd) whose official size applies to val / test")
        check.add_argument("--backend", default="auto", help="decoding backend (default auto)")
        check.add_argument("--timeout", type=float, default=30.0, help="seconds per video (default 30)")
        check.add_argument("--out", default="data_check.json", help="JSON report (default data_check.json)")
        check.add_argument("--strict", action="store_true", help="exit 1 when there is a warning")

    def run(self, args: argparse.Namespace) -> int:
        from vidlang.data.check import check_config, format_report, load_data_config
        from vidlang.io import atomic_write_text

        data = load_data_config(args.config)
        report = check_config(data, args.split, args.sample, args.seed, args.backend, args.timeout, args.protocol)
        report["config"] = list(args.config)
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
        print(format_report(report))
        print(f"report: {args.out}")
        return 1 if args.strict and report["warnings"] else 0
