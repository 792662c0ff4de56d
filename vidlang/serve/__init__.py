"""Inference and serving: the checkpoint loader (:mod:`vidlang.serve.inference`), the cached video index
(:mod:`vidlang.serve.index`) and ``vidlang serve``, the HTTP API (:mod:`vidlang.serve.app`).

Routes (:data:`vidlang.serve.handlers.ROUTES`): ``GET /health``, ``POST /embed``, ``POST /search``,
``POST /chat``. The HTTP layer is imported on first use (``ServeApp``, ``ServeConfig`` below), so that
``vidlang search`` / ``classify`` load only the inference modules.
"""

from __future__ import annotations

from typing import Any

__all__ = ["HttpError", "ServeApp", "ServeConfig", "confine_path"]
_LAZY = {"ServeApp": "vidlang.serve.app", "ServeConfig": "vidlang.serve.config", "HttpError": "vidlang.serve.limits",
         "confine_path": "vidlang.serve.limits"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vidlang.serve' has no attribute {name!r}")
