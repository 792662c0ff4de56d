"""``vidlang serve``: a small HTTP API for video embeddings, text search over an indexed folder, and chat.

Routes (:data:`vidlang.serve.handlers.ROUTES`): ``GET /health``, ``POST /embed``, ``POST /search``,
``POST /chat``. See :mod:`vidlang.serve.handlers` for the request formats and :mod:`vidlang.serve.app`
for threading, limits and shutdown.
"""

from vidlang.serve.app import ServeApp, ServeConfig
from vidlang.serve.limits import HttpError, confine_path

__all__ = ["HttpError", "ServeApp", "ServeConfig", "confine_path"]
