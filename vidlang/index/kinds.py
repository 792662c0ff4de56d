"""Index kinds: how each FAISS index is made, trained and tuned (:data:`INDEX_KINDS`, one class per kind).

A kind takes its build parameters as keyword arguments (``vidlang index build --param name=value``), gives the
FAISS factory string for ``n`` vectors of ``dim`` dimensions, how many vectors to train on, and the search-time
parameters it accepts (stored with the index, changeable at load time). Every kind indexes L2-normalised vectors
and reports cosine similarity as the score.

* ``flat`` -- exact inner product over every vector (``IndexFlatIP``): the reference, 4 x dim bytes per vector.
* ``hnsw`` -- a graph (``IndexHNSWFlat``, L2 on normalised vectors): ``m`` links per node, ``ef_construction``
  and ``ef_search`` candidate lists at build / search time. Fast, high recall; full vectors + graph in memory.
* ``ivfpq`` -- an inverted file of ``nlist`` k-means cells (``nprobe`` searched) over 4-bit fast-scan product
  codes (``pq`` sub-quantizers, default one per 8 dimensions: ``pq / 2`` bytes per vector), re-ranked with
  float16 vectors (``refine=fp16``, the best ``k_factor x k`` candidates), with float32 vectors
  (``refine=flat``), or not at all (``refine=none``: the smallest index, the lowest recall).

``auto`` (the default of ``vidlang index build`` and :func:`~vidlang.index.build_index`, :func:`auto_kind`):
``flat`` below :data:`AUTO_FLAT_BELOW` vectors (exact, and a query scans them in a few milliseconds), else
``ivfpq``. The search defaults come from ``vidlang bench index`` on 1M clustered 512-d vectors on 2 cores
(docs/index.md): ``ivfpq`` with ``nprobe=128, k_factor=16`` reached recall@10 0.99 at 1.3 ms per query (p50);
``hnsw`` (``m=32``) 0.96 at 5.3 ms with ``ef_search=512`` (0.74 at the FAISS-usual 64).
"""

from __future__ import annotations

import math
from typing import Any

from vidlang.errors import ConfigError
from vidlang.registry import Registry

INDEX_KINDS: Registry[type[IndexKind]] = Registry("index kind")
AUTO = "auto"
AUTO_FLAT_BELOW = 20_000


def auto_kind(n: int) -> str:
    """The kind ``auto`` stands for with ``n`` vectors: ``flat`` below :data:`AUTO_FLAT_BELOW`, else ``ivfpq``."""
    return "flat" if n < AUTO_FLAT_BELOW else "ivfpq"


class IndexKind:
    """Base class; a subclass sets ``name``, ``metric``, ``search_defaults`` and implements :meth:`factory`."""

    name = ""
    metric = "l2"  # the FAISS metric: "ip" (scores are cosines) or "l2" (squared distances, cos = 1 - d / 2)
    search_defaults: dict[str, int] = {}
    min_vectors = 1

    def params(self) -> dict[str, Any]:
        """The build parameters, resolved (stored in the index's metadata)."""
        return {}

    def factory(self, dim: int, n: int) -> str:
        raise NotImplementedError

    def train_rows(self, n: int) -> int:
        """Vectors to train on (0: no training)."""
        return 0

    def configure(self, index: Any) -> None:
        """Set build-time fields on a fresh index (before training / adding)."""

    def check_size(self, n: int, dim: int) -> None:
        if n < self.min_vectors:
            raise ConfigError(f"index kind {self.name!r} needs at least {self.min_vectors} vectors, got {n}; "
                              "use --kind flat for small collections")

    def search_params(self, **given: Any) -> dict[str, int]:
        """Defaults updated with ``given`` (unknown names and values < 1 raise :class:`ConfigError`)."""
        unknown = sorted(set(given) - set(self.search_defaults))
        if unknown:
            known = ", ".join(self.search_defaults) or "none"
            raise ConfigError(f"index kind {self.name!r} has no search parameter {unknown[0]!r} (it has: {known})")
        out = dict(self.search_defaults)
        for key, value in given.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"search parameter {key} must be an integer >= 1, got {value!r}")
            out[key] = value
        return out

    def apply_search_params(self, index: Any, params: dict[str, int]) -> None:
        """Set ``params`` (from :meth:`search_params`) on a built index."""


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return value


@INDEX_KINDS.register("flat")
class Flat(IndexKind):
    name = "flat"
    metric = "ip"

    def factory(self, dim: int, n: int) -> str:
        return "Flat"


@INDEX_KINDS.register("hnsw")
class HNSW(IndexKind):
    name = "hnsw"
    search_defaults = {"ef_search": 512}

    def __init__(self, m: int = 32, ef_construction: int = 40, ef_search: int = 512) -> None:
        self.m = _positive("m", m)
        self.ef_construction = _positive("ef_construction", ef_construction)
        self.search_defaults = {"ef_search": _positive("ef_search", ef_search)}

    def params(self) -> dict[str, Any]:
        return {"m": self.m, "ef_construction": self.ef_construction}

    def factory(self, dim: int, n: int) -> str:
        return f"HNSW{self.m}"

    def configure(self, index: Any) -> None:
        index.hnsw.efConstruction = self.ef_construction

    def apply_search_params(self, index: Any, params: dict[str, int]) -> None:
        import faiss

        faiss.downcast_index(index).hnsw.efSearch = params["ef_search"]


REFINES = {"fp16": ",Refine(SQfp16)", "flat": ",RFlat", "none": ""}


@INDEX_KINDS.register("ivfpq")
class IVFPQ(IndexKind):
    name = "ivfpq"
    min_vectors = 256

    def __init__(self, nlist: int = 0, pq: int = 0, refine: str = "fp16", nprobe: int = 128, k_factor: int = 16,
                 train_size: int = 0) -> None:
        """``nlist`` 0: chosen from the collection size (:meth:`cells`); ``pq``: sub-quantizers, dividing dim
        (0: one per 8 dimensions, :meth:`subquantizers`); ``train_size`` 0: 64 vectors per cell (at least
        10,000, at most all)."""
        for name, value in (("nlist", nlist), ("pq", pq), ("train_size", train_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0 (0 = automatic), got {value!r}")
        self.nlist, self.pq = nlist, pq
        if refine not in REFINES:
            raise ConfigError(f"refine must be one of {', '.join(REFINES)}, got {refine!r}")
        self.refine = refine
        self.train_size = int(train_size)
        self.search_defaults = {"nprobe": _positive("nprobe", nprobe)}
        if refine != "none":
            self.search_defaults["k_factor"] = _positive("k_factor", k_factor)

    def cells(self, n: int) -> int:
        """``nlist``, or a power of two near ``4 sqrt(n)``, with at least 39 training vectors per cell."""
        if self.nlist:
            return self.nlist
        target = 4 * math.sqrt(n)
        cells = 2 ** round(math.log2(max(target, 1)))
        while cells > 1 and cells * 39 > n:
            cells //= 2
        return cells

    def subquantizers(self, dim: int) -> int:
        """``pq``, or the largest divisor of ``dim`` up to ``dim / 8`` (64 for 512-d: 32 bytes a vector)."""
        return self.pq or max(d for d in range(1, max(dim // 8, 1) + 1) if dim % d == 0)

    def params(self) -> dict[str, Any]:
        return {"nlist": self.nlist, "pq": self.pq, "refine": self.refine, "train_size": self.train_size}

    def check_size(self, n: int, dim: int) -> None:
        super().check_size(n, dim)
        if dim % self.subquantizers(dim):
            raise ConfigError(f"pq={self.pq} sub-quantizers must divide the embedding dim {dim}")
        if self.nlist > n:
            raise ConfigError(f"nlist={self.nlist} cells for {n} vectors: at most one cell per vector")

    def factory(self, dim: int, n: int) -> str:
        return f"IVF{self.cells(n)},PQ{self.subquantizers(dim)}x4fs{REFINES[self.refine]}"

    def train_rows(self, n: int) -> int:
        return min(n, self.train_size or max(10_000, 64 * self.cells(n)))

    def apply_search_params(self, index: Any, params: dict[str, int]) -> None:
        import faiss

        faiss.extract_index_ivf(index).nprobe = params["nprobe"]
        if "k_factor" in params:
            faiss.downcast_index(index).k_factor = float(params["k_factor"])
