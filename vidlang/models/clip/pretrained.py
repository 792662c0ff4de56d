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

Neither attention heads nor the activation are stored in a weights file. :func:`resolve_towers`
takes them from a config beside the weights, the caller (``heads=`` / ``text_heads=`` / ``act=``),
or the known architectures whose shapes match; heads it cannot tell are refused
(:class:`~vidlang.errors.UnknownArchitectureError`), an activation it has to guess is warned about
(:class:`ActivationGuessWarning`).
"""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from vidlang.errors import UnknownArchitectureError, UnsafeCheckpointError
from vidlang.models.clip.configs import (
    ImageConfig,
    KnownTower,
    TextConfig,
    match_known_image,
    match_known_text,
)
from vidlang.models.clip.convert import StateDict, detect_format, infer_config, resample_state_dict, to_vidlang
from vidlang.models.clip.pickle_scan import allowed_torch_globals, scan_pickles

__all__ = [
    "ActivationGuessWarning",
    "UnsafeCheckpointError",
    "load_pretrained",
    "read_state_file",
    "resolve_towers",
    "save_vidlang",
    "text_config_from_info",
    "image_config_from_info",
]

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
VIDLANG_FORMAT_VERSION = 1


class ActivationGuessWarning(UserWarning):
    """The activation of a bare weights file was guessed (pass ``act=`` / ``--act`` to state it)."""


# ---------------------------------------------------------------------------------------------
# Reading one weights file safely
# ---------------------------------------------------------------------------------------------
def read_state_file(path: str | Path) -> dict[str, Any]:
    """Read a weights file without executing code: safetensors, TorchScript archive or weights-only pickle.

    Raises :class:`UnsafeCheckpointError` for a file whose unpickling would import anything beyond
    tensors (code execution), ``ValueError`` for a file that is broken or not a checkpoint.
    """
    return _read_file(Path(path))[0]


def _read_file(path: Path) -> tuple[dict[str, Any], str]:
    """``(contents, kind)`` with kind ``"safetensors" | "torchscript" | "pickle"``."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), "safetensors"
        except SafetensorError as e:
            raise ValueError(f"cannot read {path}: not a valid safetensors file ({_first_line(e)})") from None
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                if any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in zf.namelist()):
                    return read_torchscript_tensors(zf, path), "torchscript"
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise ValueError(f"cannot read checkpoint {path}: broken zip archive ({_first_line(e)})") from None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True), "pickle"
    except Exception as e:  # torch raises several types for refused / broken files; classified below
        raise _classify_pickle_failure(path, e) from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


_SCAN_BYTES = 256 * 2**20


def _main_pickle(path: Path) -> bytes:
    """The pickle stream(s) of a torch checkpoint: ``data.pkl`` of a zip checkpoint, else the file itself."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                name = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                return zf.read(name) if name else b""
        except (zipfile.BadZipFile, OSError, KeyError):
            return b""
    with open(path, "rb") as f:  # a legacy torch file: its pickles come first, raw storages after
        return f.read(_SCAN_BYTES)


def _unsafe_message(path: Path, bad: list[str]) -> str:
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    return (
        f"refused to load {path}: the checkpoint needs arbitrary code to load (its pickle imports {shown}), "
        "which vidlang never runs; vidlang reads safetensors files and plain tensor checkpoints only"
    )


def _classify_pickle_failure(path: Path, err: BaseException) -> Exception:
    """Why ``torch.load(weights_only=True)`` refused ``path``: unsafe imports, or a broken / foreign file."""
    scan = scan_pickles(_main_pickle(path))
    bad = scan.disallowed(allowed_torch_globals())
    if bad:
        return UnsafeCheckpointError(_unsafe_message(path, bad))
    # torch's message carries advice about weights_only=False: keep only the reason
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    advice = ("weights_only", "Weights only load failed", "torch.load", "trust", "file an issue", "do those steps")
    reasons = [ln for ln in lines if not any(a in ln for a in advice)]
    why = reasons[0] if reasons else (scan.error or type(err).__name__)
    why = why.removeprefix("WeightsUnpickler error:").strip() or type(err).__name__
    return ValueError(f"cannot read checkpoint {path}: not a valid weights file ({why})")


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


_TORCHSCRIPT_GLOBALS = {
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "collections.OrderedDict",
    *(f"torch.{name}" for name in _STORAGE_DTYPES),
}


class _DisallowedGlobal(pickle.UnpicklingError):
    """A TorchScript pickle asked for something beyond tensors and module stubs."""


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
        raise _DisallowedGlobal(f"TorchScript archive references {module}.{name}, which vidlang does not load")

    def persistent_load(self, pid: Any) -> Tensor:
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise ValueError(f"unexpected persistent id {pid!r}")
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

    data = zf.read(data_pkl)
    bad = scan_pickles(data).disallowed(_TORCHSCRIPT_GLOBALS, ("__torch__.",))
    if bad:
        raise UnsafeCheckpointError(_unsafe_message(path, bad))
    try:
        obj = _TorchScriptUnpickler(data, load_storage).load()
    except _DisallowedGlobal as e:  # the unpickler's own allow-list (a second guard)
        raise UnsafeCheckpointError(
            f"refused to load {path}: the TorchScript archive needs arbitrary code ({e})"
        ) from None
    except (pickle.UnpicklingError, ValueError, TypeError, KeyError, EOFError, IndexError) as e:
        raise ValueError(f"cannot read TorchScript archive {path}: {_first_line(e)}") from None
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
            hints = {"vision": dict(cfg.get("vision") or {}), "text": dict(cfg.get("text") or {})}
            # fields that were guessed at conversion stay guesses: resolve_towers warns about them again
            hints["guessed"] = list((cfg.get("converted_from") or {}).get("guessed") or [])
            return sd, "vidlang", hints
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
# Heads and activation: what the weights do not store
# ---------------------------------------------------------------------------------------------
_FLAGS = {"vision": ("--heads", "heads"), "text": ("--text-heads", "text_heads")}
_TOWER_WORDS = {"vision": "image tower", "text": "text tower"}


def _known_towers(name: str, tower: Mapping[str, Any]) -> list[KnownTower]:
    if name == "vision":
        return match_known_image(tower["width"], tower["layers"], tower["patch_size"], tower["mlp_dim"])
    return match_known_text(tower["width"], tower["layers"], tower["mlp_dim"])


def _shape_words(name: str, tower: Mapping[str, Any]) -> str:
    patch = f", patch {tower['patch_size']}" if name == "vision" else ""
    return f"{_TOWER_WORDS[name]} (width {tower['width']}, {tower['layers']} layers{patch}, MLP {tower['mlp_dim']})"


def _names(known: list[KnownTower]) -> str:
    return " / ".join(k.name for k in known)


def _act_guess(fmt: str, known: list[KnownTower]) -> tuple[str, str]:
    """``(activation, why)`` for a file that does not record it."""
    if fmt == "vidlang":
        return "quick_gelu", "vidlang's tower default"
    if known and any(k.openai for k in known) and fmt != "open_clip":
        name = _names(known)
        return (
            "quick_gelu",
            f"its shapes match {name}, which OpenAI released with quick_gelu; open_clip's own "
            f"{name} trainings use gelu",
        )
    origin = "an open_clip training checkpoint: " if fmt == "open_clip" else ""
    if known:
        variant = known[0].quick_gelu_variant
        return "gelu", f"{origin}open_clip's default for {_names(known)}" + (
            f"; open_clip also ships {known[0].name}-quickgelu" if variant else ""
        )
    return "gelu", f"{origin}open_clip's default; the shapes match no known architecture"


def resolve_towers(
    sd: Mapping[str, Tensor],
    fmt: str,
    source: str,
    hints: Mapping[str, Any] | None = None,
    *,
    heads: int | None = None,
    text_heads: int | None = None,
    act: str | None = None,
    on_unknown: Literal["refuse", "omit"] = "refuse",
    openai_origin: bool = False,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, dict[str, Any]]:
    """``(vision, text, meta)`` tower configs of a vidlang-layout ``sd`` (meta tensors are fine).

    Heads come from ``heads`` / ``text_heads``, else ``hints`` (a config stored with the weights), else
    the known architectures matching the shapes. Activation: ``act``, else ``hints``, else
    ``quick_gelu`` for an OpenAI TorchScript archive (``openai_origin``), else a guess.
    ``on_unknown="refuse"``: heads nothing tells raise :class:`UnknownArchitectureError` naming
    ``--heads`` / ``--text-heads``; a guessed activation is set and warned about
    (:class:`ActivationGuessWarning`, naming ``--act``). ``"omit"``: both are left out of the tower
    dicts for the caller to supply. ``meta``: ``act_source``, ``heads_source`` (per tower) and
    ``unknown`` (``"vision.heads"``, ``"text.act"``, ...: what the checkpoint did not tell).
    """
    hints = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in (hints or {}).items()}
    guessed = set(hints.pop("guessed", None) or [])
    prior_guess: dict[str, Any] = {}
    for field in guessed:  # e.g. "vision.act": recorded by an earlier conversion, but only a guess
        tower_name, _, key = field.partition(".")
        if isinstance(hints.get(tower_name), dict) and key in hints[tower_name]:
            prior_guess[field] = hints[tower_name].pop(key)
    vision, text = infer_config(sd, hints)
    towers = {n: t for n, t in (("vision", vision), ("text", text)) if t is not None}
    explicit = {"vision": heads, "text": text_heads}
    unknown: list[str] = []
    heads_source: dict[str, str] = {}
    problems: list[str] = []
    flags: list[str] = []
    for name, tower in towers.items():
        known = _known_towers(name, tower)
        stated = (hints.get(name) or {}).get("heads")
        want = explicit[name]
        flag = _FLAGS[name][0]
        if want is not None:
            if want < 1 or tower["width"] % want:
                raise ValueError(
                    f"{source}: {flag} {want} does not divide the {_TOWER_WORDS[name]} width {tower['width']}"
                )
            if stated is not None and stated != want:
                warnings.warn(f"{source}: {flag} {want} overrides the {stated} heads its config states", stacklevel=2)
            elif stated is None and tower["heads"] is not None and tower["heads"] != want:
                warnings.warn(
                    f"{source}: {flag} {want} overrides the shapes' answer: the {_TOWER_WORDS[name]} matches "
                    f"{_names(known)}, which has {tower['heads']} heads",
                    stacklevel=2,
                )
            tower["heads"], heads_source[name] = want, "argument"
        elif stated is not None:
            heads_source[name] = "config"
        elif tower["heads"] is not None:
            heads_source[name] = f"shapes of {_names(known)}"
        else:
            unknown.append(f"{name}.heads")
            if known:
                opts = ", ".join(f"{k.name} ({k.heads} heads)" for k in known)
                problems.append(f"the {_shape_words(name, tower)} matches several architectures: {opts}")
            else:
                problems.append(f"the {_shape_words(name, tower)} matches no known open_clip / OpenAI architecture")
            flags.append(f"{flag} N")
    if problems and on_unknown == "refuse":
        kwargs = ", ".join(f"{_FLAGS[u.split('.')[0]][1]}=N" for u in unknown)
        raise UnknownArchitectureError(
            f"{source}: the attention heads are not stored in the weights and the shapes do not tell them: "
            f"{'; '.join(problems)}. Pass {' '.join(flags)} with the heads of the model's config "
            f"(load_pretrained({kwargs})); heads must divide the width"
        )
    for field in unknown:
        towers[field.split(".")[0]].pop("heads", None)

    # activation
    act_source = "config"
    missing = [n for n, t in towers.items() if "act" not in (hints.get(n) or {})]
    if act is not None:
        for n, t in towers.items():
            stated = (hints.get(n) or {}).get("act")
            if stated is not None and stated != act:
                warnings.warn(f"{source}: --act {act} overrides the {stated} its config states", stacklevel=2)
            t["act"] = act
        act_source = "argument"
    elif missing and openai_origin:
        for n in missing:
            towers[n]["act"] = "quick_gelu"
        act_source = "OpenAI TorchScript archive (OpenAI CLIP uses quick_gelu)"
    elif missing:
        first = "vision" if "vision" in towers else "text"
        guess, why = _act_guess(fmt, _known_towers(first, towers[first]))
        if any(f"{n}.act" in prior_guess for n in missing):
            guess = next(prior_guess[f"{n}.act"] for n in missing if f"{n}.act" in prior_guess)
            why = "a guess recorded when this directory was converted"
        unknown += [f"{n}.act" for n in missing]
        act_source = f"guess: {why}"
        if on_unknown == "refuse":
            for n in missing:
                towers[n]["act"] = guess
            warnings.warn(
                f"{source}: the activation is not stored in a bare weights file; assuming {guess} ({why}). If that "
                "is wrong every output is silently off: pass --act gelu or --act quick_gelu (load_pretrained(act=...))",
                ActivationGuessWarning,
                stacklevel=2,
            )
    order = ["vision.heads", "vision.act", "text.heads", "text.act"]
    meta = {"act_source": act_source, "heads_source": heads_source, "unknown": sorted(unknown, key=order.index)}
    return vision, text, meta


def _check_tower_keys(sd: Mapping[str, Tensor], vision: Mapping | None, text: Mapping | None, source: str) -> None:
    """Refuse weights that lack tensors (or have other shapes than) the towers vidlang builds for them."""
    from vidlang.models.clip.image import ClipImageTower
    from vidlang.models.clip.text import TextTower

    fields = {"vision": ImageConfig.__dataclass_fields__, "text": TextConfig.__dataclass_fields__}
    for name, tower, prefix in (("vision", vision, "image_tower."), ("text", text, "text_tower.")):
        if tower is None:
            continue
        cfg = {k: v for k, v in tower.items() if k in fields[name]}
        cfg["heads"] = 1  # tensor shapes do not depend on heads or activation
        with torch.device("meta"):
            module = ClipImageTower(ImageConfig(**cfg)) if name == "vision" else TextTower(TextConfig(**cfg))
        want = {prefix + k: v.shape for k, v in module.state_dict().items()}
        missing = [k for k in want if k not in sd]
        wrong = [
            f"{k} {tuple(sd[k].shape)} (expected {tuple(v)})" for k, v in want.items() if k in sd and sd[k].shape != v
        ]
        if missing or wrong:
            raise ValueError(
                f"{source}: the {_TOWER_WORDS[name]} is not a CLIP ViT tower vidlang implements: "
                + (f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}" if missing else "")
                + ("; " if missing and wrong else "")
                + (f"unexpected shapes {wrong[:3]}" if wrong else "")
            )


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def load_pretrained(
    path: str | Path,
    dtype: torch.dtype | None = torch.float32,
    act: str | None = None,
    image_size: int | None = None,
    *,
    heads: int | None = None,
    text_heads: int | None = None,
    on_unknown: Literal["refuse", "omit"] = "refuse",
) -> tuple[StateDict, dict[str, Any]]:
    """Load any supported CLIP checkpoint (file or directory) into vidlang's layout.

    Returns ``(state_dict, info)``; ``info`` holds ``format``, ``source``, ``vision`` and ``text``
    (dicts of :class:`ImageConfig` / :class:`TextConfig` fields, ``None`` for a missing tower),
    ``tokenizer_dir`` (the directory holding tokenizer files, or ``None``), ``act_source``,
    ``heads_source`` and ``unknown`` (see :func:`resolve_towers`, which also explains ``heads``,
    ``text_heads``, ``act`` and ``on_unknown``). ``image_size`` resamples the spatial position
    embedding. Floating tensors are cast to ``dtype`` (``None`` keeps the stored precision).
    """
    path = Path(path)
    openai_origin = False
    if path.is_dir():
        raw, fmt, hints = _load_dir(path)
    elif path.is_file():
        raw, kind = _read_file(path)
        if not isinstance(raw, Mapping):
            raise ValueError(f"{path}: not a CLIP checkpoint (it holds a {type(raw).__name__}, not a state dict)")
        try:
            fmt = detect_format(raw)
        except TypeError as e:  # e.g. {"state_dict": <not a mapping>}
            raise ValueError(f"{path}: not a CLIP checkpoint ({e})") from None
        hints, openai_origin = {}, kind == "torchscript"
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
    vision, text, meta = resolve_towers(
        sd, fmt, str(path), hints, heads=heads, text_heads=text_heads, act=act, on_unknown=on_unknown,
        openai_origin=openai_origin,
    )  # fmt: skip
    if image_size is not None and vision is not None:
        vision["image_size"] = image_size
    _check_tower_keys(sd, vision, text, str(path))
    tok_dir = path if path.is_dir() and any((path / f).is_file() for f in TOKENIZER_FILES) else None
    info = {"format": fmt, "source": str(path), "vision": vision, "text": text, "tokenizer_dir": tok_dir, **meta}
    return sd, info


def _tower_config_fields(info: dict[str, Any], tower: str) -> dict[str, Any]:
    if info.get(tower) is None:
        raise ValueError(f"{info.get('source')}: the checkpoint has no {_TOWER_WORDS[tower]}")
    v = dict(info[tower])
    lacking = [k for k in ("heads", "act") if v.get(k) is None]
    if lacking:
        raise UnknownArchitectureError(
            f"{info.get('source')}: the {_TOWER_WORDS[tower]}'s {' and '.join(lacking)} are unknown; pass them "
            f"({_FLAGS[tower][0]} / --act)"
        )
    return v


def image_config_from_info(info: dict[str, Any]) -> ImageConfig:
    v = _tower_config_fields(info, "vision")
    for k in ("image_mean", "image_std"):
        if k in v:
            v[k] = tuple(v[k])
    return ImageConfig(**v)


def text_config_from_info(info: dict[str, Any]) -> TextConfig:
    return TextConfig(**_tower_config_fields(info, "text"))


def save_vidlang(sd: StateDict, info: dict[str, Any], out_dir: str | Path) -> Path:
    """Write vidlang's directory format: ``model.safetensors`` + ``config.json`` (+ tokenizer files)."""
    from safetensors.torch import save_file

    from vidlang.io import atomic_path, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "model.safetensors", clean_stale=True) as tmp:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp))
    vision = asdict(image_config_from_info(info)) if info.get("vision") is not None else None
    text = asdict(text_config_from_info(info)) if info.get("text") is not None else None
    cfg = {
        "format": "vidlang",
        "version": VIDLANG_FORMAT_VERSION,
        "vision": vision,
        "text": text,
        "converted_from": {
            "format": info.get("format"),
            "source": info.get("source"),
            "guessed": [u for u in info.get("unknown", []) if u.endswith(".act")],
            **(info.get("converted_from_extra") or {}),  # e.g. an official method's name, file hash, block
        },
    }
    atomic_write_text(out / "config.json", json.dumps(cfg, indent=2) + "\n")
    tok_dir = info.get("tokenizer_dir")
    if tok_dir is not None and Path(tok_dir).resolve() != out.resolve():
        for name in TOKENIZER_FILES:
            if (Path(tok_dir) / name).is_file():
                with atomic_path(out / name) as tmp:
                    shutil.copy2(Path(tok_dir) / name, tmp)
    return out
