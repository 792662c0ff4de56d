"""``vidlang shards``: any annotation format -> video2dataset-compatible WebDataset shards.

Output: ``{out}/{shard:05d}.tar`` with, per sample, ``{key}.{ext}`` (the video bytes copied
unchanged), ``{key}.txt`` (first caption) and ``{key}.json`` (key, source path, captions,
window, label, label_name, metadata); keys are 9-digit sample numbers. Per shard a
``{shard:05d}_stats.json`` (``count``, ``successes``, ``failed``), and ``stats.json`` +
``classes.txt`` (if the format has class names) for the set. Missing or unreadable videos are
skipped, counted and listed in ``stats.json``.

Example::

    vidlang shards --format webvid --input data/webvid_train.csv --arg video_root=data --out shards/ \\
        --samples-per-shard 1000
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

from vidlang.commands import COMMANDS


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tf.addfile(info, io.BytesIO(data))


def _video_ext(path: str) -> str:
    from vidlang.data.formats.webdataset import VIDEO_EXTS

    ext = path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""
    return ext if ext in VIDEO_EXTS else "mp4"


def write_shards(index: Any, out: str | os.PathLike, samples_per_shard: int = 1000, progress: bool = True) -> dict:
    """Write the entries of a :class:`~vidlang.data.sample.FormatIndex` as shards; return the stats dict."""
    from tqdm import tqdm

    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.tar")):
        raise FileExistsError(f"{out} already holds .tar shards; choose an empty folder")
    stats: dict[str, Any] = {"samples": 0, "failed": 0, "failures": [], "shards": 0}
    shard, in_shard, tf = -1, 0, None
    for entry in tqdm(index.entries, desc="shards", unit="video", disable=not progress):
        try:
            data = entry.open_source()
            data = data if isinstance(data, bytes) else Path(data).read_bytes()
        except OSError as e:
            stats["failed"] += 1
            stats["failures"].append({"path": entry.path, "reason": str(e)})
            continue
        if tf is None or in_shard == samples_per_shard:
            if tf is not None:
                _close_shard(tf, out, shard, in_shard)
            shard, in_shard = shard + 1, 0
            tf = tarfile.open(out / f"{shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT)
        key = f"{stats['samples']:09d}"
        names = index.classes
        meta = {
            "key": key, "source_key": entry.key, "source_path": entry.path, "captions": entry.captions,
            "window": list(entry.window) if entry.window else None, "label": entry.label,
            "label_name": names[entry.label] if names and entry.label is not None else entry.meta.get("label_name"),
            "eval_captions": entry.eval_captions,
            "meta": {k: v for k, v in entry.meta.items() if _jsonable(v)},
        }
        _add_member(tf, f"{key}.{_video_ext(entry.path)}", data)
        _add_member(tf, f"{key}.txt", (entry.captions[0] if entry.captions else "").encode("utf-8"))
        _add_member(tf, f"{key}.json", json.dumps(meta).encode("utf-8"))
        stats["samples"] += 1
        in_shard += 1
    if tf is not None:
        _close_shard(tf, out, shard, in_shard)
    stats["shards"] = shard + 1
    if index.classes:
        (out / "classes.txt").write_text("\n".join(index.classes) + "\n", encoding="utf-8")
    (out / "stats.json").write_text(json.dumps(stats, indent=1), encoding="utf-8")
    return stats


def _close_shard(tf: tarfile.TarFile, out: Path, shard: int, count: int) -> None:
    tf.close()
    stats = {"count": count, "successes": count, "failed_to_download": 0, "failed_to_subsample": 0}
    (out / f"{shard:05d}_stats.json").write_text(json.dumps(stats), encoding="utf-8")


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
