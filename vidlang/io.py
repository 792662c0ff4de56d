"""Atomic file writes: every file vidlang writes appears complete under its name, or not at all.

A write goes to a temporary file in the destination's own folder (``.{name}.{host}.{pid}.{random}.tmp``,
a hidden name that no reader of vidlang picks up), is flushed and ``fsync``-ed, renamed over the
destination with :func:`os.replace` (atomic within one filesystem) and the folder is ``fsync``-ed.
An error removes the temporary file and keeps the previous version (or no file) under the name; a
``kill -9`` can leave the temporary file, which the next checkpoint (or index cache, weights file)
written to that folder removes once its process is gone. A full disk (``ENOSPC``, also ``EDQUOT``,
``EFBIG``, ``EROFS``, ``EIO``) raises :class:`DiskWriteError`, whose message is one line naming the file.

Why not Lightning's own "atomic" save: ``TorchCheckpointIO`` writes through an ``fsspec`` transaction
whose temporary file comes from ``tempfile.mkstemp()`` -- in ``$TMPDIR``, not beside the checkpoint.
When ``$TMPDIR`` is another filesystem, the commit's ``shutil.move`` cannot rename and *copies* into
the final name, so a full disk or a kill during that copy leaves a partial ``.ckpt`` under the real
name; nothing is fsync-ed either. :class:`AtomicCheckpointIO` replaces it (:func:`with_atomic_checkpoint_io`).

* :func:`atomic_open` -- ``with atomic_open(path, "w") as f: ...`` (text or binary);
* :func:`atomic_path` -- a temporary path for libraries that want a file name (safetensors, matplotlib, PyAV);
* :func:`atomic_write_bytes` / :func:`atomic_write_text`;
* :func:`append_line` / :func:`append_lines` -- lines appended to a log whole or not at all (JSON-lines reports).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import secrets
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from vidlang.errors import VidlangUserError

__all__ = [
    "AtomicCheckpointIO",  # noqa: F822 - built lazily by __getattr__
    "DiskWriteError",
    "append_line",
    "append_lines",
    "atomic_open",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "with_atomic_checkpoint_io",
]

DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}
_HOST = socket.gethostname().replace(".", "_") or "host"


class DiskWriteError(OSError, VidlangUserError):
    """A file could not be written because of the storage (full disk, quota, read-only); one line (the CLI
    prints it as one, exit 2)."""

    def __init__(self, path: str | os.PathLike, cause: OSError) -> None:
        reason = cause.strerror or str(cause)
        hint = " (free space there or write elsewhere)" if cause.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        super().__init__(cause.errno, f"cannot write {path}: {reason}{hint}; the file was left as it was")
        self.filename = str(path)

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (DataLoader workers, multiprocessing)
        return _rebuild_disk_error, (self.filename, self.errno, self.strerror)


def _rebuild_disk_error(path: str, code: int, message: str) -> DiskWriteError:
    err = DiskWriteError(path, OSError(code, ""))
    err.strerror = message
    return err


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, for a moment, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform / filesystem can fsync a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_stale(folder: Path) -> None:
    """Remove the temporary files in ``folder`` that killed processes of this host left."""
    pattern = re.compile(rf"^\..+\.{re.escape(_HOST)}\.(\d+)\.[0-9a-f]{{8}}\.tmp")
    with contextlib.suppress(OSError):
        for p in folder.iterdir():
            m = pattern.match(p.name)
            if m and not _alive(int(m.group(1))):
                with contextlib.suppress(OSError):
                    p.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_name(path: Path, keep_suffix: bool) -> Path:
    suffix = path.suffix if keep_suffix else ""
    return path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp{suffix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, keep_suffix: bool = True, clean_stale: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on success it is fsync-ed and renamed to ``path``.

    ``keep_suffix``: the temporary name ends with ``path``'s suffix (libraries that infer the
    format from it, e.g. ``savefig``). ``clean_stale``: first remove the temporary files that
    killed processes of this host left in the folder (lists it; for large files such as
    checkpoints). The folder must exist.
    """
    dest = Path(path)
    if clean_stale:
        _remove_stale(dest.parent)
    tmp = _temp_name(dest, keep_suffix)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, dest)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if not isinstance(e, OSError) or isinstance(e, DiskWriteError) or e.errno not in DISK_ERRNOS:
            raise
        raise DiskWriteError(dest, e) from e
    _fsync_dir(dest.parent)


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike, mode: str = "w", encoding: str | None = None, newline: str | None = None,
    clean_stale: bool = False,
) -> Iterator[IO[Any]]:
    """``open(path, mode)`` for writing (``"w"``, ``"wt"``, ``"wb"``); ``path`` is replaced when the block succeeds."""
    if mode not in ("w", "wt", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w', 'wt' or 'wb', not {mode!r}")
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    with atomic_path(path, keep_suffix=False, clean_stale=clean_stale) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, mode, encoding=encoding, newline=newline) as f:
            yield f
            f.flush()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)


def append_line(path: str | os.PathLike, line: str, fsync: bool = True) -> None:
    """Append ``line`` (a newline is added) whole or not at all (see :func:`append_lines`)."""
    append_lines(path, [line], fsync)


def append_lines(path: str | os.PathLike, lines: Iterable[str], fsync: bool = True) -> None:
    """Append ``lines`` (newlines added) in one ``write``; if it fails, the file is cut back to its old end.

    So a JSON-lines log never holds half a record (a full disk raises :class:`DiskWriteError`).
    """
    p = Path(path)
    data = "".join(line.rstrip("\n") + "\n" for line in lines).encode("utf-8")  # none: just create the file
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        raise DiskWriteError(p, e) from e
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)")
            if fsync:
                os.fsync(fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, end)
            if e.errno not in DISK_ERRNOS:
                raise
            raise DiskWriteError(p, e) from e
    finally:
        os.close(fd)


@functools.cache
def _checkpoint_io_class() -> type:
    from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        """Lightning's ``TorchCheckpointIO`` saving local files through :func:`atomic_open` (URLs: fsspec as before)."""

        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
            if storage_options is not None:
                raise TypeError(f"{type(self).__name__} takes no storage_options")
            p = str(path)
            if "://" in p and not p.startswith("file://"):
                return super().save_checkpoint(checkpoint, path)
            import torch

            dest = Path(p.removeprefix("file://"))
            dest.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(dest, "wb", clean_stale=True) as f:
                torch.save(checkpoint, f)
            return None

    AtomicCheckpointIO.__module__, AtomicCheckpointIO.__qualname__ = __name__, "AtomicCheckpointIO"
    return AtomicCheckpointIO


def __getattr__(name: str) -> Any:
    """``AtomicCheckpointIO`` is built on first use, so importing this module does not import Lightning."""
    if name == "AtomicCheckpointIO":
        return _checkpoint_io_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def with_atomic_checkpoint_io(plugins: Any = None, strategy: Any = None) -> list[Any]:
    """Trainer ``plugins`` with an :class:`AtomicCheckpointIO` added unless a checkpoint IO is already chosen."""
    from lightning_fabric.plugins import CheckpointIO

    items = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    chosen = any(isinstance(p, CheckpointIO) for p in items) or getattr(strategy, "_checkpoint_io", None) is not None
    return items if chosen else [*items, _checkpoint_io_class()()]
