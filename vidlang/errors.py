"""Errors that mean "vidlang must refuse what the user gave it", as opposed to a bug in vidlang.

The CLI prints any :class:`VidlangUserError` as one line and exits with status 2 (the traceback only
with ``--debug`` or ``VIDLANG_DEBUG=1``). Subclasses also derive from ``ValueError`` where older
callers caught that.
"""

from __future__ import annotations

__all__ = ["UnknownArchitectureError", "UnsafeCheckpointError", "VidlangUserError"]


class VidlangUserError(Exception):
    """A user error: printed as one line, exit 2."""


class UnsafeCheckpointError(VidlangUserError, ValueError):
    """The checkpoint can only be read by unpickling arbitrary objects, i.e. by running code stored in it."""


class UnknownArchitectureError(VidlangUserError, ValueError):
    """The weights do not determine the architecture (e.g. the attention heads); the user has to state it."""
