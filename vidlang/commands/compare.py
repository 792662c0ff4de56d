"""``vidlang compare RUN_A RUN_B``: what differs between two runs' ``run_record.json`` and whether it can move the
metrics (:func:`vidlang.eval.run_record.diff_records`).

A RUN is a ``run_record.json`` or the folder holding one. Exit status 0: nothing differs that can move a number;
1: something does (listed first); 2: a record is missing or unreadable.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from vidlang.commands import COMMANDS

WIDTH = 60


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= WIDTH else text[: WIDTH - 3] + "..."


def format_diff(diffs: list[dict[str, Any]], name_a: str, name_b: str, show_informational: bool = True) -> str:
    """The report :class:`CompareCommand` prints (the differences that cannot move a number are only counted
    unless ``show_informational``)."""
    if not diffs:
        return f"{name_a} and {name_b}: the records agree (nothing differs): numbers are comparable"
    moving = [d for d in diffs if d["moves_metrics"]]
    info = [d for d in diffs if not d["moves_metrics"]]
    lines = [f"A = {name_a}", f"B = {name_b}"]
    for title, group, show in (("can move the metrics", moving, True),
                               ("cannot move the metrics", info, show_informational)):
        if not group:
            continue
        lines.append(f"{len(group)} difference(s) that {title}" + (":" if show else " (--all lists them)"))
        if show:
            lines.extend(f"  {d['key']}: A {_short(d['a'])} | B {_short(d['b'])}  ({d['why']})" for d in group)
    lines.append("numbers are NOT comparable without checking the differences above" if moving
                 else "numbers are comparable (only informational differences)")
    return "\n".join(lines)


@COMMANDS.register("compare")
class CompareCommand:
    help = "list what differs between two runs' run_record.json and which differences can move the metrics"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("run_a", metavar="RUN_A", help="a run_record.json or the folder holding it")
        parser.add_argument("run_b", metavar="RUN_B", help="a run_record.json or the folder holding it")
        parser.add_argument("--json", action="store_true", help="print the differences as JSON")
        parser.add_argument("--all", action="store_true",
                            help="also list the differences that cannot move the metrics (default: counted only)")

    def run(self, args: argparse.Namespace) -> int:
        from vidlang.eval.run_record import diff_records, load_record

        a, b = load_record(args.run_a), load_record(args.run_b)
        diffs = diff_records(a, b)
        if args.json:
            print(json.dumps(diffs, indent=2, default=str))
        else:
            print(format_diff(diffs, args.run_a, args.run_b, show_informational=args.all))
        return 1 if any(d["moves_metrics"] for d in diffs) else 0
