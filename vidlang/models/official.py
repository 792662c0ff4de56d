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
``ila`` (``Francis-Rings/ILA`` ``models/xclip.py``; ``best.pth``, the model under ``"model"``, ``module.`` keys):
    OpenAI CLIP names plus, in every visual layer, ``message_fc`` / ``message_ln`` / ``message_attn.*`` (the
    alignment) and ``temporal_skip_fc`` / ``temporal_skip_align_fc``; ``mit.*`` (MIT pooling); the K400 model's
    X-CLIP prompt generator (``prompts_*``, never optimised in the release: random, yet it changes every class
    logit). -> block ``ila`` (``pool: mit``, ``video_prompts: true`` when the file has the generator).
``mugstan`` (``farewellthree/STAN`` mmaction ``CLIPSimilarity_split``; mmengine files, the model under
    ``"state_dict"``): ``backbone.*`` (transformers CLIP vision names + ``STAN_S_layers`` / ``STAN_T_layers`` /
    ``STAN_time_embed``) and ``text_backbone.*``. -> block ``stan`` (Mug-STAN scores with ``similarity: mug``).
``videollama`` (``DAMO-NLP-SG/Video-LLaMA`` ``video_llama.py``; the runner's ``checkpoint_*.pth``, trained
    parameters under ``"model"``): ``video_Qformer.bert.*``, ``video_query_tokens``,
    ``video_frame_position_embedding``, ``llama_proj`` -> block ``qformer`` (+ ``llm_proj``); the CLIP towers
    come from ``--base`` (the block reads CLIP frame tokens where Video-LLaMA reads its BLIP-2 image Q-former's).

All use OpenAI CLIP's head rule (heads = width / 64) and QuickGELU in the towers.
What a converter adds that the file does not hold (ILA's jitter offsets, Mug-STAN's fixed logit scale, the
Q-former's zero retrieval head) is listed with its reason (:attr:`OfficialConversion.added`, ``converted_from``).
"""

from __future__ import annotations

import hashlib
import math
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
    added: dict[str, str] = field(default_factory=dict)  # vidlang key not from the file -> what it holds and why
    check: Callable[[StateDict], None] | None = None  # run on the final state dict (base keys merged in)


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
    return [
        Rule(f"{m}message_fc.{{p}}", f"{bm}fc.{{p}}"),
        Rule(f"{m}message_ln.{{p}}", f"{bm}ln.{{p}}"),
        Rule(f"{m}message_attn.in_proj_weight", f"{bm}attn.in_proj_weight"),
        Rule(f"{m}message_attn.in_proj_bias", f"{bm}attn.in_proj_bias"),
        Rule(f"{m}message_attn.out_proj.{{p}}", f"{bm}attn.out_proj.{{p}}"),
        *_layer_rules("mit.resblocks.{i}", "block.mit.layers.{i}", "openai"),
        *_video_prompt_rules(),
    ]


def _video_prompt_rules() -> list[Rule]:
    """X-CLIP's video-specific prompt generator (``prompts_*``, also in ILA's K400 model) -> ``block.visual_ln``,
    ``block.visual_proj``, ``block.generator.*`` (:mod:`vidlang.models.temporal.video_prompts`)."""
    g, bg = "prompts_generator.decoder.{i}.", "block.generator.layers.{i}."
    return [
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
# ILA
# ---------------------------------------------------------------------------------------------
_ILA_MSG = "visual.transformer.resblocks."
# official name inside a MultiAxisAttentionBlock -> name inside vidlang's ILALayer (interactive_block indices are
# the same in both: K400 = [dwsep, conv, BN, ReLU], SSv2 = [conv, BN, ReLU, conv, BN, ReLU])
_ILA_LAYER = [
    (r"message_fc\.(weight|bias)", r"message_fc.\1"),
    (r"message_ln\.(weight|bias)", r"message_ln.\1"),
    (r"temporal_skip_fc\.(weight|bias)", r"skip_fc.\1"),
    (r"temporal_skip_align_fc\.(weight|bias)", r"align_fc.\1"),
    (r"message_attn\.interactive_block\.0\.depthwise_conv\.([01])\.(\w+)", r"interact.0.depthwise.\1.\2"),
    (r"message_attn\.interactive_block\.0\.pointwise_conv\.([01])\.(\w+)", r"interact.0.pointwise.\1.\2"),
    (r"message_attn\.interactive_block\.(\d)\.(\w+)", r"interact.\1.\2"),
    (r"message_attn\.prediction_block\.([0145])\.(\w+)", r"point_conv.\1.\2"),
    (r"message_attn\.prediction_block\.10\.(weight|bias)", r"point_fc.0.\1"),
    (r"message_attn\.prediction_block\.12\.(weight|bias)", r"point_out.\1"),
    (r"message_attn\.fc\.(weight|bias)", r"feature_fc.\1"),
    (r"message_attn\.conv\.(weight|bias)", r"time_conv.\1"),
]
_ILA_LAYER_RE = [(re.compile("^" + pat + "$"), dst) for pat, dst in _ILA_LAYER]


@OFFICIAL_METHODS.register("ila")
def ila_to_vidlang(sd: Mapping[str, Tensor]) -> OfficialConversion:
    """ILA (``Francis-Rings/ILA``, ``models/xclip.py`` ``XCLIP`` with ``mat.MultiAxisTransformer``; ``best.pth`` /
    ``ckpt_epoch_N.pth``, the model under ``"model"``, DDP ``module.`` keys) -> CLIP towers + block ``ila``.

    The visual layers are OpenAI CLIP layers plus, per layer, ``message_fc``, ``message_ln``, ``message_attn.*``
    (the alignment: ``interactive_block``, ``prediction_block``, ``conv``, ``fc``) and the zero-initialised
    ``temporal_skip_fc`` / ``temporal_skip_align_fc``; ``mit.*`` is X-CLIP's MIT pooling (block ``pool: mit``).
    The K400 model's X-CLIP prompt generator (``prompts_generator.*``, ``prompts_visual_ln.*``,
    ``prompts_visual_proj``; never optimised by the released code, so random, but it changes every class logit) ->
    ``block_args.video_prompts: true`` (frozen there), ``prompt_layers`` from the file.
    """
    from vidlang.models.temporal.ila import jitter_offsets

    method = "ila"
    flat = unwrap_state_dict(sd)
    out: StateDict = {}
    dropped: dict[str, str] = {}
    added: dict[str, str] = {}
    rest: dict[str, Tensor] = {}
    mit: dict[str, Tensor] = {}
    prompts: dict[str, Tensor] = {}
    for k, v in flat.items():
        if k.startswith(("prompts_generator.", "prompts_visual_ln.")) or k == "prompts_visual_proj":
            prompts[k] = v
        elif k.startswith("mit."):
            mit[k[len("mit.") :]] = v
        elif k.startswith(_ILA_MSG) and not re.match(r"^\d+\.(attn|ln_1|mlp|ln_2)\.", k[len(_ILA_MSG) :]):
            i, tail = k[len(_ILA_MSG) :].split(".", 1)
            for pat, dst in _ILA_LAYER_RE:
                if pat.match(tail):
                    out[f"block.layers.{int(i)}." + pat.sub(dst, tail)] = v
                    break
            else:
                rest[k] = v  # refused below, by name
        else:
            rest[k] = v
    layers = _layer_indices(out, "block.layers.")
    if not layers:
        raise UnknownKeysError(f"{method}: no visual.transformer.resblocks.*.message_attn keys (not an ILA checkpoint)")
    out.update(_rename_checked(method, rest, _openai_rules(), _OPENAI_IGNORED))
    n_vision = len(_layer_indices(out, "image_tower.layers."))
    if layers != list(range(n_vision)):
        raise UnknownKeysError(f"{method}: alignment modules in layers {layers} of the {n_vision} visual layers "
                               "(the released model has one in every layer)")  # fmt: skip
    depthwise = "block.layers.0.interact.0.depthwise.0.weight" in out
    hidden = int(out["block.layers.0.interact.1.weight"].shape[0]) if depthwise else \
        int(out["block.layers.0.interact.0.weight"].shape[0])  # fmt: skip
    for i in layers:
        out[f"block.layers.{i}.offsets"] = jitter_offsets(0.2)
    added["block.layers.*.offsets"] = ("the 9 training jitter offsets (delta 0.2): the released code keeps them as a "
                                       "plain tensor, not saved, that restarts at 0.2 when a checkpoint is loaded")
    args: dict[str, Any] = {"hidden": hidden, "interaction": "dwsep" if depthwise else "conv", "pool": "mean"}
    if mit:
        pe = mit.pop("positional_embedding", None)
        if pe is None or pe.dim() != 3:
            raise UnknownKeysError(f"{method}: mit.* keys without mit.positional_embedding [1, T, E]")
        rules = _layer_rules("resblocks.{i}", "block.pooler.layers.{i}", "openai")
        out.update(_rename_checked(method, mit, rules, None, "mit."))
        out["block.pooler.frame_position_embedding"] = pe[0]  # [T, E]
        args.update(pool="mit", mit_layers=len(_layer_indices(mit, "resblocks.")), max_frames=int(pe.shape[1]))
    if prompts:
        decoder = _layer_indices(prompts, "prompts_generator.decoder.")
        missing = [k for k in ("prompts_generator.alpha", "prompts_visual_proj", "prompts_visual_ln.weight")
                   if k not in prompts] + ([] if decoder else ["prompts_generator.decoder.*"])  # fmt: skip
        if missing:
            raise UnknownKeysError(f"{method}: the prompt generator (prompts_*) is incomplete: no {missing}")
        out.update(_rename_checked(method, prompts, _video_prompt_rules(), None))
        args.update(video_prompts=True, prompt_layers=len(decoder))
    heads = _openai_heads(out)
    variant = ("k400" if depthwise else "ssv2") + ("" if mit else "-nomit")
    return OfficialConversion(method, variant, out, "ila", args, heads, dropped=dropped, added=added)


# ---------------------------------------------------------------------------------------------
# Mug-STAN / STAN
# ---------------------------------------------------------------------------------------------
_STAN_TOWER = {  # mmaction's VITCLIPPretrained attribute -> transformers CLIPModel name (then _hf_rules)
    "backbone.class_embedding": "vision_model.embeddings.class_embedding",
    "backbone.patch_embedding.weight": "vision_model.embeddings.patch_embedding.weight",
    "backbone.position_embedding.weight": "vision_model.embeddings.position_embedding.weight",
    "backbone.visual_projection.weight": "visual_projection.weight",
    "text_backbone.text_projection.weight": "text_projection.weight",
}
_STAN_TOWER_PREFIX = {"backbone.pre_layrnorm.": "vision_model.pre_layrnorm.",
                      "backbone.post_layernorm.": "vision_model.post_layernorm.",
                      "backbone.layers.": "vision_model.encoder.layers.",
                      "text_backbone.text_model.": "text_model."}  # fmt: skip
_STAN_T = re.compile(r"^backbone\.STAN_T_layers\.(\d+)\.(self_attn\.([qkv])_proj|self_attn\.out_proj|layer_norm1|"
                     r"temporal_fc)\.(weight|bias)$")  # fmt: skip


@OFFICIAL_METHODS.register("mugstan")
def mugstan_to_vidlang(sd: Mapping[str, Tensor]) -> OfficialConversion:
    """Mug-STAN / STAN (``farewellthree/STAN``, mmaction2 ``CLIPSimilarity_split`` with ``VITCLIPPretrained_STAN``
    and ``CLIPTextPretrained``; mmengine checkpoints, the model under ``"state_dict"``) -> towers + block ``stan``.

    ``backbone.*`` = a transformers CLIP vision model (``layers``, ``pre_layrnorm``, ...) plus the branch:
    ``STAN_S_layers.{j}`` (CLIP layers), ``STAN_T_layers.{j}`` (``self_attn``, ``layer_norm1``, ``temporal_fc``),
    ``STAN_time_embed``; ``text_backbone.*`` = ``text_model`` + ``text_projection``. STAN and Mug-STAN share the
    weights: Mug-STAN scores with the parameter-free Mug head on per-frame embeddings and projected word tokens
    (``similarity: mug``), STAN with the cosine of the frame mean; the file does not say which.
    """
    method = "mugstan"
    flat = unwrap_state_dict(sd)
    hf: dict[str, Tensor] = {}
    out: StateDict = {}
    dropped: dict[str, str] = {}
    unknown: list[str] = []
    spatial: dict[str, Tensor] = {}
    for k, v in flat.items():
        if k in _STAN_TOWER:
            hf[_STAN_TOWER[k]] = v
        elif pre := next((p for p in _STAN_TOWER_PREFIX if k.startswith(p)), None):
            hf[_STAN_TOWER_PREFIX[pre] + k[len(pre) :]] = v
        elif k.startswith("backbone.STAN_S_layers."):
            spatial[k[len("backbone.STAN_S_layers.") :]] = v
        elif m := _STAN_T.match(k):
            j, name, qkv, p = m.group(1), m.group(2), m.group(3), m.group(4)
            if qkv:
                hf[f"__stan_t.{j}.{qkv}.{p}"] = v  # fused below
            else:
                dst = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln", "temporal_fc": "fc"}[name]
                out[f"block.temporal.{j}.{dst}.{p}"] = v
        elif k == "backbone.STAN_time_embed.weight":
            out["block.temporal_embedding"] = v  # [64, C]: row t = frame t
        elif k.startswith("data_preprocessor."):
            dropped[k] = "the data preprocessor's pixel mean / std (the config's normalisation), not weights"
        else:
            unknown.append(k)
    if "backbone.patch_embedding_3d.weight" in unknown:
        raise UnknownKeysError(f"{method}: backbone.patch_embedding_3d.weight (patch_3d=True), which vidlang's image "
                               "tower does not implement")  # fmt: skip
    conv_time = [k for k in unknown if k.startswith("backbone.STAN_T_layers.")]
    if conv_time:
        raise UnknownKeysError(f"{method}: {sorted(conv_time)[:3]}: a temporal module other than the released "
                               "'selfattn' (time_module='conv' is undefined in the released code)")  # fmt: skip
    _refuse_unknown(method, unknown)
    if not spatial or "block.temporal_embedding" not in out:
        raise UnknownKeysError(f"{method}: no backbone.STAN_S_layers.* / backbone.STAN_time_embed.weight keys "
                               "(not a STAN checkpoint)")  # fmt: skip
    fused: dict[str, dict[str, Tensor]] = {}
    for k in [k for k in hf if k.startswith("__stan_t.")]:
        _, j, qkv, p = k.split(".")
        fused.setdefault(f"block.temporal.{j}.attn.qkv.{p}", {})[qkv] = hf.pop(k)
    for dst, parts in fused.items():
        if set(parts) != {"q", "k", "v"}:
            raise UnknownKeysError(f"{method}: {dst}: temporal attention without all of q/k/v projections")
        out[dst] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    out.update(_rename_checked(method, hf, _hf_rules(), _HF_IGNORED))
    rules = _layer_rules("{i}", "block.spatial.{i}", "hf")
    out.update(_rename_checked(method, spatial, rules, None, "backbone.STAN_S_layers."))
    depth = len(_layer_indices(spatial, ""))
    temporal = _layer_indices(out, "block.temporal.")
    if temporal != list(range(depth)):
        raise UnknownKeysError(f"{method}: temporal layers {temporal} for {depth} spatial branch layers")
    out["logit_scale"] = torch.tensor(math.log(100.0))
    added = {"logit_scale": "log(100): the released model scores with the fixed 1 / tau = 100 (tau 0.01); CLIP's "
                            "learnable logit scale is not part of it"}  # fmt: skip
    args: dict[str, Any] = {"depth": depth, "max_frames": int(out["block.temporal_embedding"].shape[0]),
                            "drop_path": 0.1, "time_module": "attn", "cls_residue": False}  # fmt: skip
    return OfficialConversion(method, "stan-selfattn", out, "stan", args, _openai_heads(out), dropped=dropped,
                              added=added)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Video-LLaMA (the video Q-former and its projection)
# ---------------------------------------------------------------------------------------------
_VL_LAYER = {  # BLIP-2 BertLayer (query path) -> vidlang QFormerLayer
    "attention.self.query": "self_attn.q_proj", "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj", "attention.output.dense": "self_attn.out_proj",
    "attention.output.LayerNorm": "ln_self",
    "crossattention.self.query": "cross_attn.q_proj", "crossattention.self.key": "cross_attn.k_proj",
    "crossattention.self.value": "cross_attn.v_proj", "crossattention.output.dense": "cross_attn.out_proj",
    "crossattention.output.LayerNorm": "ln_cross",
    "intermediate_query.dense": "mlp.0", "output_query.dense": "mlp.2", "output_query.LayerNorm": "ln_mlp",
}  # fmt: skip
_VL_LAYER_RE = re.compile(r"^video_Qformer\.bert\.encoder\.layer\.(\d+)\.(" + "|".join(map(re.escape, _VL_LAYER))
                          + r")\.(weight|bias)$")  # fmt: skip
_VL_DROPPED = {
    r"^video_Qformer\.bert\.embeddings\.position_ids$": "BERT's position-id buffer (the video Q-former has no "
    "position embeddings: its queries carry none)",
    r"^audio_(Qformer\.|query_tokens$|llama_proj\.|position_embedding\.)": "the audio branch (ImageBind audio "
    "Q-former); vidlang's qformer block is the video branch",
    r"^(visual_encoder|ln_vision)\.": "the frozen EVA-ViT-g image encoder; vidlang's qformer reads the CLIP image "
    "tower's frame tokens instead (a documented substitution)",
    r"^(Qformer\.|query_tokens$)": "the frozen BLIP-2 image Q-former; vidlang's qformer reads the CLIP image tower's "
    "frame tokens instead (a documented substitution)",
    r"^llama_model\.": "the language model; the chat encoder loads it from its own directory (--llm)",
}


@OFFICIAL_METHODS.register("videollama")
def videollama_to_vidlang(sd: Mapping[str, Tensor]) -> OfficialConversion:
    """Video-LLaMA's video branch (``DAMO-NLP-SG/Video-LLaMA`` ``video_llama/models/video_llama.py``; the
    checkpoints its runner saves hold the trained parameters under ``"model"``) -> block ``qformer``.

    ``video_Qformer.bert.*`` = a BLIP-2 BERT Q-former (``embeddings.LayerNorm``; per layer ``attention``,
    ``crossattention`` and the query feed-forward ``intermediate_query`` / ``output_query``; the text-path
    ``intermediate`` / ``output`` are deleted by the official constructor), ``video_query_tokens [1, Q, D]``,
    ``video_frame_position_embedding.weight [32, Dc]`` and ``llama_proj`` (-> the block's ``llm_proj``, which the
    chat encoder starts its video projection from). The file holds no CLIP towers: they come from ``--base`` (a
    CLIP whose image tower is as wide as the Q-former's frame tokens, 768 for the released models: ViT-B).
    """
    method = "videollama"
    flat = unwrap_state_dict(sd)
    out: StateDict = {}
    dropped: dict[str, str] = {}
    unknown: list[str] = []
    for k, v in flat.items():
        if m := _VL_LAYER_RE.match(k):
            out[f"block.qformer.layers.{m.group(1)}.{_VL_LAYER[m.group(2)]}.{m.group(3)}"] = v
        elif k.startswith("video_Qformer.bert.embeddings.LayerNorm.") and k.rsplit(".", 1)[1] in ("weight", "bias"):
            out[f"block.qformer.ln_queries.{k.rsplit('.', 1)[1]}"] = v
        elif k == "video_query_tokens":
            out["block.qformer.query_tokens"] = v  # [1, Q, D]
        elif k == "video_frame_position_embedding.weight":
            out["block.frame_position_embedding"] = v  # [max_frame_pos, Dc]
        elif k in ("llama_proj.weight", "llama_proj.bias"):
            out[f"block.llm_proj.{k.split('.')[1]}"] = v
        elif why := next((w for pat, w in _VL_DROPPED.items() if re.match(pat, k)), None):
            dropped[k] = why
        else:
            unknown.append(k)
    _refuse_unknown(method, unknown)
    if "block.qformer.query_tokens" not in out:
        raise UnknownKeysError(f"{method}: no video_query_tokens (not a Video-LLaMA video-branch checkpoint"
                               + ("; it holds the audio branch only" if dropped else "") + ")")  # fmt: skip
    missing = [k for k in ("block.frame_position_embedding", "block.llm_proj.weight", "block.qformer.ln_queries.weight")
               if k not in out]  # fmt: skip
    if missing:
        raise UnknownKeysError(f"{method}: the file lacks the video branch's {missing} (frozen while training, so "
                               "not saved): a checkpoint of that stage has no trained video Q-former")  # fmt: skip
    q, d = out["block.qformer.query_tokens"].shape[1:]
    ctx_w = int(out["block.frame_position_embedding"].shape[1])
    layers = _layer_indices(out, "block.qformer.layers.")
    e = int(out["block.llm_proj.weight"].shape[0])
    args: dict[str, Any] = {
        "num_queries": int(q), "num_layers": len(layers), "dim": int(d), "heads": max(1, int(d) // 64),
        "source": "tokens", "max_frames": int(out["block.frame_position_embedding"].shape[0]),
        "pool": "residual", "mlp_ratio": out["block.qformer.layers.0.mlp.0.weight"].shape[0] / int(d),
        "dropout": 0.1, "ln_eps": 1e-12, "llm_dim": e,
    }  # fmt: skip
    if int(out["block.qformer.layers.0.cross_attn.k_proj.weight"].shape[1]) != ctx_w:
        raise UnknownKeysError(f"{method}: cross-attention width differs from the frame position embedding's")
    added = {"block.embed_proj.*": "zeros: Video-LLaMA has no retrieval embedding; with pool 'residual' the "
                                   "block's video embedding starts as the frame-mean CLIP embedding"}  # fmt: skip

    def check(final: StateDict) -> None:
        width = int(final["image_tower.conv1.weight"].shape[0])
        if width != ctx_w:
            raise ValueError(f"the video Q-former reads {ctx_w}-wide frame tokens (in Video-LLaMA: its BLIP-2 image "
                             f"Q-former's) but the CLIP image tower is {width} wide: pass a CLIP with a {ctx_w}-wide "
                             "image tower as --base (ViT-B for the released models)")  # fmt: skip
        final["block.embed_proj.weight"] = torch.zeros(int(final["text_tower.text_projection"].shape[1]), int(d))
        final["block.embed_proj.bias"] = torch.zeros(int(final["text_tower.text_projection"].shape[1]))

    needs = ["image_tower.*", "text_tower.*", "logit_scale"]
    return OfficialConversion(method, "video-branch", out, "qformer", args, {}, dropped=dropped, needs=needs,
                              added=added, check=check)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# detection and entry point
# ---------------------------------------------------------------------------------------------
def detect_method(sd: Mapping[str, Any]) -> str:
    """The official method whose layout ``sd`` has (raises ``ValueError`` when none)."""
    keys = set(unwrap_state_dict(sd))
    if "visual.transformer.resblocks.0.message_attn.prediction_block.0.weight" in keys:
        return "ila"  # before any X-CLIP-like test: ILA also has mit.* / prompts_generator.* / message_fc
    if "backbone.STAN_time_embed.weight" in keys:
        return "mugstan"
    if "video_query_tokens" in keys or any(k.startswith("video_Qformer.") for k in keys):
        return "videollama"
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
    if conv.check is not None:
        try:
            conv.check(sd)
        except ValueError as e:
            raise ValueError(f"{path}: {conv.method}: {e}") from None
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
        "added": conv.added,
        "from_base": {"source": str(base), "keys": taken} if taken else None,
    }
    info = {"format": conv.method, "source": str(path), "vision": vision, "text": text, "tokenizer_dir": None,
            **meta, "official": official, "converted_from_extra": official}  # fmt: skip
    return sd, info
