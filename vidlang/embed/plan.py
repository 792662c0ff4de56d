"""The work plan of ``vidlang embed``: entries -> fixed shards, the run's identity, and which shards are done.

Entry ``i`` of the data (in the order the format reader gives) belongs to shard ``i // shard_size``; shard ``j``
is the file ``part-<j>.parquet`` of the output folder. The plan does not depend on the number of ranks, so a
run restarted on another number of GPUs or nodes continues the same folder. A shard file exists only when it
is complete (written atomically), so "done" is "its file is there"; a rank killed mid-shard leaves nothing
of it but a temporary file, and the shard is redone.

``run.json`` (written once, by rank 0, before any shard) holds the run's identity: the checkpoint's SHA-256,
the data (a hash of every entry's key and path, and the count), the shard size, dtype, columns and the
clip protocol. A restart into a folder whose ``run.json`` differs is refused, so shards of two runs never mix.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vidlang.errors import ConfigError

RUN_FILE = "run.json"
SHARD_PATTERN = "part-{:06d}.parquet"


@dataclass(frozen=True)
class ShardPlan:
    """``count`` entries in shards of ``shard_size`` (the last one shorter)."""

    count: int
    shard_size: int

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ConfigError(f"shard_size must be >= 1, got {self.shard_size}")

    @property
    def num_shards(self) -> int:
        return math.ceil(self.count / self.shard_size)

    def bounds(self, shard: int) -> tuple[int, int]:
        """Entries ``[lo, hi)`` of ``shard``."""
        lo = shard * self.shard_size
        return lo, min(lo + self.shard_size, self.count)

    def shard_of(self, entry: int) -> int:
        return entry // self.shard_size

    @staticmethod
    def name(shard: int) -> str:
        return SHARD_PATTERN.format(shard)

    def finished(self, folder: str | os.PathLike) -> list[int]:
        """Shards whose file exists in ``folder``."""
        base = Path(folder)
        return [j for j in range(self.num_shards) if (base / self.name(j)).is_file()]

    def pending(self, folder: str | os.PathLike) -> list[int]:
        done = set(self.finished(folder))
        return [j for j in range(self.num_shards) if j not in done]

    @staticmethod
    def split(shards: Sequence[int], rank: int, world_size: int) -> list[int]:
        """This rank's share of ``shards`` (round robin: equal work when shards are equal)."""
        return list(shards[rank::world_size])

    def batches(self, shards: Sequence[int], batch_size: int) -> list[list[int]]:
        """Entry indices in batches of at most ``batch_size``, never across two shards (a shard's batches are
        then the same whichever rank or run embeds it)."""
        out: list[list[int]] = []
        for j in shards:
            lo, hi = self.bounds(j)
            out.extend(list(range(s, min(s + batch_size, hi))) for s in range(lo, hi, batch_size))
        return out


def unique_ids(keys: Sequence[str]) -> list[str]:
    """The entries' keys as ids; a key that repeats (clips of one video) gets ``#<n>`` from its 2nd occurrence."""
    seen: dict[str, int] = {}
    out = []
    for k in keys:
        n = seen.get(k, 0)
        seen[k] = n + 1
        out.append(k if n == 0 else f"{k}#{n}")
    if len(set(out)) != len(out):  # "a#1" was itself a key: number every occurrence
        out = [f"{k}#{i}" for i, k in enumerate(keys)]
    return out


def data_fingerprint(keys: Sequence[str], paths: Sequence[str]) -> str:
    """SHA-256 over the entries' keys and paths, in order."""
    h = hashlib.sha256()
    for k, p in zip(keys, paths, strict=True):
        h.update(k.encode("utf-8", "surrogateescape") + b"\0" + p.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


def check_run(folder: str | os.PathLike, run: dict[str, Any]) -> bool:
    """Write ``run.json`` into ``folder`` (creating it), or check the one there equals ``run``; returns whether the
    folder already held this run. A different run raises :class:`ConfigError` naming what differs."""
    from vidlang.io import atomic_write_text

    base = Path(folder)
    path = base / RUN_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: unreadable ({err}); remove the folder or choose another --out") from None
        if old == run:
            return True
        diff = sorted(k for k in set(old) | set(run) if old.get(k) != run.get(k))
        raise ConfigError(f"{base}: holds another embedding run (its {RUN_FILE} differs in {', '.join(diff)}); "
                          "choose another --out, or remove the folder to start over")
    if base.exists() and any(p.suffix == ".parquet" for p in base.iterdir()):
        raise ConfigError(f"{base}: holds Parquet files but no {RUN_FILE}: not a vidlang embed run folder")
    base.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(run, indent=1, sort_keys=True) + "\n")
    return False
