"""The format-reader registry and the helpers readers share (CSV rows with line numbers, clear errors)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vidlang.data.sample import FormatIndex
from vidlang.registry import Registry

FORMATS: Registry[Callable[..., FormatIndex]] = Registry("dataset format")
"""name -> reader function ``(**format_args) -> FormatIndex``."""


class FormatError(ValueError):
    """Malformed annotation input; the message names the file (and line) and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        self.path, self.line, self.reason = str(path), line, reason
        super().__init__(f"{where}: {reason}")


def build_index(format: str, **kwargs: Any) -> FormatIndex:  # noqa: A002 - config key name
    """Read an annotation set with a registered format, e.g. ``build_index("webvid", csv=..., video_root=...)``."""
    index = FORMATS.build(format, **kwargs)
    if not index.entries:
        raise FormatError(kwargs.get("path") or kwargs.get("csv") or format, "no samples found (empty or all filtered)")
    return index


def existing_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FormatError(p, f"{what} not found")
    return p


def read_csv(path: str | os.PathLike, required: tuple[str, ...], what: str = "CSV") -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, row)`` of a CSV with a header; missing columns or ragged rows raise FormatError."""
    p = existing_file(path, what)
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        missing = [c for c in required if c not in header]
        if missing:
            raise FormatError(p, f"missing column(s) {missing}; header is {header}", line=1)
        for row in reader:
            if None in row or any(v is None for v in row.values()):
                raise FormatError(p, f"expected {len(header)} fields, got a different count", line=reader.line_num)
            yield reader.line_num, {k: v.strip() for k, v in row.items()}


def read_jsonl(path: str | os.PathLike, required: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    p = existing_file(path, "JSONL manifest")
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FormatError(p, f"invalid JSON: {e.msg}", line=n) from None
            if not isinstance(row, dict):
                raise FormatError(p, "each line must be a JSON object", line=n)
            missing = [c for c in required if c not in row]
            if missing:
                raise FormatError(p, f"missing field(s) {missing}", line=n)
            yield n, row


def read_json(path: str | os.PathLike, what: str) -> Any:
    p = existing_file(path, what)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FormatError(p, f"invalid JSON: {e.msg}", line=e.lineno) from None


def parse_float(value: Any, path: str | os.PathLike, line: int | None, column: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise FormatError(path, f"column {column!r}: {value!r} is not a number", line=line) from None


def parse_int(value: Any, path: str | os.PathLike, line: int | None, column: str) -> int:
    try:
        f = float(value)
        if f != int(f):
            raise ValueError
        return int(f)
    except (TypeError, ValueError):
        raise FormatError(path, f"column {column!r}: {value!r} is not an integer", line=line) from None


def read_class_names(path: str | os.PathLike) -> list[str]:
    """Class names, one per line: ``name``, or ``index name`` (0- or 1-based, as in UCF101's classInd.txt)."""
    p = existing_file(path, "class-name file")
    rows = [(n, ln.strip()) for n, ln in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if ln.strip()]
    if not rows:
        raise FormatError(p, "class-name file is empty")
    indexed = [r[1].split(maxsplit=1) for r in rows]
    if all(len(parts) == 2 and parts[0].isdigit() for parts in indexed):
        first = int(indexed[0][0])
        names: list[str] = []
        for (n, _), (idx, name) in zip(rows, indexed, strict=True):
            if int(idx) != first + len(names):
                raise FormatError(p, f"class indices must be consecutive; expected {first + len(names)}", line=n)
            names.append(name.strip())
        return names
    return [r[1] for r in rows]


def resolve(root: str | os.PathLike | None, rel: str, default_root: Path) -> str:
    """``rel`` joined to ``root`` (or to ``default_root``) unless it is absolute."""
    p = Path(rel)
    if p.is_absolute():
        return str(p)
    return str(Path(root) / p if root is not None else default_root / p)
