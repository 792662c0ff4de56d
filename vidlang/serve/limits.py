"""Safety limits of the HTTP API: typed errors, paths confined to an allowed root, deadlines, bounded JSON."""

from __future__ import annotations

import json
import os
import stat
import time
from typing import Any


class HttpError(Exception):
    """An error answered as ``{"error": message, "status": status}`` with that HTTP status."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def confine_path(root: str | None, user_path: Any) -> str:
    """``user_path`` (relative to ``root``, or absolute) -> its real path, which must lie under ``root``.

    Refused: no root configured (403), anything but a non-empty string (400), a ``..`` component (403), a
    path whose real location (symlinks resolved with ``os.path.realpath``) is outside the root (403). A path
    that does not exist is 404; a directory or device is 400.
    """
    if root is None:
        raise HttpError(403, "paths are disabled: the server has no allowed root (start it with --root or --index)")
    if not isinstance(user_path, str) or not user_path.strip():
        raise HttpError(400, "'path' must be a non-empty string")
    if "\x00" in user_path:
        raise HttpError(400, "'path' contains a NUL character")
    if ".." in user_path.replace("\\", "/").split("/"):
        raise HttpError(403, f"path {user_path!r} is refused: '..' components are not allowed")
    root_real = os.path.realpath(root)
    candidate = user_path if os.path.isabs(user_path) else os.path.join(root_real, user_path)
    real = os.path.realpath(candidate)  # both absolute and normalised: a prefix test of whole components suffices
    if real != root_real and not real.startswith(root_real.rstrip("/") + "/"):
        raise HttpError(403, f"path {user_path!r} is outside the allowed root")
    try:
        mode = os.stat(real).st_mode
    except OSError:
        raise HttpError(404, f"path {user_path!r} does not exist under the allowed root") from None
    if not stat.S_ISREG(mode):
        raise HttpError(400, f"path {user_path!r} is not a regular file")
    return real


class Deadline:
    """Seconds left until a fixed moment (``time.monotonic`` based)."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.seconds = seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.end


def parse_json_object(data: bytes, max_depth: int) -> dict[str, Any]:
    """A request body -> a JSON object; 400 for anything else: malformed or non-UTF-8 text, numbers past
    Python's digit limit, nesting deeper than ``max_depth`` (checked after parsing; nesting too deep for the
    parser itself is caught as ``RecursionError``), or a top level that is not an object."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise HttpError(400, f"malformed JSON body: not UTF-8 ({err.reason} at byte {err.start})") from None
    except RecursionError:
        raise HttpError(400, f"malformed JSON body: nested deeper than {max_depth} levels") from None
    except ValueError as err:  # JSONDecodeError, or an integer with more digits than int() accepts
        raise HttpError(400, f"malformed JSON body: {err}") from None
    if not isinstance(obj, dict):
        raise HttpError(400, f"the JSON body must be an object, got {type(obj).__name__}")
    if json_depth(obj, max_depth) > max_depth:
        raise HttpError(400, f"malformed JSON body: nested deeper than {max_depth} levels")
    return obj


def json_depth(obj: Any, stop: int) -> int:
    """Nesting depth of a parsed JSON value (``{}`` and ``{"a": 1}`` are 1, ``{"a": [1]}`` is 2), counted
    without recursion and only up to ``stop + 1``."""
    depth, level = 0, [obj]
    while level:
        depth += 1
        if depth > stop:
            return depth
        nxt: list[Any] = []
        for v in level:
            if isinstance(v, dict):
                nxt.extend(v.values())
            elif isinstance(v, list):
                nxt.extend(v)
        level = [v for v in nxt if isinstance(v, (dict, list))]
    return depth
