"""Offline loading of the CLIP checkpoints users have, into vidlang's state-dict layout.

Sources (local paths only; nothing here touches the network):

- a Hugging Face CLIP directory (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``,
  sharded or not, tokenizer files);
- an OpenAI CLIP checkpoint: a plain state dict, or the released TorchScript archive, whose
  tensors are read by a restricted unpickler that never imports or runs the archive's code;
- an open_clip checkpoint file (``.bin``/``.pt``/``.safetensors``, wrappers stripped) or an
  open_clip hub directory (``open_clip_config.json`` + weights);
- vidlang's own directory (``model.safetensors`` + ``config.json`` with ``"format": "vidlang"``),
  written by ``vidlang convert`` (:func:`save_vidlang`).

Only safe loading: safetensors, ``torch.load(weights_only=True)`` or the restricted TorchScript
reader. A checkpoint that needs arbitrary unpickling is refused with :class:`UnsafeCheckpointError`.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vidlang.models.clip.configs import TextConfig, VisionConfig
from vidlang.models.clip.convert import StateDict, detect_format, infer_config, resample_state_dict, to_vidlang

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
VIDLANG_FORMAT_VERSION = 1


class UnsafeCheckpointError(ValueError):
    """The checkpoint can only be read by unpickling arbitrary objects (code execution)."""


# ---------------------------------------------------------------------------------------------
# Reading one weights file safely
# ---------------------------------------------------------------------------------------------
def read_state_file(path: str | Path) -> dict[str, Any]:
    """Read a weights file without executing code: safetensors, TorchScript archive or weights-only pickle."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            if any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in zf.namelist()):
                return read_torchscript_tensors(zf, path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines()]
        glob = next((ln for ln in lines if "Unsupported global" in ln), None)
        if glob is None:
            m = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(e))
            why = m.group(1).strip() if m else (lines[0] if lines else "unpickling failed")
            raise ValueError(f"cannot read checkpoint {path}: not a valid weights file ({why})") from None
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it needs arbitrary unpickling ({glob.split(' was not')[0]}). vidlang only "
            "reads safetensors or weights-only checkpoints; re-save it as a plain state dict / safetensors in a "
            "trusted environment"
        ) from None
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"cannot read checkpoint {path}: {e}") from None


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _ScriptObject:
    """Stand-in for a ``__torch__.*`` module: keeps only the pickled attribute dict."""

    def __init__(self, *args: Any) -> None:
        self.attrs: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        self.attrs = dict(state) if isinstance(state, dict) else {}


def _rebuild_tensor(storage: Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> Tensor:
    return storage.as_strided(size, stride, offset)


class _TorchScriptUnpickler(pickle.Unpickler):
    """Resolves only tensor-rebuild functions, storage types, OrderedDict and ``__torch__`` stubs."""

    def __init__(self, data: bytes, load_storage: Callable[[str, torch.dtype, int], Tensor]) -> None:
        import io

        super().__init__(io.BytesIO(data))
        self._load_storage = load_storage

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, requires_grad, hooks: data
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            from collections import OrderedDict

            return OrderedDict
        if module.startswith("__torch__"):
            return type(name, (_ScriptObject,), {})
        raise pickle.UnpicklingError(f"TorchScript archive references {module}.{name}, which vidlang does not load")

    def persistent_load(self, pid: Any) -> Tensor:
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return self._load_storage(str(key), dtype, int(numel))


def read_torchscript_tensors(zf: zipfile.ZipFile, path: Path) -> StateDict:
    """Parameters and buffers of a TorchScript archive as ``{dotted.name: tensor}``, without running its code."""
    names = zf.namelist()
    data_pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
    if data_pkl is None:
        raise ValueError(f"{path}: TorchScript archive without data.pkl")
    root = data_pkl[: -len("data.pkl")]
    cache: dict[str, Tensor] = {}

    def load_storage(key: str, dtype: torch.dtype, numel: int) -> Tensor:
        if key not in cache:
            raw = bytearray(zf.read(f"{root}data/{key}"))
            cache[key] = torch.frombuffer(raw, dtype=dtype)[:numel] if raw else torch.empty(0, dtype=dtype)
        return cache[key]

    try:
        obj = _TorchScriptUnpickler(zf.read(data_pkl), load_storage).load()
    except (pickle.UnpicklingError, ValueError, TypeError) as e:
        raise UnsafeCheckpointError(f"refusing to load TorchScript archive {path}: {e}") from None
    out: StateDict = {}
    _collect(obj, "", out)
    if not out:
        raise ValueError(f"{path}: no tensors found in the TorchScript archive")
    return out


def _collect(obj: Any, prefix: str, out: StateDict) -> None:
    if isinstance(obj, Tensor):
        out[prefix.rstrip(".")] = obj.clone()
    elif isinstance(obj, _ScriptObject):
        for k, v in obj.attrs.items():
            _collect(v, f"{prefix}{k}.", out)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _collect(v, f"{prefix}{k}.", out)


# ---------------------------------------------------------------------------------------------
# Directory formats
# ---------------------------------------------------------------------------------------------
def _read_weights_dir(d: Path, candidates: tuple[str, ...]) -> dict[str, Any]:
    for name in candidates:
        f = d / name
        if f.is_file():
            return read_state_file(f)
        index = d / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            sd: dict[str, Any] = {}
            for s in shards:
                sd.update(read_state_file(d / s))
            return sd
    raise FileNotFoundError(f"{d}: no weights file found (looked for {', '.join(candidates)})")


def _hf_hints(d: Path) -> dict[str, dict[str, Any]]:
    """Heads / activation (not readable from weights) from an HF config, with transformers' defaults."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(d), local_files_only=True)
    hints: dict[str, dict[str, Any]] = {}
    for tower, sub in (("vision", "vision_config"), ("text", "text_config")):
        c = getattr(cfg, sub, None)
        if c is None and cfg.model_type == f"clip_{tower}_model":
            c = cfg
        if c is None:
            continue
        if abs(float(getattr(c, "layer_norm_eps", 1e-5)) - 1e-5) > 1e-12:
            raise ValueError(f"{d}/config.json: layer_norm_eps {c.layer_norm_eps} is not supported (vidlang uses 1e-5)")
        hints[tower] = {"heads": c.num_attention_heads, "act": c.hidden_act}
    pre = d / "preprocessor_config.json"
    if pre.is_file() and "vision" in hints:
        p = json.loads(pre.read_text())
        if "image_mean" in p and "image_std" in p:
            hints["vision"].update(image_mean=tuple(p["image_mean"]), image_std=tuple(p["image_std"]))
    return hints


def _open_clip_hints(cfg_file: Path) -> dict[str, dict[str, Any]]:
    cfg = json.loads(cfg_file.read_text())
    model = cfg.get("model_cfg", cfg)
    act = "quick_gelu" if model.get("quick_gelu") else "gelu"
    vis, txt = model.get("vision_cfg", {}), model.get("text_cfg", {})
    hints = {"vision": {"act": act}, "text": {"act": act}}
    if "width" in vis:
        hints["vision"]["heads"] = vis["width"] // vis.get("head_width", 64)
    if "heads" in txt:
        hints["text"]["heads"] = txt["heads"]
    pre = cfg.get("preprocess_cfg", {})
    if "mean" in pre and "std" in pre:
        hints["vision"].update(image_mean=tuple(pre["mean"]), image_std=tuple(pre["std"]))
    return hints


def _load_dir(d: Path) -> tuple[dict[str, Any], str, dict[str, dict[str, Any]]]:
    """``(raw state dict, format, hints)`` of a checkpoint directory."""
    cfg_file = d / "config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        if cfg.get("format") == "vidlang":
            sd = read_state_file(d / "model.safetensors")
            return sd, "vidlang", {"vision": cfg.get("vision") or {}, "text": cfg.get("text") or {}}
        if str(cfg.get("model_type", "")).startswith("clip") or "vision_config" in cfg:
            sd = _read_weights_dir(d, ("model.safetensors", "pytorch_model.bin"))
            return sd, "hf", _hf_hints(d)
    oc = d / "open_clip_config.json"
    if oc.is_file():
        names = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_model.bin")
        return _read_weights_dir(d, names), "open_clip", _open_clip_hints(oc)
    raise ValueError(
        f"{d}: not a recognised checkpoint directory (expected an HF CLIP config.json, a vidlang config.json "
        "or open_clip_config.json)"
    )


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def load_pretrained(
    path: str | Path,
    dtype: torch.dtype | None = torch.float32,
    act: str | None = None,
    image_size: int | None = None,
) -> tuple[StateDict, dict[str, Any]]:
    """Load any supported CLIP checkpoint (file or directory) into vidlang's layout.

    Returns ``(state_dict, info)``; ``info`` holds ``format``, ``source``, ``vision`` and ``text``
    (dicts of :class:`VisionConfig` / :class:`TextConfig` fields, ``None`` for a missing tower),
    ``tokenizer_dir`` (the directory holding tokenizer files, or ``None``) and ``act_source``.
    ``act`` overrides the activation (single files cannot record it: default ``quick_gelu``, the
    OpenAI one). ``image_size`` resamples the spatial position embedding. Floating tensors are
    cast to ``dtype`` (``None`` keeps the stored precision).
    """
    path = Path(path)
    if path.is_dir():
        raw, fmt, hints = _load_dir(path)
        act_source = "config"
    elif path.is_file():
        raw = read_state_file(path)
        fmt, hints, act_source = detect_format(raw), {}, "default (not stored in a weights file)"
    else:
        raise FileNotFoundError(f"pretrained source not found: {path}")
    try:
        sd = to_vidlang(raw, fmt)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: cannot convert the {fmt} checkpoint: {e}") from None
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    if image_size is not None:
        sd = resample_state_dict(sd, image_size=image_size)
    vision, text = infer_config(sd, hints)
    if image_size is not None and vision is not None:
        vision["image_size"] = image_size
    for tower in (vision, text):
        if tower is not None:
            if act is not None:
                tower["act"] = act
            tower.setdefault("act", "quick_gelu")
    if act is not None:
        act_source = "argument"
    tok_dir = path if path.is_dir() and any((path / f).is_file() for f in TOKENIZER_FILES) else None
    info = {
        "format": fmt,
        "source": str(path),
        "vision": vision,
        "text": text,
        "tokenizer_dir": tok_dir,
        "act_source": act_source,
    }
    return sd, info


def vision_config_from_info(info: dict[str, Any]) -> VisionConfig:
    if info.get("vision") is None:
        raise ValueError(f"{info.get('source')}: the checkpoint has no image tower")
    v = dict(info["vision"])
    for k in ("image_mean", "image_std"):
        if k in v:
            v[k] = tuple(v[k])
    return VisionConfig(**v)


def text_config_from_info(info: dict[str, Any]) -> TextConfig:
    if info.get("text") is None:
        raise ValueError(f"{info.get('source')}: the checkpoint has no text tower")
    return TextConfig(**info["text"])


def save_vidlang(sd: StateDict, info: dict[str, Any], out_dir: str | Path) -> Path:
    """Write vidlang's directory format: ``model.safetensors`` + ``config.json`` (+ tokenizer files)."""
    from safetensors.torch import save_file

    from vidlang.io import atomic_path, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "model.safetensors", clean_stale=True) as tmp:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp))
    vision = asdict(vision_config_from_info(info)) if info.get("vision") is not None else None
    text = asdict(text_config_from_info(info)) if info.get("text") is not None else None
    cfg = {
        "format": "vidlang",
        "version": VIDLANG_FORMAT_VERSION,
        "vision": vision,
        "text": text,
        "converted_from": {"format": info.get("format"), "source": info.get("source")},
    }
    atomic_write_text(out / "config.json", json.dumps(cfg, indent=2) + "\n")
    tok_dir = info.get("tokenizer_dir")
    if tok_dir is not None and Path(tok_dir).resolve() != out.resolve():
        for name in TOKENIZER_FILES:
            if (Path(tok_dir) / name).is_file():
                with atomic_path(out / name) as tmp:
                    shutil.copy2(Path(tok_dir) / name, tmp)
    return out
