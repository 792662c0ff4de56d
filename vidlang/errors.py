"""Errors that are the user's to fix: ``vidlang`` prints their message on one line and exits with status 2.

Raise a :class:`VidlangUserError` (or a subclass) only for a mistake in what the user gave (a config value,
a file, a flag), with a message that names the value or file and the reason. Anything else is a bug and
keeps its traceback. ``vidlang --debug ...`` or ``VIDLANG_DEBUG=1`` shows the traceback of user errors too.
"""

from __future__ import annotations


class VidlangUserError(Exception):
    """A mistake in the user's input; reported as one line, exit status 2."""


class UnsafeCheckpointError(VidlangUserError):
    """The checkpoint needs arbitrary code to load and was refused."""


class ConfigError(VidlangUserError, ValueError):
    """A bad configuration or command-line value (names the key and the value)."""


class CheckpointError(VidlangUserError, ValueError):
    """A checkpoint that is missing, unreadable, or of the wrong kind for the command (names the file)."""


class InputNotFoundError(VidlangUserError, FileNotFoundError):
    """A file or folder the user named (in a flag or a config) does not exist or lacks what it should hold."""


class CheckpointNotFoundError(CheckpointError, InputNotFoundError):
    """A checkpoint path that does not exist."""
