"""Reading checkpoints safely, and telling which vidlang task wrote one.

:func:`read_checkpoint` loads a Lightning checkpoint with ``torch.load(weights_only=True)``: a file that needs
arbitrary code to load is refused with :class:`~vidlang.errors.UnsafeCheckpointError` naming the globals it
would call (found by scanning its pickle, never by running it); missing, empty, truncated or foreign files
raise :class:`~vidlang.errors.CheckpointError` naming the file. Every vidlang path that opens a checkpoint
goes through it: the tasks' ``load_from_checkpoint`` (:class:`vidlang.tasks.base.VideoTask`), ``vidlang
fit|validate|test --ckpt_path``, and the inference loader (:mod:`vidlang.serve.inference`).

Which task wrote a checkpoint (:func:`checkpoint_task`): the ``_class_path`` LightningCLI stores, else the
state-dict keys (``encoder.*``: chat; ``model.*``: recognition when the checkpoint carries class names /
prompt templates, else retrieval).
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vidlang.errors import CheckpointError, CheckpointNotFoundError, UnsafeCheckpointError

TASK_CLASSES = {
    "retrieval": "vidlang.tasks.retrieval.RetrievalTask",
    "recognition": "vidlang.tasks.recognition.RecognitionTask",
    "chat": "vidlang.tasks.chat_encoder.ChatEncoderTask",
}
"""checkpoint kind -> the task class that writes it."""
TASK_ROLES = {"retrieval": "text-video retrieval", "recognition": "action recognition", "chat": "video chat encoder"}


def task_name(kind: str) -> str:
    return TASK_CLASSES[kind].rsplit(".", 1)[1]


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A Lightning checkpoint as a dict, loaded with ``weights_only=True``.

    Raises :class:`CheckpointNotFoundError` (no such file), :class:`UnsafeCheckpointError` (it needs arbitrary
    code to load: refused), :class:`CheckpointError` (empty, truncated, not a torch file, no ``state_dict``).
    """
    p = Path(path)
    if p.is_dir():
        raise CheckpointError(f"{p}: a directory, not a checkpoint file")
    if not p.is_file():
        raise CheckpointNotFoundError(f"{p}: checkpoint not found")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p}: empty file, not a checkpoint")
    ckpt = safe_torch_load(p)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{p}: not a Lightning checkpoint (no 'state_dict'); vidlang reads the checkpoints "
                              "that training writes (bare model weights go to model.pretrained)")
    return ckpt


def safe_torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` on the CPU with one-line errors (see :func:`read_checkpoint`)."""
    with warnings.catch_warnings():  # e.g. torch's note on pickle protocols: not for the user
        warnings.simplefilter("ignore")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            refused = disallowed_globals(path) or _named_globals(str(err))
            if refused:
                shown = ", ".join(refused[:3]) + (f" and {len(refused) - 3} more" if len(refused) > 3 else "")
                raise UnsafeCheckpointError(
                    f"{path}: the checkpoint needs arbitrary code to load (its pickle imports {shown}) and was "
                    "refused; vidlang only loads checkpoints made of tensors and plain data"
                ) from None
            raise CheckpointError(f"{path}: not a checkpoint vidlang can read ({_torch_reason(err)})") from None
        except Exception as err:  # truncated zip, foreign bytes, ...: torch raises RuntimeError/EOFError/KeyError
            with open(path, "rb") as f:
                head = f.read(4)
            if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
                raise CheckpointError(f"{path}: truncated or corrupt checkpoint (incomplete zip archive)") from None
            raise CheckpointError(f"{path}: not a torch checkpoint, or truncated or corrupt "
                                  f"({_torch_reason(err)})") from None


def _torch_reason(err: BaseException) -> str:
    """The gist of a torch loading error, without torch's advice (which suggests ``weights_only`` off)."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    lines = [ln for ln in lines if "weights_only" not in ln and not ln.startswith(("Check the documentation",
                                                                                     "Weights only load failed"))]
    reason = lines[0].split(". ")[0].rstrip(".") if lines else ""
    return f"{type(err).__name__}: {reason}" if len(reason) < 12 else reason


def _named_globals(message: str) -> list[str]:
    import re

    return sorted(set(re.findall(r"GLOBAL ([\w.]+)", message)))


_SCAN_BYTES = 256 * 2**20  # the pickles of a legacy torch file come first, raw storages after


def disallowed_globals(path: str | os.PathLike) -> list[str]:
    """The globals a checkpoint's pickle would import beyond what ``torch.load(weights_only=True)`` allows,
    found by reading its opcodes (:mod:`vidlang.models.clip.pickle_scan`; nothing is executed). Zip
    checkpoints: ``*/data.pkl``; other files: their leading pickles (legacy ``torch.save`` layout, raw pickle)."""
    from vidlang.models.clip.pickle_scan import allowed_torch_globals, scan_pickles

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                name = next((n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")), None)
                data = zf.read(name) if name else b""
        else:
            with open(path, "rb") as f:
                data = f.read(_SCAN_BYTES)
    except (OSError, zipfile.BadZipFile, KeyError):
        return []
    return sorted(scan_pickles(data).disallowed(allowed_torch_globals()))


def checkpoint_task(ckpt: dict[str, Any], path: str | os.PathLike = "checkpoint") -> str:
    """Which vidlang task wrote ``ckpt``: ``"retrieval"``, ``"recognition"`` or ``"chat"`` (module docstring);
    :class:`CheckpointError` for another model's checkpoint."""
    hp = ckpt.get("hyper_parameters")
    hp = hp if isinstance(hp, dict) else {}
    by_path = {v: k for k, v in TASK_CLASSES.items()}
    if hp.get("_class_path") in by_path:
        return by_path[hp["_class_path"]]
    keys = list(ckpt["state_dict"].keys())
    if any(k.startswith("encoder.") for k in keys):
        return "chat"
    if any(k.startswith("model.") for k in keys):
        return "recognition" if "vidlang_classes" in ckpt or "templates" in hp else "retrieval"
    raise CheckpointError(f"{path}: not a vidlang checkpoint: its weights are neither a RetrievalTask / "
                          "RecognitionTask's ('model.*') nor a ChatEncoderTask's ('encoder.*')")


def checkpoint_kind(ckpt: dict[str, Any]) -> str:
    """Alias of :func:`checkpoint_task` (kept for callers of the old name)."""
    return checkpoint_task(ckpt)


def wrong_kind(path: str | os.PathLike, kind: str, command: str, wanted: Sequence[str]) -> CheckpointError:
    """The error for a checkpoint of ``kind`` given to ``command``, which needs one of ``wanted``."""
    need = " or ".join(f"{task_name(k)} ({TASK_ROLES[k]})" for k in wanted)
    hint = f"; classify videos with it: vidlang classify --ckpt {path}" if kind == "recognition" else ""
    return CheckpointError(f"{path}: a {task_name(kind)} checkpoint ({TASK_ROLES[kind]}), but {command} needs a "
                           f"{need} checkpoint{hint}")


def check_weights(path: str | os.PathLike, missing: Sequence[str], unexpected: Sequence[str]) -> None:
    """:class:`CheckpointError` naming ``path`` when a checkpoint's weights do not fit the model built from its own
    config (``missing`` / ``unexpected`` state-dict keys, as ``load_state_dict(strict=False)`` returns them)."""
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the model config: missing {list(missing)[:6]}, "
                              f"unexpected {list(unexpected)[:6]}")
