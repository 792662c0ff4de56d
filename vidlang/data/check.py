"""``vidlang data check``: is this copy of a dataset the one the published numbers were measured on?

Per split of a data config: the videos the annotations list, how many of those files exist, how many of them
decode (all, or a seeded sample of ``sample`` files), a duration and resolution summary of the decoded ones, and
warnings when the available set differs from the listed one or from the official split (the readers record the
official size, :attr:`~vidlang.data.sample.FormatIndex.official`; a protocol's official size can replace it).

A video counts once however many entries share it (paragraph / moment / window entries). A file "decodes" when
it opens, its metadata reads and its middle frame decodes within ``timeout_s``.
"""

from __future__ import annotations

import os
import random
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vidlang.data.sample import FormatIndex, Official, TarMember
from vidlang.errors import ConfigError

SPLITS = ("train", "val", "test")
EXAMPLES = 5


def data_section(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The ``data`` settings of a parsed YAML config (``data: {train: ..., val: ...}`` or LightningCLI's
    ``data: {class_path: ..., init_args: {...}}``)."""
    data = config.get("data") if isinstance(config, Mapping) else None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: no 'data' section (a data config such as configs/data/msvd.yaml)")
    if "init_args" in data:
        data = data["init_args"] or {}
    return dict(data)


def probe_file(path: str, backend: str = "auto", timeout_s: float = 30.0) -> dict[str, Any]:
    """``{ok, duration, width, height, num_frames}`` or ``{ok: False, reason}`` for one video file."""
    from vidlang.data.badsamples import DecodeTimeout, time_limit
    from vidlang.data.decoding import VideoDecodeError, open_video

    try:
        with time_limit(timeout_s, path), open_video(path, backend) as reader:
            meta = reader.metadata
            if meta.num_frames < 1:
                return {"ok": False, "reason": "no video frame"}
            reader.get_frames([meta.num_frames // 2])
    except (VideoDecodeError, OSError, DecodeTimeout, ValueError, RuntimeError) as e:
        return {"ok": False, "reason": f"{type(e).__name__}: {e}"}
    return {"ok": True, "duration": float(meta.duration), "width": int(meta.width), "height": int(meta.height),
            "num_frames": int(meta.num_frames)}


def _summary(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "mean": statistics.fmean(values),
            "max": max(values)}


def check_index(
    index: FormatIndex,
    sample: int | None = None,
    seed: int = 0,
    backend: str = "auto",
    timeout_s: float = 30.0,
    official: Official | None = None,
) -> dict[str, Any]:
    """The report of one split (module docstring). ``official`` replaces the index's own official size."""
    videos: dict[str, str] = {}  # path -> key of its first entry
    members: set[str] = set()
    for e in index.entries:
        videos.setdefault(e.path, e.key)
        if isinstance(e.source, TarMember):
            members.add(e.path)
    captions = sum(len(e.captions) for e in index.entries)
    found = sorted(p for p in videos if p in members or os.path.exists(p))
    missing = sorted(videos[p] for p in videos if p not in members and not os.path.exists(p))
    files = [p for p in found if p not in members]  # shard members are checked by the shard tools
    checked = files if sample is None or sample >= len(files) else sorted(random.Random(seed).sample(files, sample))
    results = {p: probe_file(p, backend, timeout_s) for p in checked}
    good = [r for r in results.values() if r["ok"]]
    bad = sorted((videos[p], r["reason"]) for p, r in results.items() if not r["ok"])
    report: dict[str, Any] = {
        "description": index.description,
        "listed_videos": len(videos),
        "listed_entries": len(index.entries),
        "captions": captions,
        "found": len(found),
        "missing": len(missing),
        "missing_examples": missing[:EXAMPLES],
        "checked": len(checked),
        "sampled": sample is not None and len(checked) < len(files),
        "decodable": len(good),
        "undecodable": len(bad),
        "undecodable_examples": [{"key": k, "reason": r} for k, r in bad[:EXAMPLES]],
        "duration_s": _summary([r["duration"] for r in good]),
        "resolution": dict(Counter(f"{r['width']}x{r['height']}" for r in good).most_common(EXAMPLES)),
        "official": None,
    }
    ref = official or index.official
    if ref is not None:
        report["official"] = asdict(ref)
    report["warnings"] = _warnings(report, ref, len(files))
    return report


def _warnings(r: dict[str, Any], official: Official | None, files: int) -> list[str]:
    out = []
    if r["missing"]:
        out.append(f"{r['missing']} of {r['listed_videos']} listed videos are missing (e.g. "
                   f"{', '.join(r['missing_examples'])})")
    if r["undecodable"]:
        scope = f"{r['checked']} checked (a sample of {files})" if r["sampled"] else f"{r['checked']} checked"
        out.append(f"{r['undecodable']} of {scope} videos do not decode (e.g. "
                   f"{r['undecodable_examples'][0]['key']}: {r['undecodable_examples'][0]['reason']})")
    available = r["found"] - r["undecodable"] if not r["sampled"] else None
    if official is not None:
        if r["listed_videos"] != official.videos:
            out.append(f"the annotations list {r['listed_videos']} videos, the official {official.name} has "
                       f"{official.videos}: another split or another release")
        if official.captions is not None and r["captions"] != official.captions:
            out.append(f"the annotations hold {r['captions']} captions, the official {official.name} has "
                       f"{official.captions}")
        short = (available if available is not None else r["found"]) != official.videos
        if short and (r["missing"] or r["undecodable"] or r["listed_videos"] != official.videos):
            have = f"{available} available" if available is not None else f"{r['found']} found"
            out.append(f"{have} of the official {official.videos} videos of {official.name}: numbers on this copy "
                       "are not comparable with published ones")
    elif r["missing"] or r["undecodable"]:
        out.append("the available set differs from the listed one: numbers are not comparable with runs on a "
                   "complete copy (no official size recorded for this split)")
    return out


def check_config(
    data: Mapping[str, Any],
    splits: Sequence[str] | None = None,
    sample: int | None = None,
    seed: int = 0,
    backend: str = "auto",
    timeout_s: float = 30.0,
    protocol: str | None = None,
) -> dict[str, Any]:
    """Check every configured split (or ``splits``) of a data section; ``protocol`` names an evaluation protocol
    whose official size applies to the val / test splits."""
    from vidlang.data.formats import build_index

    if sample is not None and sample < 1:
        raise ConfigError(f"--sample must be >= 1, got {sample}")
    official = None
    if protocol is not None:
        from vidlang.eval.protocols import get_protocol

        official = get_protocol(protocol).official
    wanted = list(splits) if splits else [s for s in SPLITS if data.get(s)]
    if not wanted:
        raise ConfigError("data: no split configured (train / val / test)")
    out: dict[str, Any] = {"sample": sample, "seed": seed, "protocol": protocol, "splits": {}}
    for split in wanted:
        spec = data.get(split)
        if not isinstance(spec, Mapping) or "format" not in spec:
            raise ConfigError(f"data.{split}: not configured (a split needs a 'format' key)")
        args = dict(spec)
        index = build_index(args.pop("format"), **args)
        report = check_index(index, sample, seed, backend, timeout_s, official if split != "train" else None)
        report["format"] = spec["format"]
        out["splits"][split] = report
    out["warnings"] = [f"{s}: {w}" for s, r in out["splits"].items() for w in r["warnings"]]
    return out


def format_report(report: dict[str, Any]) -> str:
    """The lines ``vidlang data check`` prints."""
    lines = []
    for split, r in report["splits"].items():
        lines.append(f"{split}: {r['format']} - {r['description']}")
        checked = f"{r['decodable']} of {r['checked']} checked" + (" (seeded sample)" if r["sampled"] else "")
        lines.append(f"  videos: listed {r['listed_videos']} ({r['captions']} captions) | found {r['found']} | "
                     f"decodable {checked}")
        if r["official"]:
            o = r["official"]
            caps = f", {o['captions']} captions" if o["captions"] is not None else ""
            lines.append(f"  official: {o['name']}: {o['videos']} videos{caps}")
        d = r["duration_s"]
        if d:
            res = ", ".join(f"{k} x{v}" for k, v in r["resolution"].items())
            lines.append(f"  duration s: min {d['min']:.2f} median {d['median']:.2f} max {d['max']:.2f} | "
                         f"resolution: {res}")
        lines.extend(f"  WARNING: {w}" for w in r["warnings"])
    if not report["warnings"]:
        lines.append("no warning: the available videos are the listed (and official) ones")
    return "\n".join(lines)


def load_data_config(paths: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """The merged ``data`` section of YAML configs (later files override earlier keys)."""
    import yaml

    merged: dict[str, Any] = {}
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            cfg = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML ({e})") from None
        merged.update(data_section(cfg, str(p)))
    return merged
