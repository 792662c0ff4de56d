"""The bad-sample policy: skip, replace, count, report, and stop when too many fail.

* A sample whose decode fails (:class:`VideoDecodeError`, a missing file, an unreadable shard
  member, a window outside the video, or a decode that exceeds ``decode_timeout_s``) is
  **skipped**. In training it is **replaced** by a deterministic different index (map-style
  datasets) or by the next sample of the stream (streaming). In evaluation it is never replaced
  (a stand-in would change the gallery): a map-style dataset returns a :class:`SkippedSample`
  that the collate leaves out of the batch (``batch["skipped"]`` names it; the tasks report how
  many were skipped), a stream goes on with its next sample, which it serves once anyway.
  Nothing is dropped or duplicated silently: every failure is recorded with its epoch, index,
  key, path, reason and replacement (``None`` in evaluation).
* **Reports.** Each process (DataLoader worker or the main process) appends its failures to
  ``{report_dir}/workers/rank{r}-pid{p}.jsonl`` as they happen. At epoch end the main process
  (:class:`BadSampleCallback`, added to the trainer by the DataModule) collects that epoch's
  records into ``{report_dir}/bad_samples.jsonl``, logs the count (``data/bad_samples_{split}``)
  and checks the skip rate ``failures / (served + failures)`` -- for the train, val and test
  splits separately (each record names its split).
* **Threshold.** Above ``max_skip_rate`` (default 0.05) the run stops with
  :class:`BadSampleError` naming the count and example paths. Each worker also checks its own
  running rate after ``min_attempts`` so a broken corpus fails within the first batches, and
  :func:`preflight` checks the first entries before training (a wrong video root fails fast).
* **Never hang.** The decode runs under a SIGALRM timer where possible (the main thread of a
  worker or of the main process); Python cannot interrupt C code, so a backend stuck inside
  FFmpeg is interrupted when it returns to Python; the DataModule's DataLoader ``timeout`` is
  the last guard.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vidlang.config import check_min
from vidlang.errors import ConfigError
from vidlang.io import append_line, append_lines

log = logging.getLogger(__name__)


class BadSampleError(RuntimeError):
    """Too many samples failed to load; the message names the count, the rate and example paths."""


class DecodeTimeout(TimeoutError):
    pass


@dataclass(frozen=True)
class SkippedSample:
    """What an evaluation dataset returns for a sample that failed to load (instead of a replacement).

    The collate (:func:`vidlang.data.collate.collate_samples`) leaves it out of the batch and lists its
    ``key`` in ``batch["skipped"]``; the failure itself is recorded by the dataset's tracker."""

    key: str
    path: str = ""
    reason: str = ""


@dataclass
class BadSamplePolicy:
    """Settings of the policy (module docstring); the ``data.bad_samples`` group of a data config.

    ``report_dir``: where failures are reported (None: records in memory only; the DataModule then picks a
    temporary folder); ``max_skip_rate``: the largest share of failed samples per split and epoch;
    ``max_retries``: replacements tried in a row in training; ``min_attempts``: loads a worker makes before it
    checks its own rate; ``decode_timeout_s``: per-sample decode limit; ``preflight_entries``: entries
    checked before training."""

    report_dir: str | None = None
    max_skip_rate: float = 0.05
    max_retries: int = 10
    min_attempts: int = 64
    decode_timeout_s: float = 60.0
    preflight_entries: int = 64

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_skip_rate <= 1.0:
            raise ConfigError(f"data.bad_samples.max_skip_rate must be in [0, 1], got {self.max_skip_rate}")
        check_min("data.bad_samples", 0, max_retries=self.max_retries, preflight_entries=self.preflight_entries)
        check_min("data.bad_samples", 1, min_attempts=self.min_attempts)


@contextlib.contextmanager
def time_limit(seconds: float | None, what: str) -> Iterator[None]:
    """Raise :class:`DecodeTimeout` if the block runs longer than ``seconds`` (main thread only; else no-op)."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def _raise(signum, frame):
        raise DecodeTimeout(f"{what}: decode exceeded {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class BadSampleTracker:
    """Per-process failure log and running counters (one per DataLoader worker / main process)."""

    def __init__(self, policy: BadSamplePolicy, rank: int = 0, split: str = "train") -> None:
        self.policy, self.rank, self.split = policy, rank, split
        self.attempts: Counter[int] = Counter()  # epoch -> load attempts
        self.failures: list[dict[str, Any]] = []

    def _file(self) -> Path | None:
        if self.policy.report_dir is None:
            return None
        d = Path(self.policy.report_dir) / "workers"
        d.mkdir(parents=True, exist_ok=True)
        return d / f"rank{self.rank}-pid{os.getpid()}.jsonl"  # one file per process (workers included)

    def success(self, epoch: int) -> None:
        self.attempts[epoch] += 1

    def failure(self, epoch: int, index: Any, key: str, path: str, reason: str, replacement: Any = None) -> None:
        """Record one failure (file + log), then apply the worker-local threshold."""
        self.attempts[epoch] += 1
        rec = {"split": self.split, "epoch": epoch, "index": index, "key": key, "path": path, "reason": reason,
               "replacement": replacement, "rank": self.rank, "pid": os.getpid(), "time": time.time()}
        self.failures.append(rec)
        f = self._file()
        if f is not None:
            append_line(f, json.dumps(rec))
        log.warning("skipping bad sample %s (%s): %s", key, path, reason)
        n_fail = sum(1 for r in self.failures if r["epoch"] == epoch)
        n_try = self.attempts[epoch]
        if n_try >= self.policy.min_attempts and n_fail / n_try > self.policy.max_skip_rate:
            raise BadSampleError(_message(n_fail, n_try, [r for r in self.failures if r["epoch"] == epoch],
                                          self.policy, scope="in one loader process"))


def _message(n_fail: int, n_total: int, records: Sequence[dict], policy: BadSamplePolicy, scope: str) -> str:
    examples = "; ".join(f"{r['path']} ({r['reason']})" for r in records[:5])
    report = f" Report: {Path(policy.report_dir) / 'bad_samples.jsonl'}." if policy.report_dir else ""
    return (
        f"{n_fail} of {n_total} samples failed to load {scope} ({n_fail / max(n_total, 1):.1%} > max_skip_rate "
        f"{policy.max_skip_rate:.1%}). Examples: {examples}.{report} Check the video root / paths of the manifest."
    )


def collect_epoch(
    policy: BadSamplePolicy, epoch: int, extra: Sequence[dict] = (), split: str = "train",
    reported: set[tuple[Any, Any]] | None = None, rank: int | None = None,
) -> list[dict]:
    """Gather the failures of ``split`` in ``epoch`` of every process of ``rank`` (None: of every rank) and
    append them to ``bad_samples.jsonl``.

    ``reported``: (pid, time) of records collected before (updated); they are not collected twice
    (e.g. the sanity-check validation and the validation of epoch 0 share the epoch number). Under DDP each
    rank collects its own records (the report directory may be shared): none is written twice, and each
    rank's skip rate compares its own failures with its own served samples.
    """
    seen = reported if reported is not None else set()

    def wanted(rec: dict) -> bool:
        return (rec["epoch"] == epoch and rec.get("split", "train") == split and (rec["pid"], rec["time"]) not in seen
                and (rank is None or rec.get("rank", 0) == rank))

    records: list[dict] = []
    for rec in extra:
        if wanted(rec):
            records.append(rec)
            seen.add((rec["pid"], rec["time"]))
    if policy.report_dir is None:
        return records
    root = Path(policy.report_dir)
    for f in sorted((root / "workers").glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if wanted(rec):
                records.append(rec)
                seen.add((rec["pid"], rec["time"]))
    records.sort(key=lambda r: r["time"])
    root.mkdir(parents=True, exist_ok=True)
    append_lines(root / "bad_samples.jsonl", [json.dumps(r) for r in records])
    return records


def check_rate(policy: BadSamplePolicy, records: Sequence[dict], served: int, scope: str) -> None:
    """Raise :class:`BadSampleError` if failures / (served + failures) exceeds the threshold."""
    n_fail = len(records)
    total = served + n_fail
    if total and n_fail / total > policy.max_skip_rate:
        raise BadSampleError(_message(n_fail, total, records, policy, scope))


def preflight(entries: Sequence[Any], policy: BadSamplePolicy, decode: int = 2, backend: str = "auto") -> None:
    """Before training: the first entries must exist (and the first ``decode`` must open)."""
    from vidlang.data.decoding import VideoDecodeError, open_video

    head = list(entries[: policy.preflight_entries])
    bad = []
    for i, e in enumerate(head):
        try:
            src = e.open_source()
            if i < decode:
                with open_video(src, backend=backend) as reader:
                    _ = reader.metadata
        except (OSError, VideoDecodeError) as err:
            bad.append({"path": e.path, "reason": str(err), "epoch": -1})
    if len(head) and len(bad) / len(head) > policy.max_skip_rate:
        raise BadSampleError(_message(len(bad), len(head), bad, policy, scope="among the first entries (preflight)"))
    for b in bad:
        log.warning("preflight: %s", b["reason"])


def served_count(batch: Any) -> int:
    """Number of videos in a batch dict (``key`` list)."""
    return len(batch["key"]) if isinstance(batch, dict) and "key" in batch else 0


def make_callback(policy: BadSamplePolicy, trackers: Sequence[BadSampleTracker] = ()) -> Any:
    """A Lightning callback that aggregates, reports and checks the failures of each epoch."""
    from pytorch_lightning import Callback

    class BadSampleCallback(Callback):
        """Per stage (train / val / test): count served videos, collect, report and check the failures."""

        def __init__(self) -> None:
            self.policy, self.trackers = policy, trackers
            self.served: Counter[str] = Counter()
            self.reported: set[tuple[Any, Any]] = set()

        def _start(self, stage: str) -> None:
            self.served[stage] = 0

        def _end(self, trainer: Any, pl_module: Any, stage: str) -> None:
            epoch = trainer.current_epoch
            extra = [r for t in self.trackers for r in t.failures]
            rank = trainer.global_rank
            records = collect_epoch(self.policy, epoch, extra, split=stage, reported=self.reported, rank=rank)
            if records:
                log.warning("%s epoch %d rank %d: %d bad samples skipped (report: %s)", stage, epoch, rank,
                            len(records), self.policy.report_dir)
            with contextlib.suppress(Exception):  # summed over ranks
                pl_module.log(f"data/bad_samples_{stage}", float(len(records)), sync_dist=True, reduce_fx="sum")
            check_rate(self.policy, records, self.served[stage], scope=f"in {stage} epoch {epoch}")

        def on_train_epoch_start(self, trainer, pl_module):
            self._start("train")
            dm = getattr(trainer, "datamodule", None)
            if dm is not None and hasattr(dm, "set_epoch"):
                dm.set_epoch(trainer.current_epoch)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.served["train"] += served_count(batch)

        def on_train_epoch_end(self, trainer, pl_module):
            self._end(trainer, pl_module, "train")

        def on_validation_epoch_start(self, trainer, pl_module):
            self._start("val")

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            self.served["val"] += served_count(batch)

        def on_validation_epoch_end(self, trainer, pl_module):
            self._end(trainer, pl_module, "val")

        def on_test_epoch_start(self, trainer, pl_module):
            self._start("test")

        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            self.served["test"] += served_count(batch)

        def on_test_epoch_end(self, trainer, pl_module):
            self._end(trainer, pl_module, "test")

    return BadSampleCallback()
