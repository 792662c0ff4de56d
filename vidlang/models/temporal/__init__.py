"""Temporal blocks: interchangeable ways of turning per-frame CLIP into a video model."""

from vidlang.models.temporal.base import (
    BLOCKS,
    HookContext,
    TemporalBlock,
    TextOutput,
    TowerSpec,
    VideoOutput,
    build_block,
)
from vidlang.registry import import_submodules

import_submodules(__name__, __path__)  # every block module registers itself in BLOCKS

__all__ = ["BLOCKS", "HookContext", "TemporalBlock", "TextOutput", "TowerSpec", "VideoOutput", "build_block"]
