"""The format-reader registry and the helpers readers share (CSV rows with line numbers, clear errors)."""

from __future__ import annotations

import csv
import json
import os
import re
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


def _undecodable(p: Path) -> FormatError:
    """A FormatError naming the physical line of the first byte that is not UTF-8."""
    data = p.read_bytes()
    try:
        data.decode("utf-8")
        start = 0
    except UnicodeDecodeError as e:
        start = e.start
    line = data[:start].replace(b"\r\n", b"\n").replace(b"\r", b"\n").count(b"\n") + 1
    return FormatError(p, f"not valid UTF-8 (byte {data[start:start + 1]!r} at offset {start})", line=line)


def read_lines(path: str | os.PathLike, what: str) -> Iterator[tuple[int, str]]:
    """``(line_number, line)`` of the non-blank lines of a text file, stripped.

    Lines are the file's physical lines (ended by ``\\n``, ``\\r\\n`` or ``\\r``); unlike ``str.splitlines`` no
    other character (form feed, ``\\x85``, ``\\u2028`` ...) starts a new line, so numbers match an editor's.
    """
    p = existing_file(path, what)
    try:
        with open(p, encoding="utf-8-sig") as f:  # universal newlines: \n, \r\n, \r
            lines = list(f)
    except UnicodeDecodeError:
        raise _undecodable(p) from None
    for n, line in enumerate(lines, 1):
        if line.strip():
            yield n, line.strip()


def read_csv(path: str | os.PathLike, required: tuple[str, ...], what: str = "CSV") -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, row)`` of a CSV with a header (UTF-8, an optional BOM); values are stripped.

    ``line_number`` is the physical line where the record *starts* (a quoted field may hold newlines, so a
    record can span several lines). Blank lines are skipped. A missing column, a row with another number of
    fields than the header, an unterminated quote or other malformed CSV, and bytes that are not UTF-8 raise
    :class:`FormatError` naming the file and that line.
    """
    p = existing_file(path, what)
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, strict=True)
            header: list[str] | None = None
            end = 0  # physical lines consumed so far
            while True:
                start = end + 1
                try:
                    fields = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:
                    reason = "unterminated quoted field" if "unexpected end of data" in str(e) else str(e)
                    raise FormatError(p, f"malformed CSV: {reason}", line=start) from None
                end = reader.line_num
                if not fields or (len(fields) == 1 and not fields[0].strip()):
                    continue  # a blank line
                if header is None:
                    header = [h.strip() for h in fields]
                    missing = [c for c in required if c not in header]
                    if missing:
                        raise FormatError(p, f"missing column(s) {missing}; header is {header}", line=start)
                    continue
                if len(fields) != len(header):
                    raise FormatError(p, f"expected {len(header)} fields (the header's), got {len(fields)}",
                                      line=start)
                yield start, {k: v.strip() for k, v in zip(header, fields, strict=True)}
    except UnicodeDecodeError:
        raise _undecodable(p) from None
    if header is None:
        raise FormatError(p, f"{what} is empty (no header)")


def read_jsonl(path: str | os.PathLike, required: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    p = existing_file(path, "JSONL manifest")
    for n, line in read_lines(p, "JSONL manifest"):
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
        return json.loads(p.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise _undecodable(p) from None
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


_PATH_LABELS = re.compile(r"^(?P<path>.*?\S)(?P<labels>(?:\s+[+-]?\d+)+)$")


def parse_path_labels(
    line: str, path: str | os.PathLike, n: int, delimiter: str | None = None
) -> tuple[str, list[int]]:
    """Split a list-file line ``<video path> <label> [<label> ...]`` into the path and its integer labels.

    Without ``delimiter``, the labels are the trailing whitespace-separated integer tokens and the path is
    everything before them (it may hold spaces): ``my clip.mp4 0 3`` -> ``("my clip.mp4", [0, 3])``. A path
    whose own name ends in `` <int>`` cannot be told apart from a label; a line with several labels after
    a path without a file extension (``clip 12 3``, also the shape of a rawframes list ``dir frames label``)
    is therefore refused as ambiguous. With ``delimiter`` (e.g. ``"\\t"`` or ``","``) the path is everything
    before its first occurrence and the labels follow, separated by the delimiter and/or whitespace.
    Anything else (no label, a label that is not an integer) raises :class:`FormatError` naming the line.
    """
    text = line.strip()
    if delimiter is not None:
        head, sep, rest = text.partition(delimiter)
        tokens = [t for chunk in rest.split(delimiter) for t in chunk.split()]
        if not sep or not head.strip() or not tokens:
            raise FormatError(path, f"expected 'path{delimiter!r}label', got {text!r}", line=n)
        return head.strip(), [parse_int(t, path, n, "label") for t in tokens]
    m = _PATH_LABELS.match(text)
    if m is None:
        raise FormatError(path, f"expected 'path label [label ...]' with integer labels, got {text!r}", line=n)
    rel, labels = m["path"], [int(t) for t in m["labels"].split()]
    if len(labels) > 1 and not Path(rel).suffix:
        raise FormatError(
            path,
            f"ambiguous line {text!r}: {rel!r} has no file extension, so the numbers after it may belong to the "
            "name (or this is a rawframes list: frame folder, frame count, label); set delimiter= to mark where "
            "the labels start",
            line=n,
        )
    return rel, labels


def read_class_names(path: str | os.PathLike) -> list[str]:
    """Class names, one per line: ``name``, or ``index name`` (0- or 1-based, as in UCF101's classInd.txt), or a
    label CSV with the header ``id,name`` (X-CLIP / ViFi-CLIP ``labels/*.csv``; names may be quoted)."""
    p = existing_file(path, "class-name file")
    rows = list(read_lines(p, "class-name file"))
    if not rows:
        raise FormatError(p, "class-name file is empty")
    if rows[0][1].replace(" ", "").lower() == "id,name":
        return _label_csv(p)
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


def _label_csv(p: Path) -> list[str]:
    names: list[str] = []
    first: int | None = None
    for n, row in read_csv(p, ("id", "name"), "label CSV"):
        idx = parse_int(row["id"], p, n, "id")
        first = idx if first is None else first
        if idx != first + len(names) or first not in (0, 1):
            raise FormatError(p, f"class ids must be consecutive from 0 (or 1); expected {first + len(names)}, got "
                              f"{idx}", line=n)
        if not row["name"]:
            raise FormatError(p, "empty class name", line=n)
        names.append(row["name"])
    if not names:
        raise FormatError(p, "label CSV has no class")
    return names


def read_id_list(path: str | os.PathLike, what: str) -> list[tuple[int, str]]:
    """``(line, id)`` of a list file with one video id per line (``train_list.txt``); a repeated id is an error."""
    p = existing_file(path, what)
    seen: dict[str, int] = {}
    out = []
    for n, line in read_lines(p, what):
        if line in seen:
            raise FormatError(p, f"id {line!r} repeats line {seen[line]}", line=n)
        seen[line] = n
        out.append((n, line))
    if not out:
        raise FormatError(p, f"{what} is empty")
    return out


def join_paragraph(sentences: list[str], sep: str = " ") -> str:
    """Paragraph retrieval: a video's sentences joined in the given order, each stripped, blanks dropped (CLIP4Clip
    joins the raw sentences with one space; the tokenizer makes the stripped form identical)."""
    return sep.join(s.strip() for s in sentences if s.strip())


_JSON_WS = re.compile(r"[ \t\n\r]*")


def read_json_items(path: str | os.PathLike, what: str) -> tuple[str, list[tuple[int, Any, Any]]]:
    """The top-level items of a JSON array or object with the line each starts on: ``("list", [(line, i, item)])``
    or ``("dict", [(line, key, value)])``, so that a reader can name ``file:line`` of a bad item. Invalid JSON
    raises :class:`FormatError` at its line; a repeated key of an object is refused (``json.load`` would keep
    the last silently)."""
    p = existing_file(path, what)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise _undecodable(p) from None
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        raise FormatError(p, f"invalid JSON: {e.msg}", line=e.lineno) from None
    dec = json.JSONDecoder()
    pos, line = 0, 1

    def skip(i: int) -> int:
        return _JSON_WS.match(text, i).end()

    def line_at(i: int) -> int:
        nonlocal pos, line
        line += text.count("\n", pos, i)
        pos = i
        return line

    i = skip(0)
    kind = {"[": "list", "{": "dict"}.get(text[i])
    if kind is None:
        raise FormatError(p, f"expected a JSON array or object at the top level of the {what}", line=line_at(i))
    close = "]" if kind == "list" else "}"
    items: list[tuple[int, Any, Any]] = []
    seen: dict[str, int] = {}
    i = skip(i + 1)
    while text[i] != close:
        n = line_at(i)
        if kind == "list":
            value, i = dec.raw_decode(text, i)
            items.append((n, len(items), value))
        else:
            key, i = dec.raw_decode(text, i)
            if key in seen:
                raise FormatError(p, f"key {key!r} repeats line {seen[key]}", line=n)
            seen[key] = n
            value, i = dec.raw_decode(text, skip(skip(i) + 1))  # past the ':'
            items.append((n, key, value))
        i = skip(i)
        if text[i] == ",":
            i = skip(i + 1)
    return kind, items
