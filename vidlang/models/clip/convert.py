"""Pure converters between foreign CLIP state dicts and vidlang's native layout.

Every function here takes a state dict and returns a new one; nothing reads files or
touches the network (see :mod:`vidlang.models.clip.pretrained` for that).

vidlang layout (fixed by contract)::

    image_tower.conv1.weight              [C, 3, p, p]
    image_tower.class_embedding           [C]
    image_tower.positional_embedding      [1+N, C]
    image_tower.ln_pre.{weight,bias}
    image_tower.layers.{i}.ln_1.*  .attn.qkv.{weight,bias} [3C, C] (q, k, v)  .attn.out_proj.*
    image_tower.layers.{i}.ln_2.*  .mlp.fc1.* (C -> M)  .mlp.fc2.*
    image_tower.ln_post.*   image_tower.proj [C, E]   (applied as x @ proj)
    text_tower.token_embedding.weight [V, W]   text_tower.positional_embedding [ctx, W]
    text_tower.layers.{i}...   text_tower.ln_final.*   text_tower.text_projection [W, E]
    logit_scale                           []  (log scale)

Supported foreign formats (detected from keys by :func:`detect_format`): ``hf``
(transformers ``CLIPModel`` / ``CLIPVisionModel`` / ``CLIPTextModel``), ``openai`` (OpenAI
CLIP ``state_dict``) and ``open_clip`` (same keys as OpenAI for ViT CLIP models, possibly
wrapped in ``{"state_dict": ...}``, prefixed ``module.``, or with a ``text.`` text tower).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vidlang.models.clip.configs import KnownTower, match_known_image, match_known_text
from vidlang.models.clip.layers import rename_legacy_layer_keys, resample_pos_embed, resample_temporal_embed
from vidlang.registry import Registry

StateDict = dict[str, Tensor]
FORMATS = ("hf", "openai", "open_clip", "vidlang")
__all__ = [
    "FORMATS",
    "TEMPORAL_EMBED_NAMES",
    "detect_format",
    "from_vidlang",
    "infer_config",
    "resample_state_dict",
    "to_vidlang",
    "unwrap_state_dict",
]
IMAGE_PREFIX = "image_tower."
TEXT_PREFIX = "text_tower."

# Names of temporal (frame) position embeddings a block may own; resampled for another T.
TEMPORAL_EMBED_NAMES = ("frame_position_embedding", "frame_pos_embed", "temporal_embedding", "temporal_pos_embed")


# ---------------------------------------------------------------------------------------------
# Rename rules: one template per tensor; "{i}" = layer index, "{p}" = weight|bias, "{qkv}" = q|k|v
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    foreign: str
    native: str
    op: str = "copy"  # "copy" | "t" (transpose 2-D) | "qkv" (three foreign tensors fused on dim 0)


def _layer_rules(foreign_layer: str, native_layer: str, layout: str) -> list[Rule]:
    """Rules of one transformer layer, for the ``hf`` or ``openai`` layout."""
    fb, nb = foreign_layer, native_layer
    if layout == "hf":
        return [
            Rule(f"{fb}.layer_norm1.{{p}}", f"{nb}.ln_1.{{p}}"),
            Rule(f"{fb}.layer_norm2.{{p}}", f"{nb}.ln_2.{{p}}"),
            Rule(f"{fb}.self_attn.{{qkv}}_proj.{{p}}", f"{nb}.attn.qkv.{{p}}", "qkv"),
            Rule(f"{fb}.self_attn.out_proj.{{p}}", f"{nb}.attn.out_proj.{{p}}"),
            Rule(f"{fb}.mlp.fc1.{{p}}", f"{nb}.mlp.fc1.{{p}}"),
            Rule(f"{fb}.mlp.fc2.{{p}}", f"{nb}.mlp.fc2.{{p}}"),
        ]
    return [
        Rule(f"{fb}.ln_1.{{p}}", f"{nb}.ln_1.{{p}}"),
        Rule(f"{fb}.ln_2.{{p}}", f"{nb}.ln_2.{{p}}"),
        Rule(f"{fb}.attn.in_proj_weight", f"{nb}.attn.qkv.weight"),
        Rule(f"{fb}.attn.in_proj_bias", f"{nb}.attn.qkv.bias"),
        Rule(f"{fb}.attn.out_proj.{{p}}", f"{nb}.attn.out_proj.{{p}}"),
        Rule(f"{fb}.mlp.c_fc.{{p}}", f"{nb}.mlp.fc1.{{p}}"),
        Rule(f"{fb}.mlp.c_proj.{{p}}", f"{nb}.mlp.fc2.{{p}}"),
    ]


def _hf_rules() -> list[Rule]:
    v, t, iv, it = "vision_model.", "text_model.", IMAGE_PREFIX, TEXT_PREFIX
    return [
        Rule(f"{v}embeddings.patch_embedding.weight", f"{iv}conv1.weight"),
        Rule(f"{v}embeddings.class_embedding", f"{iv}class_embedding"),
        Rule(f"{v}embeddings.position_embedding.weight", f"{iv}positional_embedding"),
        Rule(f"{v}pre_layrnorm.{{p}}", f"{iv}ln_pre.{{p}}"),
        *_layer_rules(f"{v}encoder.layers.{{i}}", f"{iv}layers.{{i}}", "hf"),
        Rule(f"{v}post_layernorm.{{p}}", f"{iv}ln_post.{{p}}"),
        Rule("visual_projection.weight", f"{iv}proj", "t"),
        Rule(f"{t}embeddings.token_embedding.weight", f"{it}token_embedding.weight"),
        Rule(f"{t}embeddings.position_embedding.weight", f"{it}positional_embedding"),
        *_layer_rules(f"{t}encoder.layers.{{i}}", f"{it}layers.{{i}}", "hf"),
        Rule(f"{t}final_layer_norm.{{p}}", f"{it}ln_final.{{p}}"),
        Rule("text_projection.weight", f"{it}text_projection", "t"),
        Rule("logit_scale", "logit_scale"),
    ]


def _openai_rules() -> list[Rule]:
    v, iv, it = "visual.", IMAGE_PREFIX, TEXT_PREFIX
    return [
        Rule(f"{v}conv1.weight", f"{iv}conv1.weight"),
        Rule(f"{v}class_embedding", f"{iv}class_embedding"),
        Rule(f"{v}positional_embedding", f"{iv}positional_embedding"),
        Rule(f"{v}ln_pre.{{p}}", f"{iv}ln_pre.{{p}}"),
        *_layer_rules(f"{v}transformer.resblocks.{{i}}", f"{iv}layers.{{i}}", "openai"),
        Rule(f"{v}ln_post.{{p}}", f"{iv}ln_post.{{p}}"),
        Rule(f"{v}proj", f"{iv}proj"),
        Rule("token_embedding.weight", f"{it}token_embedding.weight"),
        Rule("positional_embedding", f"{it}positional_embedding"),
        *_layer_rules("transformer.resblocks.{i}", f"{it}layers.{{i}}", "openai"),
        Rule("ln_final.{p}", f"{it}ln_final.{{p}}"),
        Rule("text_projection", f"{it}text_projection"),
        Rule("logit_scale", "logit_scale"),
    ]


# Keys that carry no weights (buffers, metadata) and are dropped on import.
_HF_IGNORED = re.compile(r"(^|\.)position_ids$")
_OPENAI_IGNORED = re.compile(r"(^|\.)attn_mask$|^(input_resolution|context_length|vocab_size)$")

_GROUPS = {"i": r"(?P<i>\d+)", "p": r"(?P<p>weight|bias)", "qkv": r"(?P<qkv>[qkv])"}


def _pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(i|p|qkv)\}", template)
    out = [re.escape(s) if n % 2 == 0 else _GROUPS[s] for n, s in enumerate(parts)]
    return re.compile("^" + "".join(out) + "$")


def _fill(template: str, groups: Mapping[str, str]) -> str:
    return re.sub(r"\{(i|p|qkv)\}", lambda m: groups[m.group(1)], template)


def _rename(
    sd: Mapping[str, Tensor], rules: list[Rule], forward: bool, ignored: re.Pattern[str] | None, fmt: str
) -> StateDict:
    """Apply ``rules`` foreign->native (``forward``) or native->foreign; unknown keys raise."""
    compiled = [(_pattern(r.foreign if forward else r.native), r) for r in rules]
    out: StateDict = {}
    fused: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, value in sd.items():
        if ignored is not None and ignored.search(key):
            continue
        for pat, rule in compiled:
            m = pat.match(key)
            if m is None:
                continue
            groups = {k: v for k, v in m.groupdict().items() if v is not None}
            if rule.op == "qkv" and not forward:
                for name, part in zip("qkv", value.chunk(3, dim=0), strict=True):
                    out[_fill(rule.foreign, {**groups, "qkv": name})] = part.contiguous()
                break
            dst = _fill(rule.native if forward else rule.foreign, groups)
            if rule.op == "t":
                out[dst] = value.t().contiguous()
            elif rule.op == "qkv":
                fused.setdefault(dst, {})[groups["qkv"]] = value
            else:
                out[dst] = value
            break
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"{fmt} state dict has {len(unknown)} unsupported key(s), e.g. {sorted(unknown)[:5]}")
    for dst, parts in fused.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"{fmt} state dict: incomplete q/k/v projections for {dst} (have {sorted(parts)})")
        out[dst] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# ---------------------------------------------------------------------------------------------
# Format detection and unwrapping
# ---------------------------------------------------------------------------------------------
def unwrap_state_dict(obj: Any) -> StateDict:
    """Strip training-checkpoint wrappers: ``{"state_dict": ...}`` / ``{"model": ...}`` and ``module.``."""
    sd = obj
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(sd, Mapping) and isinstance(sd.get(wrapper), Mapping):
            sd = sd[wrapper]
    if not isinstance(sd, Mapping):
        raise TypeError(f"expected a state dict (mapping name -> tensor), got {type(obj).__name__}")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if isinstance(v, Tensor)}


def _is_wrapped(obj: Mapping[str, Any]) -> bool:
    if any(isinstance(obj.get(w), Mapping) for w in ("state_dict", "model", "module")):
        return True
    return bool(obj) and all(k.startswith("module.") for k in obj)


def detect_format(sd: Mapping[str, Any]) -> str:
    """Return ``"hf" | "openai" | "open_clip" | "vidlang"`` from the keys of ``sd``."""
    wrapped = _is_wrapped(sd)
    keys = list(unwrap_state_dict(sd))
    if any(k.startswith((IMAGE_PREFIX, TEXT_PREFIX)) for k in keys):
        return "vidlang"
    if any(k.startswith(("vision_model.", "text_model.")) for k in keys):
        return "hf"
    if (
        any(k.startswith("visual.") for k in keys)
        or "token_embedding.weight" in keys
        or "text.token_embedding.weight" in keys
    ):
        if any(k.startswith("visual.trunk.") or k.startswith("visual.layer1.") for k in keys):
            raise ValueError("unsupported open_clip image tower (timm trunk or ResNet); only ViT CLIP towers convert")
        open_clip_only = wrapped or any(k.startswith("text.") or k == "logit_bias" for k in keys)
        return "open_clip" if open_clip_only else "openai"
    raise ValueError(f"cannot detect the checkpoint format from keys such as {keys[:5]}")


# ---------------------------------------------------------------------------------------------
# Converters (registry: format -> function), both directions
# ---------------------------------------------------------------------------------------------
TO_VIDLANG: Registry[Callable[[Mapping[str, Tensor]], StateDict]] = Registry("state-dict importer")
FROM_VIDLANG: Registry[Callable[[Mapping[str, Tensor]], StateDict]] = Registry("state-dict exporter")


@TO_VIDLANG.register("hf")
def hf_to_vidlang(sd: Mapping[str, Tensor]) -> StateDict:
    return _rename(unwrap_state_dict(sd), _hf_rules(), True, _HF_IGNORED, "hf")


@TO_VIDLANG.register("openai")
def openai_to_vidlang(sd: Mapping[str, Tensor]) -> StateDict:
    return _rename(unwrap_state_dict(sd), _openai_rules(), True, _OPENAI_IGNORED, "openai")


@TO_VIDLANG.register("open_clip")
def open_clip_to_vidlang(sd: Mapping[str, Tensor]) -> StateDict:
    flat = unwrap_state_dict(sd)
    if "logit_bias" in flat:
        raise ValueError("open_clip checkpoint has logit_bias (SigLIP-style); only softmax CLIP is supported")
    # CustomTextCLIP keeps the text tower under "text."; text_projection there is a Parameter too.
    flat = {k[len("text.") :] if k.startswith("text.") else k: v for k, v in flat.items()}
    return _rename(flat, _openai_rules(), True, _OPENAI_IGNORED, "open_clip")


@TO_VIDLANG.register("vidlang")
def vidlang_identity(sd: Mapping[str, Tensor]) -> StateDict:
    """vidlang's own layout; files written before the ``blocks`` -> ``layers`` rename are renamed."""
    out = dict(unwrap_state_dict(sd))
    for prefix in (IMAGE_PREFIX, TEXT_PREFIX):
        rename_legacy_layer_keys(out, prefix)
    return out


@FROM_VIDLANG.register("hf")
def vidlang_to_hf(sd: Mapping[str, Tensor]) -> StateDict:
    return _rename(sd, _hf_rules(), False, None, "vidlang")


@FROM_VIDLANG.register("openai")
def vidlang_to_openai(sd: Mapping[str, Tensor]) -> StateDict:
    return _rename(sd, _openai_rules(), False, None, "vidlang")


def to_vidlang(sd: Mapping[str, Any], fmt: str | None = None) -> StateDict:
    """Convert any supported CLIP state dict (format auto-detected unless ``fmt``) to vidlang's layout."""
    return TO_VIDLANG.get(fmt or detect_format(sd))(sd)


def from_vidlang(sd: Mapping[str, Tensor], fmt: str) -> StateDict:
    """Export a vidlang state dict to ``"hf"`` or ``"openai"`` layout (open_clip uses ``"openai"``)."""
    return FROM_VIDLANG.get("openai" if fmt == "open_clip" else fmt)(sd)


# ---------------------------------------------------------------------------------------------
# Architecture inference
# ---------------------------------------------------------------------------------------------
def _count_layers(sd: Mapping[str, Tensor], prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"layers\.(\d+)\.", k))}
    if idx and idx != set(range(len(idx))):
        raise ValueError(f"{prefix} layers are not numbered 0..n-1: {sorted(idx)}")
    return len(idx)


def _unique_heads(known: list[KnownTower]) -> int | None:
    heads = {k.heads for k in known}
    return heads.pop() if len(heads) == 1 else None


def infer_config(
    sd: Mapping[str, Any], hints: Mapping[str, Mapping[str, Any]] | None = None
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Infer ``(vision, text)`` architecture dicts from any supported state dict.

    Heads cannot be read from weights: they come from ``hints={"vision": {"heads": h}, "text": {...}}``
    (a config stored beside the weights) or else from the known architectures whose shapes match
    (:func:`~vidlang.models.clip.configs.match_known_image`); ``heads`` is ``None`` when neither
    tells (see :func:`vidlang.models.clip.pretrained.resolve_towers`). A tower absent from ``sd`` gives ``None``.
    """
    nat = sd if detect_format(sd) == "vidlang" else to_vidlang(sd)
    hints = hints or {}
    vision = text = None
    if f"{IMAGE_PREFIX}conv1.weight" in nat:
        conv = nat[f"{IMAGE_PREFIX}conv1.weight"]  # [C, 3, p, p]
        width, patch = conv.shape[0], conv.shape[-1]
        n = nat[f"{IMAGE_PREFIX}positional_embedding"].shape[0] - 1
        grid = math.isqrt(n)
        if grid * grid != n:
            raise ValueError(f"image positional embedding has {n} patch positions, not a square grid")
        vision = {
            "width": width,
            "layers": _count_layers(nat, IMAGE_PREFIX),
            "heads": None,
            "patch_size": patch,
            "image_size": grid * patch,
            "mlp_dim": nat[f"{IMAGE_PREFIX}layers.0.mlp.fc1.weight"].shape[0],
            "embed_dim": nat[f"{IMAGE_PREFIX}proj"].shape[1],
        }
        known = match_known_image(width, vision["layers"], patch, vision["mlp_dim"])
        vision["heads"] = _unique_heads(known)
        vision.update(hints.get("vision", {}))
    if f"{TEXT_PREFIX}token_embedding.weight" in nat:
        vocab, width = nat[f"{TEXT_PREFIX}token_embedding.weight"].shape
        text = {
            "width": width,
            "layers": _count_layers(nat, TEXT_PREFIX),
            "heads": None,
            "context_length": nat[f"{TEXT_PREFIX}positional_embedding"].shape[0],
            "vocab_size": vocab,
            "mlp_dim": nat[f"{TEXT_PREFIX}layers.0.mlp.fc1.weight"].shape[0],
            "embed_dim": nat[f"{TEXT_PREFIX}text_projection"].shape[1],
        }
        text["heads"] = _unique_heads(match_known_text(width, text["layers"], text["mlp_dim"]))
        text.update(hints.get("text", {}))
    return vision, text


# ---------------------------------------------------------------------------------------------
# Position-embedding resampling of a whole state dict (the functions: :mod:`vidlang.models.clip.layers`)
# ---------------------------------------------------------------------------------------------
def resample_state_dict(
    sd: Mapping[str, Tensor],
    image_size: int | None = None,
    num_frames: int | None = None,
    temporal_keys: Iterable[str] | None = None,
) -> StateDict:
    """Resample a vidlang state dict for another image size and/or frame count.

    ``temporal_keys`` default: every key whose last name is one of :data:`TEMPORAL_EMBED_NAMES`.
    """
    out = dict(sd)
    conv_key, pos_key = f"{IMAGE_PREFIX}conv1.weight", f"{IMAGE_PREFIX}positional_embedding"
    if image_size is not None and conv_key in out:
        patch = out[conv_key].shape[-1]
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
        g = image_size // patch
        out[pos_key] = resample_pos_embed(out[pos_key], (g, g))
    if num_frames is not None:
        keys = (
            list(temporal_keys)
            if temporal_keys is not None
            else [k for k in out if k.rsplit(".", 1)[-1] in TEMPORAL_EMBED_NAMES]
        )
        for k in keys:
            out[k] = resample_temporal_embed(out[k], num_frames)
    return out
