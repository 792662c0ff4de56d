"""Errors that mean "vidlang must refuse what the user gave it", as opposed to a bug in vidlang.

The CLI prints any :class:`VidlangUserError` as one line and exits with status 2 (the traceback only
with ``--debug`` or ``VIDLANG_DEBUG=1``). Raise one only for a mistake in what the user gave (a config
value, a file, a flag), with a message that names the value or file and the reason; anything else is a
bug and keeps its traceback. Subclasses also derive from ``ValueError`` (or ``FileNotFoundError``) where
older callers caught that.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigError",
    "InputNotFoundError",
    "ModelMismatchError",
    "UnknownArchitectureError",
    "UnsafeCheckpointError",
    "VidlangUserError",
]


class VidlangUserError(Exception):
    """A user error: printed as one line, exit 2."""


class UnsafeCheckpointError(VidlangUserError, ValueError):
    """The checkpoint can only be read by unpickling arbitrary objects, i.e. by running code stored in it."""


class UnknownArchitectureError(VidlangUserError, ValueError):
    """The weights do not determine the architecture (e.g. the attention heads); the user has to state it."""


class ConfigError(VidlangUserError, ValueError):
    """A bad configuration or command-line value (names the key and the value)."""


class CheckpointError(VidlangUserError, ValueError):
    """A checkpoint that is unreadable, foreign, or of the wrong kind for the command (names the file)."""


class InputNotFoundError(VidlangUserError, FileNotFoundError):
    """A file or folder the user named (in a flag or a config) does not exist or lacks what it should hold."""


class CheckpointNotFoundError(CheckpointError, InputNotFoundError):
    """A checkpoint path that does not exist."""


class ModelMismatchError(VidlangUserError, ValueError):
    """Embeddings (a vector index) made by one model, searched with another (names both)."""
