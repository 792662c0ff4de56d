"""Temporal blocks: interchangeable ways of turning per-frame CLIP into a video model."""

import importlib
import pkgutil

from vidlang.models.temporal.base import BLOCKS, build_block

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["BLOCKS", "build_block"]
