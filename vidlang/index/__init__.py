"""Vector indexes on FAISS over an embeddings folder (:mod:`vidlang.embeddings`): ``vidlang index build``.

:func:`build_index` builds one of the :data:`INDEX_KINDS` (``flat``, ``hnsw``, ``ivfpq``), :func:`load_index`
reads a saved one; a :class:`VectorIndex` searches like the folder index of ``vidlang search`` /
``vidlang serve`` (:class:`vidlang.serve.index.VideoIndex`), which accept either. See docs/index.md.
"""

from __future__ import annotations

from vidlang.index.kinds import INDEX_KINDS, IndexKind
from vidlang.index.vector import (
    ArraySource,
    Hit,
    IndexFormatError,
    VectorIndex,
    build_index,
    is_vector_index,
    load_index,
)

__all__ = ["INDEX_KINDS", "ArraySource", "Hit", "IndexFormatError", "IndexKind", "VectorIndex", "build_index",
           "is_vector_index", "load_index"]
