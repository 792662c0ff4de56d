"""Released checkpoints of published methods, in their authors' layout, -> vidlang's layout (towers + block).

One converter per method (registry :data:`OFFICIAL_METHODS`), each a pure function of the official state dict
(wrappers such as ``{"model": ...}`` / ``{"state_dict": ...}`` and a DDP ``module.`` prefix already stripped by
:func:`vidlang.models.clip.convert.unwrap_state_dict`). Every official key is either mapped to a vidlang key or
dropped with a stated reason (:attr:`OfficialConversion.dropped`); a key the converter does not know is refused,
naming it. The layouts (names from the authors' model code):

``clip4clip`` (``ArrowLuo/CLIP4Clip`` ``modules/modeling.py``; the ``pytorch_model.bin.N`` files it saves):
    ``clip.*`` = an OpenAI CLIP state dict (``clip.visual.*``, ``clip.transformer.*``, ``clip.token_embedding``, ...);
    meanP has nothing else; seqTransf adds ``frame_position_embeddings.weight [context, E]`` and
    ``transformerClip.resblocks.{i}.*`` (CLIP-style pre-LN layers, heads = text width / 64); seqLSTM adds
    ``lstm_visual.*`` (and an unused ``frame_position_embeddings``). tightTransf (``cross.*``,
    ``similarity_dense.*``) and the 3-D patch embedding (``clip.visual.conv2.weight``) are refused.
    -> blocks ``mean`` (``normalize_frames=True``), ``seq_transformer``, ``seq_lstm``.
``vifi_clip`` (``muzairkhattak/ViFi-CLIP`` ``trainers/vificlip.py``; ``ckpt_epoch_N.pth`` / ``best.pth``, the model
    under ``"model"``, keys ``module.``-prefixed): ``image_encoder.*`` = CLIP's ``visual.*``; ``text_encoder.*`` =
    CLIP's text transformer, positions, ``ln_final``, ``text_projection``; ``logit_scale``; the prompt variant adds
    ``image_encoder.VPT``, ``image_encoder.transformer.resblocks.{i}.VPT_shallow``, ``prompt_learner.ctx``,
    ``text_encoder.transformer.resblocks.{i}.VPT_shallow``. ``prompt_learner.token_prefix / token_suffix /
    complete_text_embeddings`` are the training class names' embeddings (dropped, as the official loader drops
    them). **The token embedding is not in the file** (the official model keeps only those class embeddings): it
    is taken from the CLIP checkpoint training started from (:attr:`OfficialConversion.needs`; ``--base``).
    The file also holds ``optimizer``, ``lr_scheduler``, ``epoch``, ``max_accuracy`` and ``config``, the training
    config as a yacs ``CfgNode``: read as a plain mapping (:class:`YacsCfgNodeStandIn`) and not converted.
    -> blocks ``mean`` (full fine-tune) and ``vpt`` (prompting).
``prompt_switch`` (``bladewaltz1/PromptSwitch`` ``model/prompt_clip.py``; ``checkpoint-epochN.pth`` /
    ``model_best.pth``, the model under ``"state_dict"``): ``clip.*`` = a transformers ``CLIPModel`` plus
    ``clip.vision_model.encoder.prompt_embedding [Np, Np, C]`` and ``clip.vision_model.attn.*`` (the aggregation
    attention); ``caption_prenorm.*``, ``caption_transformer.*`` (``nn.TransformerDecoder``), ``caption_head.*``.
    -> block ``prompt_switch``.
``m2clip`` (``sallymmx/m2clip`` ``models_adapter.py``, the multimodal ``CLIP``; ``checkpoint-N.pth``, the model under
    ``"model"``): OpenAI CLIP names (``visual.*``; text ``transformer.resblocks.{i}`` with one extra last block, the
    MLM's cross-attention) plus ``visual.transformer.resblocks.{i}.adapter_pre_mlp.{fc1,conv,fc2}`` (TED enhancement)
    and ``.offset_adapter.{fc1,conv,fc2}`` (difference; ``adapter_pre_attn.*`` too in the 24x models),
    ``visual.t_adapter.{fc1,conv,fc2}`` (frame adapter), ``transformer.resblocks.{i}.adapter_pre_mlp.textad_{fc1,fc2}``
    (text adapters), ``visual.adapter_fc.*`` (linear head) and ``mlm_adapter.*`` (MLM head). ``save_model`` deletes
    every frozen parameter, so the file holds only the names containing ``adapter``: the towers (and
    ``logit_scale``) come from the CLIP checkpoint training started from (``--base``). The heads (linear, MLM), the
    MLM block and its text adapter are dropped; text adapters before attention (24x multimodal) are refused.
    -> block ``ted`` (``text_position="mlp"``, ``diff_bias=True``, the text layers that carry adapters).

``xclip`` (``microsoft/VideoX`` ``X-CLIP/models/xclip.py``, ``cct.py``, ``mit.py``, ``prompt.py``; the released
    ``k400_32_8.pth`` etc., the model under ``"model"`` beside ``optimizer``, ``lr_scheduler``, ``epoch``,
    ``max_accuracy`` and the yacs ``config``): OpenAI CLIP names for both towers and ``logit_scale``, plus per image
    layer ``visual.transformer.resblocks.{i}.message_{fc,ln,attn}.*`` (cross-frame messages), ``mit.positional_embedding
    [1, T, E]`` and ``mit.resblocks.{i}.*`` (OpenAI-style layers), ``prompts_visual_ln.*``, ``prompts_visual_proj
    [C, E]``, ``prompts_generator.{alpha, norm.*, decoder.{i}.{norm1, norm3, cross_attn.{q,k,v}_proj, cross_attn.proj,
    mlp.0, mlp.3}.*}``. Nothing is dropped; the file is complete (no ``--base``). -> block ``xclip`` (``mit_layers``,
    ``prompt_layers`` and ``max_frames`` = the training T, read from the shapes).

All five use OpenAI CLIP towers: attention heads = width / 64, QuickGELU.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vidlang.models.clip.convert import (
    _HF_IGNORED,
    _OPENAI_IGNORED,
    Rule,
    StateDict,
    _hf_rules,
    _layer_rules,
    _openai_rules,
    _rename,
    unwrap_state_dict,
)
from vidlang.models.temporal.vpt import official_prompt_keys
from vidlang.registry import Registry

__all__ = [
    "OFFICIAL_METHODS",
    "OfficialConversion",
    "UnknownKeysError",
    "convert_official",
    "detect_method",
    "load_official",
    "read_official_file",
    "sha256_of",
]

TOKEN_EMBEDDING = "text_tower.token_embedding.weight"


class UnknownKeysError(ValueError):
    """The official state dict has keys this converter does not know (they are named in the message)."""


@dataclass
class OfficialConversion:
    """What a converter returns: the vidlang state dict (``block.*`` keys included) and what it needs to be used."""

    method: str
    variant: str  # e.g. "seqTransf", "meanP", "full", "prompt"
    state_dict: StateDict
    block: str  # name in BLOCKS
    block_args: dict[str, Any]
    heads: dict[str, int]  # {"vision": h, "text": h}
    act: str = "quick_gelu"
    dropped: dict[str, str] = field(default_factory=dict)  # official key -> why it is not converted
    needs: list[str] = field(default_factory=list)  # vidlang keys the file lacks (from a base CLIP checkpoint)


OFFICIAL_METHODS: Registry[Callable[[Mapping[str, Tensor]], OfficialConversion]] = Registry("official method")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _split(sd: Mapping[str, Tensor], prefix: str) -> tuple[StateDict, StateDict]:
    """``(keys under prefix with it removed, the rest)``."""
    inner = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    rest = {k: v for k, v in sd.items() if not k.startswith(prefix)}
    return inner, rest


def _refuse_unknown(method: str, unknown: list[str]) -> None:
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise UnknownKeysError(f"{method}: {len(unknown)} key(s) of no known {method} layout: {shown}")


def _rename_checked(method: str, sd: Mapping[str, Tensor], rules: list[Rule], ignored: re.Pattern[str] | None,
                    prefix: str = "") -> StateDict:  # fmt: skip
    """:func:`_rename` with its unknown-key error turned into :class:`UnknownKeysError` naming the full keys."""
    compiled = [re.compile(_rule_regex(r.foreign)) for r in rules]
    unknown = [
        prefix + k
        for k in sd
        if not (ignored is not None and ignored.search(k)) and not any(p.match(k) for p in compiled)
    ]
    _refuse_unknown(method, unknown)
    return _rename(sd, rules, True, ignored, method)


def _rule_regex(template: str) -> str:
    groups = {"i": r"\d+", "p": r"(weight|bias)", "qkv": r"[qkv]"}
    parts = re.split(r"\{(i|p|qkv)\}", template)
    return "^" + "".join(re.escape(s) if n % 2 == 0 else groups[s] for n, s in enumerate(parts)) + "$"


def _layer_indices(sd: Mapping[str, Tensor], prefix: str) -> list[int]:
    return sorted({int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})


def _openai_heads(sd: StateDict) -> dict[str, int]:
    """OpenAI CLIP's rule (also in every official code here): heads = width / 64."""
    heads = {}
    if "image_tower.conv1.weight" in sd:
        heads["vision"] = sd["image_tower.conv1.weight"].shape[0] // 64
    if "text_tower.ln_final.weight" in sd:
        heads["text"] = sd["text_tower.ln_final.weight"].shape[0] // 64
    return heads


# ---------------------------------------------------------------------------------------------
# CLIP4Clip
# ---------------------------------------------------------------------------------------------
@OFFICIAL_METHODS.register("clip4clip")
def clip4clip_to_vidlang(sd: Mapping[str, Tensor]) -> OfficialConversion:
    method = "clip4clip"
    flat = unwrap_state_dict(sd)
    refused = [k for k in flat if k.startswith(("cross.", "similarity_dense."))]
    if refused:
        raise UnknownKeysError(
            f"{method}: a tightTransf checkpoint (keys {sorted(refused)[:3]}...); only the loose-type heads "
            "(meanP, seqLSTM, seqTransf) convert"
        )
    if "clip.visual.conv2.weight" in flat:
        raise UnknownKeysError(f"{method}: clip.visual.conv2.weight is the 3-D patch embedding (--linear_patch 3d), "
                               "which vidlang's image tower does not implement")  # fmt: skip
    clip, rest = _split(flat, "clip.")
    out = _rename_checked(method, clip, _openai_rules(), _OPENAI_IGNORED, "clip.")
    heads = _openai_heads(out)
    dropped: dict[str, str] = {}
    lstm, rest = _split(rest, "lstm_visual.")
    transf, rest = _split(rest, "transformerClip.")
    fpe = rest.pop("frame_position_embeddings.weight", None)
    _refuse_unknown(method, list(rest))
    if transf and lstm:
        raise UnknownKeysError(f"{method}: both transformerClip.* (seqTransf) and lstm_visual.* (seqLSTM) keys")
    if transf:
        if fpe is None:
            raise UnknownKeysError(f"{method}: seqTransf checkpoint without frame_position_embeddings.weight")
        rules = _layer_rules("resblocks.{i}", "block.layers.{i}", "openai")
        out.update(_rename_checked(method, transf, rules, None, "transformerClip."))
        out["block.frame_position_embedding"] = fpe  # [context, E]: row t is frame t (no resampling)
        layers = len(_layer_indices(transf, "resblocks."))
        args = {"layers": layers, "heads": heads["text"], "max_frames": int(fpe.shape[0]), "act": "quick_gelu",
                "normalize_frames": True}  # fmt: skip
        return OfficialConversion(method, "seqTransf", out, "seq_transformer", args, heads, dropped=dropped)
    if lstm:
        out.update({f"block.lstm.{k}": v for k, v in lstm.items()})
        if fpe is not None:
            dropped["frame_position_embeddings.weight"] = "seqLSTM creates it but its forward never reads it"
        return OfficialConversion(method, "seqLSTM", out, "seq_lstm", {"normalize_frames": True}, heads,
                                  dropped=dropped)  # fmt: skip
    if fpe is not None:
        raise UnknownKeysError(f"{method}: frame_position_embeddings.weight without a seqTransf / seqLSTM head")
    return OfficialConversion(method, "meanP", out, "mean", {"normalize_frames": True}, heads, dropped=dropped)


# ---------------------------------------------------------------------------------------------
# ViFi-CLIP
# ---------------------------------------------------------------------------------------------
_VIFI_CLASS_BUFFERS = {
    "prompt_learner.token_prefix": "SOT embedding of the training class prompts (re-made from class names)",
    "prompt_learner.token_suffix": "embeddings of the training class names (re-made from class names)",
    "prompt_learner.complete_text_embeddings": "embeddings of the training class prompts (re-made from class names)",
}


def _vifi_rules() -> list[Rule]:
    """OpenAI CLIP's rules with ViFi-CLIP's module names (``image_encoder`` = ``visual``, ``text_encoder.*``)."""
    out = []
    for r in _openai_rules():
        if r.foreign.startswith("visual."):
            out.append(Rule("image_encoder." + r.foreign[len("visual.") :], r.native, r.op))
        elif r.foreign == "token_embedding.weight":
            continue  # not part of the official model (see the module docstring)
        elif r.foreign == "logit_scale":
            out.append(r)
        else:
            out.append(Rule("text_encoder." + r.foreign, r.native, r.op))
    return out


@OFFICIAL_METHODS.register("vifi_clip")
def vifi_clip_to_vidlang(sd: Mapping[str, Tensor]) -> OfficialConversion:
    method = "vifi_clip"
    flat = unwrap_state_dict(sd)
    dropped = {k: why for k, why in _VIFI_CLASS_BUFFERS.items() if k in flat}
    v_deep = _layer_indices(
        {k: None for k in flat if k.endswith(".VPT_shallow")}, "image_encoder.transformer.resblocks."
    )
    t_deep = _layer_indices(
        {k: None for k in flat if k.endswith(".VPT_shallow")}, "text_encoder.transformer.resblocks."
    )
    prompt = "image_encoder.VPT" in flat or "prompt_learner.ctx" in flat or v_deep or t_deep
    towers = {k: v for k, v in flat.items() if k not in dropped and not k.endswith(".VPT_shallow")
              and k not in ("image_encoder.VPT", "prompt_learner.ctx")}  # fmt: skip
    out = _rename_checked(method, towers, _vifi_rules(), _OPENAI_IGNORED)
    heads = _openai_heads(out)
    needs = [] if TOKEN_EMBEDDING in out else [TOKEN_EMBEDDING]
    if not prompt:
        return OfficialConversion(method, "full", out, "mean", {}, heads, dropped=dropped, needs=needs)
    depth = 1 + len(v_deep) if "image_encoder.VPT" in flat else 0
    text_depth = 1 + len(t_deep) if "prompt_learner.ctx" in flat else 0
    keys = official_prompt_keys(depth, text_depth)
    have = {k for k in flat if k.endswith(".VPT_shallow") or k in ("image_encoder.VPT", "prompt_learner.ctx")}
    if have != set(keys):
        raise UnknownKeysError(
            f"{method}: prompts not in the official layer order (expected layers 1..depth-1 after the first): "
            f"unexpected {sorted(have - set(keys))[:4]}, missing {sorted(set(keys) - have)[:4]}"
        )
    args: dict[str, Any] = {"depth": depth, "text_depth": text_depth, "text_placement": "overwrite", "ctx_init": None}
    for name, n_key in (("vision_prompts", "n_vision"), ("text_prompts", "n_text")):
        rows = sorted(((i, flat[k]) for k, (dst, i) in keys.items() if dst == name), key=lambda r: r[0])
        if rows:
            shapes = {tuple(t.shape) for _, t in rows}
            if len(shapes) != 1:
                raise UnknownKeysError(f"{method}: {name} of different shapes {sorted(shapes)}")
            out[f"block.{name}"] = torch.stack([t for _, t in rows])  # [depth, n, C]
            args[n_key] = int(rows[0][1].shape[0])
        else:
            args[n_key] = 0
    return OfficialConversion(method, "prompt", out, "vpt", args, heads, dropped=dropped, needs=needs)


# ---------------------------------------------------------------------------------------------
# Prompt Switch
# ---------------------------------------------------------------------------------------------
_PS_BLOCK = {
    "vision_model.encoder.prompt_embedding": "block.prompts",
    "vision_model.attn.in_proj_weight": "block.aggregate.in_proj_weight",
    "vision_model.attn.in_proj_bias": "block.aggregate.in_proj_bias",
    "vision_model.attn.out_proj.weight": "block.aggregate.out_proj.weight",
    "vision_model.attn.out_proj.bias": "block.aggregate.out_proj.bias",
}
_PS_CAPTION = re.compile(
    r"^caption_transformer\.(layers\.\d+\.(self_attn|multihead_attn)\.(in_proj_weight|in_proj_bias|out_proj\.(weight|bias))"
    r"|layers\.\d+\.(linear1|linear2|norm1|norm2|norm3)\.(weight|bias)|norm\.(weight|bias))$"
)


@OFFICIAL_METHODS.register("prompt_switch")
def prompt_switch_to_vidlang(sd: Mapping[str, Tensor]) -> OfficialConversion:
    method = "prompt_switch"
    flat = unwrap_state_dict(sd)
    clip, rest = _split(flat, "clip.")
    block = {_PS_BLOCK[k]: clip.pop(k) for k in list(clip) if k in _PS_BLOCK}
    if "block.prompts" not in block:
        raise UnknownKeysError(f"{method}: no clip.vision_model.encoder.prompt_embedding (the prompt cube)")
    out = _rename_checked(method, clip, _hf_rules(), _HF_IGNORED, "clip.")
    heads = _openai_heads(out)
    caption = {}
    unknown = []
    for k, v in rest.items():
        if k.startswith("caption_prenorm."):
            caption["block.caption_head.prenorm." + k[len("caption_prenorm.") :]] = v
        elif k.startswith("caption_head.") and k.split(".", 1)[1] in ("weight", "bias"):
            caption["block.caption_head." + k.replace("caption_head.", "head.", 1)] = v
        elif _PS_CAPTION.match(k):
            caption["block.caption_head.decoder." + k[len("caption_transformer.") :]] = v
        else:
            unknown.append(k)
    _refuse_unknown(method, unknown)
    out.update(block)
    out.update(caption)
    np_ = int(block["block.prompts"].shape[0])
    args: dict[str, Any] = {"num_prompts": np_, "caption": bool(caption)}
    if caption:
        args["caption_layers"] = len(_layer_indices(caption, "block.caption_head.decoder.layers."))
        args["caption_heads"] = heads["text"]  # official: the text config's heads
    return OfficialConversion(method, "prompt_switch", out, "prompt_switch", args, heads)


# ---------------------------------------------------------------------------------------------
# M2-CLIP
# ---------------------------------------------------------------------------------------------
_M2_TED = {"fc1": "enh_down", "conv": "enh_conv", "fc2": "enh_up", "offset_adapter.fc1": "diff_down",
           "offset_adapter.conv": "diff_conv", "offset_adapter.fc2": "diff_up"}  # fmt: skip
_M2_VISION = re.compile(
    r"^visual\.transformer\.resblocks\.(\d+)\.adapter_pre_(attn|mlp)\.((?:offset_adapter\.)?(?:fc1|conv|fc2))"
    r"\.(weight|bias)$"
)
_M2_TEXT = re.compile(r"^transformer\.resblocks\.(\d+)\.adapter_pre_(attn|mlp)\.textad_(fc1|fc2)\.(weight|bias)$")
_M2_FRAME = re.compile(r"^visual\.t_adapter\.(fc1|conv|fc2)\.(weight|bias)$")
_M2_FRAME_NAMES = {"fc1": "down", "conv": "conv", "fc2": "up"}
_M2_DROPPED = {
    r"^visual\.adapter_fc\.(weight|bias)$": "the visual linear classification head (its acc1_fc score; it reads the "
    "frame-mean CLS before the projection), not part of the video / text embeddings",
    r"^mlm_adapter\.": "the MLM head of the training loss (word-level vocabulary), not part of the embeddings",
}


@OFFICIAL_METHODS.register("m2clip")
def m2clip_to_vidlang(sd: Mapping[str, Tensor]) -> OfficialConversion:
    """M2-CLIP's multimodal adapter CLIP (``models_adapter.CLIP``) -> CLIP towers + block ``ted``.

    ``save_model`` keeps only the trained parameters (every name containing ``adapter``), so a released file holds
    the adapters alone; the towers come from the CLIP checkpoint training started from (``--base``). Where the file
    also holds tower weights, they are converted (the last text block, the MLM's cross-attention, is dropped).
    """
    method = "m2clip"
    flat = unwrap_state_dict(sd)
    out: StateDict = {}
    dropped: dict[str, str] = {}
    vision: dict[tuple[str, int], set[str]] = {}
    text_idx: dict[int, list[str]] = {}
    rest: dict[str, Tensor] = {}
    for k, v in flat.items():
        if m := _M2_VISION.match(k):
            i, pos, name, p = int(m.group(1)), m.group(2), m.group(3), m.group(4)
            out[f"block.adapters.{pos}.{i}.{_M2_TED[name]}.{p}"] = v
            vision.setdefault((pos, i), set()).add(name)
        elif m := _M2_FRAME.match(k):
            out[f"block.frame_adapter.{_M2_FRAME_NAMES[m.group(1)]}.{m.group(2)}"] = v
        elif m := _M2_TEXT.match(k):
            text_idx.setdefault(int(m.group(1)), []).append(k)
        elif why := next((w for pat, w in _M2_DROPPED.items() if re.match(pat, k)), None):
            dropped[k] = why
        else:
            rest[k] = v
    if not vision or "block.frame_adapter.down.weight" not in out:
        raise UnknownKeysError(f"{method}: no visual.transformer.resblocks.*.adapter_pre_mlp / visual.t_adapter "
                               "keys (not an M2-CLIP multimodal adapter checkpoint)")  # fmt: skip
    # the text transformer has one block more than CLIP's: the last, used only by the MLM (forward runs i < 12)
    tower_blocks = _layer_indices(rest, "transformer.resblocks.")
    mlm_block = tower_blocks[-1] if tower_blocks else max(text_idx, default=-1)
    for k in list(rest):
        if k.startswith(f"transformer.resblocks.{mlm_block}."):
            dropped[k] = "the MLM cross-attention block (a frozen copy of the last CLIP text layer), training only"
            del rest[k]
    for i in sorted(text_idx):
        for k in text_idx[i]:
            m = _M2_TEXT.match(k)
            if m is None or i == mlm_block:
                dropped[k] = "text adapter of the MLM cross-attention block (training only)"
            elif m.group(2) == "attn":
                raise UnknownKeysError(
                    f"{method}: {k}: a text adapter before attention (the 24x multimodal model); vidlang's ted text "
                    "adapters sit before the MLP or after the layer only"
                )
            else:
                out[f"block.text_adapters.{i}.{'down' if m.group(3) == 'fc1' else 'up'}.{m.group(4)}"] = flat[k]
    towers = bool(rest)
    if towers:
        out.update(_rename_checked(method, rest, _openai_rules(), _OPENAI_IGNORED))
    positions = sorted({pos for pos, _ in vision})
    layers = sorted({i for _, i in vision})
    incomplete = [f"{pos} {i}" for pos in positions for i in layers if len(vision.get((pos, i), ())) != len(_M2_TED)]
    if incomplete or layers != list(range(len(layers))):
        raise UnknownKeysError(f"{method}: visual adapters not in every layer with all six of their linear / conv "
                               f"layers (layers {layers}; incomplete: {incomplete[:4]})")  # fmt: skip
    n_vision = len(_layer_indices(rest, "visual.transformer.resblocks.")) if towers else len(layers)
    if n_vision != len(layers):
        raise UnknownKeysError(f"{method}: visual adapters in {len(layers)} of the {n_vision} layers")
    first = out[f"block.adapters.{positions[-1]}.0.enh_down.weight"]  # [r, C]
    text_layers = sorted(i for i in text_idx if i != mlm_block)
    args: dict[str, Any] = {
        "variant": "24x" if "attn" in positions else "12x",
        "bottleneck": int(first.shape[0]),
        "kernel_t": int(out[f"block.adapters.{positions[-1]}.0.enh_conv.weight"].shape[-1]),
        "text_layers": text_layers,
        "text_bottleneck": int(out[f"block.text_adapters.{text_layers[0]}.down.weight"].shape[0]) if text_layers
        else 384,
        "frame_adapter": True,
        "text_position": "mlp",
        "text_up_init": "random",
        "diff_bias": True,
    }
    if positions == ["attn"]:
        raise UnknownKeysError(f"{method}: visual adapters before attention only (no adapter_pre_mlp)")
    heads = _openai_heads(out)
    needs = [] if towers else ["image_tower.*", "text_tower.*", "logit_scale"]
    return OfficialConversion(method, args["variant"], out, "ted", args, heads, dropped=dropped, needs=needs)


# ---------------------------------------------------------------------------------------------
# X-CLIP
# ---------------------------------------------------------------------------------------------
_XCLIP_MIT_POSITIONS = "mit.positional_embedding"  # [1, T, E] -> block.mit.frame_position_embedding [T, E]


def _xclip_rules() -> list[Rule]:
    """X-CLIP's new modules -> ``block.*`` (the towers: OpenAI CLIP's rules)."""
    m, bm = "visual.transformer.resblocks.{i}.", "block.messages.{i}."
    g, bg = "prompts_generator.decoder.{i}.", "block.generator.layers.{i}."
    return [
        Rule(f"{m}message_fc.{{p}}", f"{bm}fc.{{p}}"),
        Rule(f"{m}message_ln.{{p}}", f"{bm}ln.{{p}}"),
        Rule(f"{m}message_attn.in_proj_weight", f"{bm}attn.in_proj_weight"),
        Rule(f"{m}message_attn.in_proj_bias", f"{bm}attn.in_proj_bias"),
        Rule(f"{m}message_attn.out_proj.{{p}}", f"{bm}attn.out_proj.{{p}}"),
        *_layer_rules("mit.resblocks.{i}", "block.mit.layers.{i}", "openai"),
        Rule("prompts_visual_ln.{p}", "block.visual_ln.{p}"),
        Rule("prompts_visual_proj", "block.visual_proj"),
        Rule("prompts_generator.alpha", "block.generator.alpha"),
        Rule("prompts_generator.norm.{p}", "block.generator.norm.{p}"),
        Rule(f"{g}norm1.{{p}}", f"{bg}norm1.{{p}}"),
        Rule(f"{g}norm3.{{p}}", f"{bg}norm2.{{p}}"),
        Rule(f"{g}cross_attn.q_proj.weight", f"{bg}cross_attn.q.weight"),
        Rule(f"{g}cross_attn.k_proj.weight", f"{bg}cross_attn.k.weight"),
        Rule(f"{g}cross_attn.v_proj.weight", f"{bg}cross_attn.v.weight"),
        Rule(f"{g}cross_attn.proj.{{p}}", f"{bg}cross_attn.out.{{p}}"),
        Rule(f"{g}mlp.0.{{p}}", f"{bg}mlp.0.{{p}}"),
        Rule(f"{g}mlp.3.{{p}}", f"{bg}mlp.3.{{p}}"),
    ]


@OFFICIAL_METHODS.register("xclip")
def xclip_to_vidlang(sd: Mapping[str, Tensor]) -> OfficialConversion:
    method = "xclip"
    flat = dict(unwrap_state_dict(sd))
    positions = flat.pop(_XCLIP_MIT_POSITIONS, None)
    if positions is None or positions.ndim != 3 or positions.shape[0] != 1:
        shape = None if positions is None else tuple(positions.shape)
        raise UnknownKeysError(f"{method}: {_XCLIP_MIT_POSITIONS} must be [1, T, E] (the MIT), got {shape}")
    out = _rename_checked(method, flat, _openai_rules() + _xclip_rules(), _OPENAI_IGNORED)
    out["block.mit.frame_position_embedding"] = positions[0]  # [T, E]
    layers = _layer_indices(flat, "visual.transformer.resblocks.")
    messages = _layer_indices({k: None for k in flat if ".message_fc." in k}, "visual.transformer.resblocks.")
    if messages != layers:
        raise UnknownKeysError(f"{method}: cross-frame message modules in layers {messages}, the image tower has "
                               f"{layers} (every layer carries one)")  # fmt: skip
    decoder = _layer_indices(flat, "prompts_generator.decoder.")
    mit = _layer_indices(flat, "mit.resblocks.")
    if not decoder or not mit or "prompts_generator.alpha" not in flat:
        raise UnknownKeysError(f"{method}: an X-CLIP checkpoint has the prompt generator (prompts_generator.alpha, "
                               f"decoder layers: {decoder}) and the MIT layers ({mit})")  # fmt: skip
    frames = int(positions.shape[1])
    args = {"mit_layers": len(mit), "max_frames": frames, "prompt_layers": len(decoder)}
    return OfficialConversion(method, f"T{frames}", out, "xclip", args, _openai_heads(out))


# ---------------------------------------------------------------------------------------------
# detection and entry point
# ---------------------------------------------------------------------------------------------
def detect_method(sd: Mapping[str, Any]) -> str:
    """The official method whose layout ``sd`` has (raises ``ValueError`` when none)."""
    keys = set(unwrap_state_dict(sd))
    if "clip.vision_model.encoder.prompt_embedding" in keys:
        return "prompt_switch"
    if any(k.startswith("image_encoder.") for k in keys) and any(k.startswith("text_encoder.") for k in keys):
        return "vifi_clip"
    if "clip.visual.conv1.weight" in keys:
        return "clip4clip"
    if "visual.t_adapter.fc1.weight" in keys:
        return "m2clip"
    if "prompts_generator.alpha" in keys and "visual.transformer.resblocks.0.message_fc.weight" in keys:
        return "xclip"
    raise ValueError(f"no known official layout ({', '.join(OFFICIAL_METHODS.names())}) has keys such as "
                     f"{sorted(keys)[:5]}")  # fmt: skip


def convert_official(sd: Mapping[str, Any], method: str | None = None) -> OfficialConversion:
    """Convert an official state dict (``method`` detected from the keys when ``None``)."""
    return OFFICIAL_METHODS.get(method or detect_method(sd))(sd)


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class YacsCfgNodeStandIn:
    """What ``yacs.config.CfgNode`` (the training config ViFi-CLIP's ``epoch_saving`` stores under ``"config"``)
    becomes when an official file is read: a plain ``OrderedDict`` of the config's entries, its yacs flags
    (``__immutable__``, ...) as attributes. Nothing of yacs is imported or run.

    ``torch.load(weights_only=True)`` fills a pickled mapping only when its type is exactly ``dict`` / ``OrderedDict``
    (a ``dict`` subclass is refused at ``SETITEMS``), so this class is only a factory: the pickle's ``NEWOBJ``
    calls ``__new__``, which returns an empty ``OrderedDict``; the pickle then fills it with plain data.
    """

    def __new__(cls, *args: Any) -> OrderedDict:  # type: ignore[misc]
        return OrderedDict()


OFFICIAL_SAFE_GLOBALS: list[tuple[Any, str]] = [(YacsCfgNodeStandIn, "yacs.config.CfgNode")]
"""Globals the official files carry beside their weights, allowed (as stand-ins) only while reading them."""


def read_official_file(path: str | Path) -> Any:
    """:func:`~vidlang.models.clip.pretrained.read_state_file` with :data:`OFFICIAL_SAFE_GLOBALS` allowed (only
    here, not for vidlang's other readers); every other global is still refused, named, as there."""
    from vidlang.models.clip.pretrained import read_state_file

    with torch.serialization.safe_globals(OFFICIAL_SAFE_GLOBALS):
        return read_state_file(path)


def load_official(
    path: str | Path,
    method: str | None = None,
    base: str | Path | None = None,
    dtype: torch.dtype | None = torch.float32,
) -> tuple[StateDict, dict[str, Any]]:
    """Read an official checkpoint file safely and convert it: ``(vidlang state dict, info)``.

    ``info`` is :func:`vidlang.models.clip.pretrained.load_pretrained`'s, plus ``official`` (method, variant,
    sha256 of the file, the block and its arguments, the dropped keys with reasons, the keys taken from ``base``)
    and ``converted_from_extra`` (what :func:`~vidlang.models.clip.pretrained.save_vidlang` records).
    ``base``: a CLIP checkpoint (any format ``load_pretrained`` reads) for what the file lacks (ViFi-CLIP's token
    embedding; M2-CLIP's towers): a key, or ``prefix.*`` for every key under it; without it such a file is
    refused, naming the keys.
    """
    from vidlang.models.clip.pretrained import _check_tower_keys, load_pretrained, resolve_towers

    path = Path(path)
    raw = read_official_file(path)
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: not a checkpoint (it holds a {type(raw).__name__}, not a state dict)")
    try:
        conv = convert_official(raw, method)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None
    sd = dict(conv.state_dict)
    taken: list[str] = []
    if conv.needs:
        if base is None:
            raise ValueError(
                f"{path}: the {conv.method} checkpoint does not contain {', '.join(conv.needs)} (the official code "
                "never stores it); pass the CLIP checkpoint its training started from (--base, e.g. OpenAI's "
                "ViT-B-16.pt) to take it from there"
            )
        base_sd, _ = load_pretrained(base, dtype=None, on_unknown="omit")
        for key in conv.needs:  # a key, or "prefix.*": every key under it
            keys = [k for k in base_sd if k.startswith(key[:-1])] if key.endswith(".*") else [key] * (key in base_sd)
            if not keys:
                raise ValueError(f"{base}: the base checkpoint has no {key}")
            for k in keys:
                sd[k] = base_sd[k]
            taken.append(key)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    heads = {**_openai_heads(sd), **conv.heads}  # what the file lacks: from the base towers, same rule
    hints = {"vision": {"heads": heads.get("vision"), "act": conv.act},
             "text": {"heads": heads.get("text"), "act": conv.act}}  # fmt: skip
    vision, text, meta = resolve_towers(sd, "vidlang", str(path), hints)
    meta["heads_source"] = {k: f"{conv.method} (width / 64)" for k in meta["heads_source"]}
    meta["act_source"] = f"{conv.method} uses OpenAI CLIP's {conv.act}"
    _check_tower_keys(sd, vision, text, str(path))
    official = {
        "method": conv.method,
        "variant": conv.variant,
        "sha256": sha256_of(path),
        "block": {"name": conv.block, "args": conv.block_args},
        "dropped": conv.dropped,
        "from_base": {"source": str(base), "keys": taken} if taken else None,
    }
    info = {"format": conv.method, "source": str(path), "vision": vision, "text": text, "tokenizer_dir": None,
            **meta, "official": official, "converted_from_extra": official}  # fmt: skip
    return sd, info
