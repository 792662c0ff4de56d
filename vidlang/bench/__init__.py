"""Benchmarks run by ``vidlang bench NAME``; each prints ratios measured side by side in one run.

Every module here registers a benchmark class in :data:`BENCHMARKS` with ``help``,
``add_arguments(parser)`` and ``run(args) -> int``, like the commands.
"""

from __future__ import annotations

from vidlang.registry import Registry, import_submodules

BENCHMARKS: Registry[type] = Registry("benchmark")


def load_all() -> Registry[type]:
    """Import every module of this package so that its benchmarks register."""
    import_submodules(__name__, __path__)
    return BENCHMARKS
