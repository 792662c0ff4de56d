"""The registry of temporal blocks (the block contract itself: :mod:`vidlang.models.contract`)."""

from __future__ import annotations

from typing import Any

from vidlang.errors import ConfigError
from vidlang.models.contract import TemporalBlock, TowerSpec
from vidlang.registry import Registry

BLOCKS: Registry[type[TemporalBlock]] = Registry("temporal block")


def build_block(name: str, spec: TowerSpec, **kwargs: Any) -> TemporalBlock:
    """The block ``name`` built for ``spec``; a :class:`ConfigError` if it cannot run on the spec's image tower."""
    block = BLOCKS.build(name, spec, **kwargs)
    try:
        block.check_tower(spec)
    except ConfigError as err:
        raise ConfigError(f"temporal block {name!r} {err}") from None
    return block


