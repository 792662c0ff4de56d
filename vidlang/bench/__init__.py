"""Benchmarks run by ``vidlang bench NAME``; each prints ratios measured side by side in one run.

Every module here registers a benchmark class in :data:`BENCHMARKS` with ``help``,
``add_arguments(parser)`` and ``run(args) -> int``, like the commands.
"""

from __future__ import annotations

import importlib
import pkgutil

from vidlang.registry import Registry

BENCHMARKS: Registry[type] = Registry("benchmark")


def load_all() -> Registry[type]:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return BENCHMARKS
