"""``run_record.json``: what a number was measured on, written beside the metrics by every fit / validate / test.

The record (version :data:`RECORD_VERSION`)::

    software   vidlang version, git commit and dirty flag of the checkout, Python, torch, Lightning, torchcodec,
               PyAV and the FFmpeg libraries each one loads, CUDA / cuDNN and the GPUs
    run        command (fit / validate / test), world size, nodes, precision, seed (the global seed and the data
               seed), global batch (train: batch x world size x gradient accumulation; eval: eval batch x world
               size), checkpoint evaluated
    model      the LightningModule's class, its hyper-parameters and their hash
    protocol   name and hash of the evaluation protocol (:mod:`vidlang.eval.protocols`), if any, and where the
               data's evaluation sampling departs from it
    data       the data settings (sampling, transform, decode, loader), and per split: format and description,
               the official size, a hash of the index (keys, captions, windows, labels: not where the files are),
               missing videos (files absent when the record is written) and bad videos (skipped in that
               evaluation, or reported by the bad-sample policy in training) as a count, a hash of their sorted
               keys and a few examples, the frame sampler with a fingerprint of the indices it chooses on fixed
               timelines, and (evaluation) a hash of the frame indices actually decoded, per video key

The file is written atomically (:mod:`vidlang.io`) by rank 0 into the folder the tasks write their metrics to
(checkpoint folder > logger folder > ``default_root_dir``); each record is also appended to
``run_record_history.jsonl``. ``vidlang compare RUN_A RUN_B`` (:mod:`vidlang.commands.compare`) lists what
differs and which differences can move the metrics (:func:`diff_records`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

RECORD_NAME = "run_record.json"
HISTORY_NAME = "run_record_history.jsonl"
RECORD_VERSION = 1
EXAMPLES = 5
EVAL_SPLITS = {"validate": ("val",), "test": ("test",), "fit": ("val",)}


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


# ---------------------------------------------------------------- software


def git_state(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """``{commit, dirty}`` of the git checkout holding ``path`` (default: the vidlang package); Nones outside git.
    ``dirty``: tracked files differ from the commit (untracked files do not count)."""
    import vidlang

    where = Path(path) if path is not None else Path(vidlang.__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}


def _version(module: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def software_versions() -> dict[str, Any]:
    """The versions that can change a number (module docstring); a library that is not installed is None."""
    import torch

    import vidlang

    out: dict[str, Any] = {"vidlang": vidlang.__version__, **{f"git_{k}": v for k, v in git_state().items()},
                           "python": platform.python_version(), "torch": torch.__version__,
                           "pytorch_lightning": _version("pytorch-lightning") or _version("lightning"),
                           "torchcodec": _version("torchcodec"), "av": _version("av"), "decord": _version("decord")}
    try:  # the FFmpeg that torchcodec loaded (it may differ from PyAV's and from the ffmpeg CLI)
        from torchcodec._core import get_ffmpeg_library_versions

        out["ffmpeg_torchcodec"] = get_ffmpeg_library_versions().get("ffmpeg_version")
    except Exception:  # not installed, or its FFmpeg libraries cannot load
        out["ffmpeg_torchcodec"] = None
    try:
        import av

        out["ffmpeg_pyav"] = ".".join(map(str, av.library_versions.get("libavcodec", ()))) or None
    except Exception:
        out["ffmpeg_pyav"] = None
    out["cuda"] = torch.version.cuda
    out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    out["gpus"] = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                   if torch.cuda.is_available() else [])
    return out


# ---------------------------------------------------------------- data


def keys_digest(keys: Iterable[str]) -> dict[str, Any]:
    """``{count, hash, examples}`` of a set of video keys (sorted, each once; hash None when empty)."""
    unique = sorted(set(keys))
    return {"count": len(unique), "hash": sha("\n".join(unique)) if unique else None, "examples": unique[:EXAMPLES]}


def index_fingerprint(entries: Sequence[Any]) -> dict[str, Any]:
    """``{hash, entries, videos, captions}`` of index entries: the hash covers each entry's key, captions, window
    and label (sorted by key), not the paths, so that copies of a dataset in other folders agree."""
    rows = sorted(canonical([e.key, list(e.captions), list(e.window) if e.window else None,
                             list(e.label) if isinstance(e.label, tuple) else e.label]) for e in entries)
    return {"hash": sha("\n".join(rows)), "entries": len(entries), "videos": len({e.path for e in entries}),
            "captions": sum(len(e.captions) for e in entries)}


def missing_files(entries: Sequence[Any]) -> list[str]:
    """Keys of the entries whose local video file does not exist (shard members are not checked here)."""
    from vidlang.data.sample import TarMember

    return [e.key for e in entries if not isinstance(e.source, TarMember) and not os.path.exists(e.source)]


TIMELINES = (  # (frames, fps, irregular): fixed timelines a sampler fingerprint is taken on
    (12, 25.0, False), (75, 25.0, False), (300, 29.97, False), (1800, 30.0, False), (9000, 25.0, False),
    (40, 10.0, True),
)


def sampler_fingerprint(sampler: Any, training: bool) -> dict[str, Any]:
    """``{repr, hash}``: the sampler's settings and a hash of the frame indices it picks on :data:`TIMELINES`
    (training: with a generator seeded 0), so that two runs whose samplers pick other frames differ even when
    their settings read alike."""
    import torch

    parts = []
    for n, fps, irregular in TIMELINES:
        ts = torch.arange(n, dtype=torch.float64) / fps
        if irregular:
            ts = ts + 0.3 * (torch.arange(n) % 3 == 1)
        g = torch.Generator().manual_seed(0) if training else None
        idx, mask = sampler.sample_indices(ts, n / fps + (0.3 if irregular else 0.0), training=training, generator=g)
        parts.append(canonical([idx.tolist(), None if mask is None else mask.tolist()]))
    return {"repr": repr(sampler), "hash": sha("\n".join(parts))}


def frame_indices_digest(pairs: Iterable[tuple[str, list]]) -> dict[str, Any]:
    """``{videos, hash}`` of ``(key, frame indices)`` pairs decoded in an evaluation (each key once)."""
    table = dict(pairs)
    rows = [canonical([k, table[k]]) for k in sorted(table)]
    return {"videos": len(table), "hash": sha("\n".join(rows)) if rows else None}


def _plain(obj: Any) -> Any:
    if is_dataclass(obj):
        return json.loads(json.dumps(asdict(obj), default=str))
    return obj


def _bad_reported(report_dir: str | None, split: str) -> list[str]:
    """Keys of the bad samples the bad-sample policy reported for ``split`` (``bad_samples.jsonl``)."""
    if not report_dir:
        return []
    f = Path(report_dir) / "bad_samples.jsonl"
    if not f.is_file():
        return []
    keys = []
    for line in f.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("split", "train") == split:
            keys.append(str(rec.get("key")))
    return keys


def data_section(datamodule: Any, splits: Sequence[str], check_missing: bool = True) -> dict[str, Any]:
    """The ``data`` part of a record for a :class:`~vidlang.data.datamodule.VideoDataModule` (module docstring),
    without the evaluation's own bad videos and frame indices (the callback adds those)."""
    out: dict[str, Any] = {}
    settings = {g: _plain(getattr(datamodule, g)) for g in ("sampling", "transform", "decode", "loader")
                if hasattr(datamodule, g)}
    out["settings"] = settings
    out["seed"] = getattr(datamodule, "seed", None)
    indices = getattr(datamodule, "indices", {}) or {}
    specs = getattr(datamodule, "splits", {}) or {}
    for split in splits:
        spec = specs.get(split)
        if spec is None:
            continue
        sec: dict[str, Any] = {"format": spec.get("format")}
        index = indices.get(split)
        if index is not None:
            sec["description"] = index.description
            sec["official"] = None if index.official is None else asdict(index.official)
            sec["index"] = index_fingerprint(index.entries)
            if check_missing:
                sec["missing"] = keys_digest(missing_files(index.entries))
        sampling = getattr(datamodule, "sampling", None)
        if sampling is not None:
            sec["sampler"] = sampler_fingerprint(sampling.build(split == "train"), split == "train")
        if split == "train":
            report = getattr(getattr(datamodule, "bad_samples", None), "report_dir", None)
            sec["bad"] = keys_digest(_bad_reported(report, "train"))
        out[split] = sec
    return out


# ---------------------------------------------------------------- the record


def report_dir(trainer: Any) -> Path:
    """Where the tasks write metrics: checkpoint folder > logger folder > ``default_root_dir`` (call on every
    rank: ``trainer.log_dir`` is a collective)."""
    ckpt = getattr(trainer, "checkpoint_callback", None)
    if ckpt is not None and getattr(ckpt, "dirpath", None):
        return Path(ckpt.dirpath)
    return Path(trainer.log_dir or trainer.default_root_dir)


def run_section(trainer: Any, datamodule: Any, command: str) -> dict[str, Any]:
    world = int(getattr(trainer, "world_size", 1) or 1)
    accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
    loader = getattr(datamodule, "loader", None)
    seed = os.environ.get("PL_GLOBAL_SEED")
    out = {"command": command, "world_size": world, "num_nodes": int(getattr(trainer, "num_nodes", 1) or 1),
           "precision": str(getattr(trainer, "precision", None)), "seed": None if seed is None else int(seed),
           "checkpoint": getattr(trainer, "ckpt_path", None), "accumulate_grad_batches": accumulate}
    if loader is not None:
        out["global_batch"] = {"eval": loader.batch(False) * world}
        if command == "fit":
            out["global_batch"]["train"] = loader.batch(True) * world * accumulate
    return out


def model_section(pl_module: Any) -> dict[str, Any]:
    """The module's class, its hyper-parameters (plain JSON, so that ``compare`` names the one that differs) and
    their hash."""
    hp = json.loads(canonical(dict(getattr(pl_module, "hparams", {}) or {})))
    return {"class": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}", "hparams": hp,
            "hparams_hash": sha(canonical(hp)) if hp else None}


def protocol_section(protocol: str | None, datamodule: Any = None) -> dict[str, Any] | None:
    """``{name, hash, sampling_differences}``: the protocol and where the data's evaluation sampling departs from
    the protocol's (:meth:`~vidlang.eval.protocols.EvalProtocol.check_sampling`; empty: it follows it)."""
    if protocol is None:
        return None
    from vidlang.eval.protocols import get_protocol

    p = get_protocol(protocol)
    out: dict[str, Any] = {"name": p.name, "hash": p.hash}
    sampling = getattr(datamodule, "sampling", None)
    if sampling is not None:
        out["sampling_differences"] = p.check_sampling(sampling, getattr(datamodule, "transform", None))
    return out


def write_record(folder: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write ``run_record.json`` atomically in ``folder`` and append it to the history; returns the path."""
    from vidlang.io import append_line, atomic_write_text

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RECORD_NAME
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    append_line(out / HISTORY_NAME, json.dumps(record, sort_keys=True, default=str))
    return path


def load_record(path: str | os.PathLike) -> dict[str, Any]:
    """A record from its file or from the folder holding ``run_record.json`` (a user error if neither)."""
    from vidlang.errors import InputNotFoundError

    p = Path(path)
    if p.is_dir():
        p = p / RECORD_NAME
    if not p.is_file():
        raise InputNotFoundError(f"{path}: no {RECORD_NAME} there (a run of fit / validate / test writes one)")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        from vidlang.errors import ConfigError

        raise ConfigError(f"{p}:{e.lineno}: not a run record (invalid JSON: {e.msg})") from None


def make_callback(protocol: str | None = None, check_missing: bool = True) -> Any:
    """The Lightning callback that writes the record (:class:`RunRecordCallback`)."""
    return _callback_class()(protocol=protocol, check_missing=check_missing)


def __getattr__(name: str) -> Any:
    """``RunRecordCallback`` is built on first use, so that ``vidlang compare`` does not import Lightning."""
    if name == "RunRecordCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _callback_class() -> type:
    from pytorch_lightning import Callback

    class RunRecordCallback(_RecordHooks, Callback):  # the hooks before Callback's no-ops
        """Writes ``run_record.json`` at the end of every fit / validate / test (module docstring).

        Register it on the Trainer (``trainer.callbacks``); ``protocol`` names the evaluation protocol (else the
        module's ``hparams["protocol"]`` when it has one). Evaluation batches give the frame indices (``batch
        ["frame_indices"]``) and the skipped keys (``batch["skipped"]``); the sanity check is ignored. Every rank
        must run the hooks (the record gathers the ranks' keys); rank 0 writes.
        """

        def __init__(self, protocol: str | None = None, check_missing: bool = True) -> None:
            Callback.__init__(self)
            _RecordHooks.__init__(self, protocol, check_missing)

    RunRecordCallback.__module__, RunRecordCallback.__qualname__ = __name__, "RunRecordCallback"
    return RunRecordCallback


class _RecordHooks:
    """The hooks of :class:`RunRecordCallback` (kept free of Lightning so that this module imports without it)."""

    def __init__(self, protocol: str | None = None, check_missing: bool = True) -> None:
        self.protocol, self.check_missing = protocol, check_missing
        self.command: str | None = None
        self._frames: dict[str, dict[str, list]] = {}
        self._skipped: dict[str, list[str]] = {}
        self._served: dict[str, set[str]] = {}
        self.last: dict[str, Any] | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.command = stage

    # ---------------------------------------------------------------- collecting
    def _start(self, split: str) -> None:
        self._frames[split], self._skipped[split], self._served[split] = {}, [], set()

    def _batch(self, trainer: Any, split: str, batch: Any) -> None:
        if trainer.sanity_checking or not isinstance(batch, dict):
            return
        keys = list(batch.get("key", []))
        self._served.setdefault(split, set()).update(keys)
        self._skipped.setdefault(split, []).extend(batch.get("skipped", []))
        idx = batch.get("frame_indices")
        if idx is not None:
            table = self._frames.setdefault(split, {})
            for k, rows in zip(keys, idx.tolist(), strict=True):
                table.setdefault(k, rows)

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self._start("val")

    def on_test_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._start("test")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch(trainer, "val", batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch(trainer, "test", batch)

    # ---------------------------------------------------------------- writing
    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self.command == "validate":
            self.write(trainer, pl_module)

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self.write(trainer, pl_module)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.write(trainer, pl_module)

    def _gathered(self, split: str) -> tuple[dict[str, list], list[str], set[str]]:
        from vidlang.losses.distributed import all_gather_objects

        parts = all_gather_objects((self._frames.get(split, {}), self._skipped.get(split, []),
                                    sorted(self._served.get(split, set()))))
        frames: dict[str, list] = {}
        skipped: list[str] = []
        served: set[str] = set()
        for f, s, v in parts:
            for k, rows in f.items():
                frames.setdefault(k, rows)
            skipped.extend(s)
            served.update(v)
        return frames, skipped, served

    def build(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        """The record of this run so far (collective under DDP: call on every rank)."""
        command = self.command or getattr(getattr(trainer, "state", None), "fn", None) or "unknown"
        command = str(getattr(command, "value", command))
        datamodule = getattr(trainer, "datamodule", None)
        evaluated = EVAL_SPLITS.get(command, ())
        splits = ("train", *evaluated) if command == "fit" else evaluated
        protocol = self.protocol or (getattr(pl_module, "hparams", {}) or {}).get("protocol")
        record: dict[str, Any] = {
            "record_version": RECORD_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(),
            "software": software_versions(),
            "run": run_section(trainer, datamodule, command),
            "model": model_section(pl_module),
            "protocol": protocol_section(protocol, datamodule),
            "data": data_section(datamodule, splits, self.check_missing) if datamodule is not None else {},
        }
        for split in evaluated:
            frames, skipped, served = self._gathered(split)
            sec = record["data"].setdefault(split, {})
            sec["bad"] = keys_digest(set(skipped) - served)  # a padding repeat of a bad sample counts once
            sec["evaluated_videos"] = len(served)
            sec["frame_indices"] = frame_indices_digest(frames.items())
        return record

    def write(self, trainer: Any, pl_module: Any) -> Path | None:
        record = self.build(trainer, pl_module)
        folder = report_dir(trainer)  # on every rank (collective)
        self.last = record
        if not trainer.is_global_zero:
            return None
        return write_record(folder, record)


# ---------------------------------------------------------------- comparing

# (key prefix, moves the metrics?, why) -- the first matching prefix wins; unknown keys count as moving
RULES: tuple[tuple[str, bool, str], ...] = (
    ("created", False, "when the record was written"),
    ("host", False, "machine name"),
    ("record_version", False, "record format"),
    ("software.python", False, "Python version"),
    ("software.gpus", True, "other GPUs compute in other orders (last digits)"),
    ("software.git_", True, "other code"),
    ("software.vidlang", True, "other code"),
    ("software.", True, "library versions (decoding, kernels) can change frames and numerics"),
    ("run.command", False, "fit / validate / test"),
    ("run.checkpoint", True, "other weights"),
    ("run.global_batch.eval", False, "evaluation batch size (every embedding is gathered before ranking)"),
    ("run.global_batch.train", True, "training batch: other updates and in-batch negatives"),
    ("run.world_size", True, "training: global batch and gathered negatives (evaluation gathers all anyway)"),
    ("run.num_nodes", True, "training: global batch"),
    ("run.accumulate_grad_batches", True, "training: updates per sample"),
    ("run.precision", True, "numerics"),
    ("run.seed", True, "training randomness, random frame offsets"),
    ("model.hparams.write_plots", False, "plots"),
    ("model.hparams.evaluation.write_plots", False, "plots"),
    ("model.hparams.evaluation.text_chunk", False, "rows per similarity block (the same ranks)"),
    ("model.hparams.tokenizer", True, "another tokenizer (or the same files in another folder)"),
    ("model.hparams_hash", False, "summary of model.hparams (the keys that differ are listed on their own)"),
    ("model.", True, "other model or hyper-parameters"),
    ("protocol.sampling_differences", True, "the evaluation sampling departs from the protocol's otherwise"),
    ("protocol", True, "another evaluation protocol"),
    ("data.seed", True, "data randomness (training)"),
    ("data.settings.loader.num_workers", False, "loader workers (samples are seeded per index)"),
    ("data.settings.loader.persistent_workers", False, "loader workers"),
    ("data.settings.loader.pin_memory", False, "host memory"),
    ("data.settings.loader.prefetch_factor", False, "loader queue"),
    ("data.settings.loader.timeout_s", False, "loader timeout"),
    ("data.settings.loader.eval_batch_size", False, "evaluation batch size"),
    ("data.settings.", True, "frames, crops, decoding or batches"),
    ("*.description", False, "where the annotation files are"),
    ("*.format", True, "another reader"),
    ("*.official", True, "another official split"),
    ("*.index", True, "other videos or texts"),
    ("*.missing", True, "other videos missing: the gallery differs"),
    ("*.bad", True, "other videos failed to decode: the gallery differs"),
    ("*.evaluated_videos", True, "another number of videos evaluated"),
    ("*.sampler", True, "other frames"),
    ("*.frame_indices", True, "other frames decoded"),
)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> leaf values (lists are leaves)."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: obj}


def classify(key: str) -> tuple[bool, str]:
    """Whether a difference in ``key`` can move the metrics, and why (:data:`RULES`)."""
    parts = key.split(".")
    for prefix, moves, why in RULES:
        if prefix.startswith("*."):  # data.<split>.<field>...
            field = prefix[2:]
            if len(parts) >= 3 and parts[0] == "data" and parts[2].startswith(field):
                return moves, why
        elif key.startswith(prefix):
            return moves, why
    return True, "not a known field: assume it matters"


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def diff_records(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """``[{key, a, b, moves_metrics, why}]`` for every leaf that differs (absent = None), metric-moving first."""
    fa, fb = flatten(a), flatten(b)
    out = []
    for key in sorted(set(fa) | set(fb)):
        va, vb = fa.get(key), fb.get(key)
        if _equal(va, vb):
            continue
        moves, why = classify(key)
        out.append({"key": key, "a": va, "b": vb, "moves_metrics": moves, "why": why})
    return sorted(out, key=lambda d: (not d["moves_metrics"], d["key"]))
