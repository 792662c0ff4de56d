"""``vidlang shards``: any annotation format -> video2dataset-compatible WebDataset shards.

Output: ``{out}/{shard:05d}.tar`` with, per sample, ``{key}.{ext}`` (the video bytes copied
unchanged), ``{key}.txt`` (first caption) and ``{key}.json`` (key, source path, captions,
window, label, label_name, metadata); keys are 9-digit sample numbers. Per shard a
``{shard:05d}_stats.json`` (``count``, ``successes``, ``failed``), and ``stats.json`` +
``classes.txt`` (if the format has class names) for the set. Missing or unreadable videos are
skipped, counted and listed in ``stats.json``. Each file is written atomically (:mod:`vidlang.io`).

Example::

    vidlang shards --format webvid --input data/webvid_train.csv --arg video_root=data --out shards/ \\
        --samples-per-shard 1000
"""

from __future__ import annotations

import argparse
import inspect
import io
import itertools
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vidlang.commands import COMMANDS
from vidlang.io import atomic_open, atomic_write_text


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tf.addfile(info, io.BytesIO(data))


def _video_ext(path: str) -> str:
    from vidlang.data.formats.webdataset import VIDEO_EXTS

    ext = path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""
    return ext if ext in VIDEO_EXTS else "mp4"


def write_shards(index: Any, out: str | os.PathLike, samples_per_shard: int = 1000, progress: bool = True) -> dict:
    """Write the entries of a :class:`~vidlang.data.sample.FormatIndex` as shards; return the stats dict.

    Every file is written atomically (:mod:`vidlang.io`): an interrupted run leaves complete
    shards (each with its ``_stats.json``) and no partial one under a ``.tar`` name.
    """
    from vidlang.progress import progress as tqdm  # a live bar on a terminal, lines in a log

    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("[!.]*.tar")):
        raise FileExistsError(f"{out} already holds .tar shards; choose an empty folder")
    stats: dict[str, Any] = {"samples": 0, "failed": 0, "failures": [], "shards": 0}

    def readable() -> Iterator[tuple[Any, bytes]]:
        for entry in tqdm(index.entries, desc="shards", unit="video", disable=not progress):
            try:
                data = entry.open_source()
                yield entry, data if isinstance(data, bytes) else Path(data).read_bytes()
            except OSError as e:
                stats["failed"] += 1
                stats["failures"].append({"path": entry.path, "reason": str(e)})

    samples = readable()
    while chunk := list(itertools.islice(samples, samples_per_shard)):
        shard = stats["shards"]
        with atomic_open(out / f"{shard:05d}.tar", "wb") as f, \
                tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for entry, data in chunk:
                _add_sample(tf, f"{stats['samples']:09d}", entry, data, index.classes)
                stats["samples"] += 1
        counts = {"count": len(chunk), "successes": len(chunk), "failed_to_download": 0, "failed_to_subsample": 0}
        atomic_write_text(out / f"{shard:05d}_stats.json", json.dumps(counts))
        stats["shards"] += 1
    if index.classes:
        atomic_write_text(out / "classes.txt", "\n".join(index.classes) + "\n")
    atomic_write_text(out / "stats.json", json.dumps(stats, indent=1))
    return stats


def _label_name(entry: Any, names: list[str] | None) -> str | list[str] | None:
    """The class name(s) of an entry's label (a list for multi-label entries)."""
    if not names or entry.label is None:
        return entry.meta.get("label_name")
    if isinstance(entry.label, (tuple, list)):
        return [names[i] for i in entry.label]
    return names[entry.label]


def _add_sample(tf: tarfile.TarFile, key: str, entry: Any, data: bytes, names: list[str] | None) -> None:
    meta = {
        "key": key, "source_key": entry.key, "source_path": entry.path, "captions": entry.captions,
        "window": list(entry.window) if entry.window else None, "label": entry.label,
        "label_name": _label_name(entry, names),
        "eval_captions": entry.eval_captions,
        "meta": {k: v for k, v in entry.meta.items() if _jsonable(v)},
    }
    _add_member(tf, f"{key}.{_video_ext(entry.path)}", data)
    _add_member(tf, f"{key}.txt", (entry.captions[0] if entry.captions else "").encode("utf-8"))
    _add_member(tf, f"{key}.json", json.dumps(meta).encode("utf-8"))


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
    except (TypeError, ValueError):
        return False
    return True


def _parse_args(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep or not k:
            raise SystemExit(f"--arg expects KEY=VALUE, got {p!r}")
        out[k] = int(v) if v.lstrip("-").isdigit() else v
    return out


@COMMANDS.register("shards")
class ShardsCommand:
    help = "convert a dataset (any registered format) into video2dataset-compatible WebDataset shards"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--format", required=True, help="annotation format (manifest, webvid, kinetics, ...)")
        parser.add_argument("--input", required=True, help="the format's main annotation file (its first argument)")
        parser.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                            help="further format arguments, e.g. video_root=DIR, split=train (repeatable)")
        parser.add_argument("--out", required=True, help="output folder for {shard:05d}.tar")
        parser.add_argument("--samples-per-shard", type=int, default=1000)

    def run(self, args: argparse.Namespace) -> int:
        from vidlang.data.formats import FORMATS

        reader = FORMATS.get(args.format)
        first = next(iter(inspect.signature(reader).parameters))
        index = reader(**{first: args.input, **_parse_args(args.arg)})
        stats = write_shards(index, args.out, args.samples_per_shard)
        print(f"wrote {stats['samples']} samples in {stats['shards']} shards to {args.out}; "
              f"{stats['failed']} videos could not be read (listed in {Path(args.out) / 'stats.json'})")
        return 0 if stats["samples"] else 1
