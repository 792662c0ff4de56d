"""Safety limits of the HTTP API: typed errors, paths confined to an allowed root, deadlines for work."""

from __future__ import annotations

import concurrent.futures as cf
import os
import time
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any, TypeVar

T = TypeVar("T")


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
    if ".." in PurePosixPath(user_path.replace("\\", "/")).parts:
        raise HttpError(403, f"path {user_path!r} is refused: '..' components are not allowed")
    root_real = os.path.realpath(root)
    candidate = user_path if os.path.isabs(user_path) else os.path.join(root_real, user_path)
    real = os.path.realpath(candidate)
    if os.path.commonpath([root_real, real]) != root_real:
        raise HttpError(403, f"path {user_path!r} is outside the allowed root")
    if not os.path.exists(real):
        raise HttpError(404, f"path {user_path!r} does not exist under the allowed root")
    if not os.path.isfile(real):
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


def run_with_deadline(executor: cf.Executor, deadline: Deadline, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` on ``executor``; 504 when it has not finished by ``deadline``.

    A job that overruns keeps running in its worker thread (Python cannot kill threads) but its result is
    dropped; a job still queued is cancelled. The server itself is unaffected.
    """
    try:
        future = executor.submit(fn, *args)
    except RuntimeError as err:  # executor shut down
        raise HttpError(503, "the server is shutting down") from err
    try:
        return future.result(timeout=deadline.left())
    except cf.TimeoutError:
        future.cancel()
        raise HttpError(504, f"the request did not finish within the {deadline.seconds:g} s limit") from None
