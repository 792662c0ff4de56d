"""Temporal blocks: interchangeable ways of turning per-frame CLIP into a video model."""

from vidlang.models.temporal.base import BLOCKS, build_block
from vidlang.registry import import_submodules

import_submodules(__name__, __path__)  # every block module registers itself in BLOCKS

__all__ = ["BLOCKS", "build_block"]
