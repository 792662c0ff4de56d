"""``vidlang embed``: embeddings of a data config or a folder from any vidlang checkpoint (docs/embeddings.md).

:func:`embed` runs Lightning's predict loop (so ``--trainer.devices`` / ``--trainer.num_nodes`` split the work over
ranks) through :class:`EmbedModule` and :class:`EmbedDataModule`; each rank writes its own Parquet shards
(:mod:`vidlang.embeddings`), a restarted run skips the finished ones (:mod:`vidlang.embed.plan`).
Names are imported on first use.
"""

from __future__ import annotations

from typing import Any

_WHERE = {"embed": "run", "clip_settings": "run", "EmbedModule": "module", "Encoder": "module",
          "load_encoder": "module", "EmbedDataModule": "data", "folder_entries": "data", "config_entries": "data",
          "ShardPlan": "plan", "ShardWriter": "writer", "finish": "writer"}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"vidlang.embed.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'vidlang.embed' has no attribute {name!r}")
