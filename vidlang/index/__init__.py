"""Vector indexes on FAISS over an embeddings folder (:mod:`vidlang.embeddings`): ``vidlang index build``.

:func:`build_index` builds one of the :data:`INDEX_KINDS` (``flat``, ``hnsw``, ``ivfpq``), :func:`load_index`
reads a saved one; a :class:`VectorIndex` searches like the folder index of ``vidlang search`` /
``vidlang serve`` (:class:`vidlang.serve.index.VideoIndex`), which accept either. See docs/index.md.
Names are imported on first use (the CLI reads :data:`INDEX_KINDS` without importing numpy or FAISS).
"""

from __future__ import annotations

from typing import Any

__all__ = ["INDEX_KINDS", "ArraySource", "Hit", "IndexFormatError", "IndexKind", "VectorIndex", "build_index",
           "is_vector_index", "load_index"]
_KINDS = ("INDEX_KINDS", "IndexKind")


def __getattr__(name: str) -> Any:
    if name in __all__:
        import importlib

        module = "vidlang.index.kinds" if name in _KINDS else "vidlang.index.vector"
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'vidlang.index' has no attribute {name!r}")
