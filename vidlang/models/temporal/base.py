"""The registry of temporal blocks (the block contract itself: :mod:`vidlang.models.contract`)."""

from __future__ import annotations

from typing import Any

from vidlang.models.contract import TemporalBlock, TowerSpec
from vidlang.registry import Registry

BLOCKS: Registry[type[TemporalBlock]] = Registry("temporal block")


def build_block(name: str, spec: TowerSpec, **kwargs: Any) -> TemporalBlock:
    return BLOCKS.build(name, spec, **kwargs)


