"""Config -> :class:`VideoTextModel`: towers by preset name (or ``image: "timm:<timm model name>"`` for a timm
ViT, :data:`IMAGE_TOWERS`), the block by registry name, weights from a local pretrained source, freezing policy
and the optimisation recipe (``lr_mults`` / ``weight_decays``, see :meth:`VideoTextModel.param_groups`).

Freezing policies (:data:`FREEZE_POLICIES`): ``full`` (everything trains), ``frozen_backbone``
(image tower frozen; text tower, block and ``logit_scale`` train), ``frozen_text`` (text tower and ``logit_scale``
frozen; image tower and block train: X-CLIP), ``block_only`` / ``prompts_only`` (only the block trains).
``auto`` = ``block_only`` if the block's ``freeze_backbone`` else ``full``.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from vidlang.errors import ConfigError
from vidlang.models.clip.configs import (
    DEFAULT_TEXT,
    IMAGE_CONFIGS,
    ImageConfig,
    TextConfig,
    image_config,
    text_config,
)
from vidlang.models.clip.convert import TEMPORAL_EMBED_NAMES
from vidlang.models.clip.image import ClipImageTower
from vidlang.models.clip.layers import resample_pos_embed, resample_temporal_embed
from vidlang.models.clip.text import TextTower
from vidlang.models.clip.timm_tower import TimmImageTower
from vidlang.models.clip.tower_base import ImageTower
from vidlang.models.contract import TowerSpec
from vidlang.models.optim import matches
from vidlang.models.temporal import build_block
from vidlang.models.video_clip import VideoTextModel
from vidlang.registry import Registry

FREEZE_POLICIES: Registry[Callable[[VideoTextModel], None]] = Registry("freeze policy")


@dataclass
class ModelConfig:
    """Typed model config (read by LightningCLI / jsonargparse)."""

    image: str = "vit_b32"  # preset in IMAGE_CONFIGS
    text: str = "auto"  # preset in TEXT_CONFIGS; "auto" = the preset paired with ``image``
    image_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"layers": 6}
    text_overrides: dict[str, Any] = field(default_factory=dict)
    image_size: int | None = None  # None = the preset's; position embeddings are resampled
    # frames per training clip / per evaluation and inference clip (None = num_frames). Under `vidlang fit|validate|
    # test` both follow data.sampling (linked in the CLI): set them there, not here.
    num_frames: int = 8
    eval_num_frames: int | None = None
    block: str = "mean"  # name in BLOCKS
    block_args: dict[str, Any] = field(default_factory=dict)
    freeze: str = "auto"  # "auto" or a name in FREEZE_POLICIES
    # parameter-name prefix -> lr multiplier / weight decay, over the block's declared ones (VideoTextModel)
    lr_mults: dict[str, float] = field(default_factory=dict)  # e.g. {"": 0.1, "block": 10, "block.aggregate": 1}
    weight_decays: dict[str, float] = field(default_factory=dict)
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the towers' layers and the block (vidlang/models/compile.py)
    pretrained: str | None = None  # local checkpoint file or directory
    vocab_size: int | None = None  # override for from-scratch tokenizers
    context_length: int | None = None
    logit_scale_init: float = math.log(1 / 0.07)

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ConfigError(f"model.num_frames must be >= 1, got {self.num_frames}")
        if self.eval_num_frames is not None and self.eval_num_frames < 1:
            raise ConfigError(f"model.eval_num_frames must be >= 1 (or null), got {self.eval_num_frames}")
        for name, table in (("lr_mults", self.lr_mults), ("weight_decays", self.weight_decays)):
            bad = {k: v for k, v in table.items() if not isinstance(k, str) or not isinstance(v, (int, float)) or v < 0}
            if bad:
                raise ConfigError(f"model.{name} maps parameter-name prefixes to numbers >= 0; got {bad}")

    @property
    def inference_frames(self) -> int:
        """Frames per clip at evaluation and inference (search, classify, serve)."""
        return self.eval_num_frames or self.num_frames

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], strict: bool = True) -> ModelConfig:
        """A config from a plain dict, e.g. a checkpoint's hyper-parameters: keys of older versions are mapped
        (:data:`RENAMED_KEYS`); unknown keys raise :class:`ConfigError` (``strict``) or are dropped."""
        d = dict(d)
        _translate_lr_keys(d)
        for old, new in RENAMED_KEYS.items():
            if old in d:
                if new in d:
                    raise ConfigError(f"model config has both {old!r} and {new!r} (its new name); keep {new!r}")
                d[new] = d.pop(old)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown and strict:
            raise ConfigError(f"unknown model config keys {unknown}; ModelConfig takes {', '.join(sorted(names))}")
        return cls(**{k: v for k, v in d.items() if k in names})


# Keys of older ModelConfigs (checkpoints keep them in their hyper-parameters) -> their names now.
RENAMED_KEYS: dict[str, str] = {"vision": "image", "vision_overrides": "image_overrides"}
# Keys ModelConfig no longer takes -> what to write instead (a config that uses one fails with this hint;
# ModelConfig.from_dict translates them, for checkpoints written before).
REMOVED_KEYS: dict[str, str] = {
    "vision": "model.image",
    "vision_overrides": "model.image_overrides",
    "lr_mult_backbone": "model.lr_mults: {'': X} (X for every parameter that no longer prefix covers)",
    "lr_mult_block": "model.lr_mults: {block: X}",
}


def _translate_lr_keys(d: dict[str, Any]) -> None:
    """In place: the removed ``lr_mult_backbone`` / ``lr_mult_block`` of older configs -> ``lr_mults``."""
    backbone, block = d.pop("lr_mult_backbone", 1.0), d.pop("lr_mult_block", None)
    if backbone == 1.0 and block is None:
        return
    mults = dict(d.get("lr_mults") or {})
    if backbone != 1.0:
        mults.setdefault("", float(backbone))
    if block is not None:
        mults.setdefault("block", float(block))
    d["lr_mults"] = mults


def removed_key_hint(message: str) -> str | None:
    """For an error ``message`` about a key ModelConfig no longer takes: what to write instead."""
    found = [k for k in REMOVED_KEYS if re.search(rf"['.\s-]{k}\b(?![.\w])", message)]
    return "; ".join(f"model.{k} is gone: use {REMOVED_KEYS[k]}" for k in found) or None


def image_tower_kind(image: str) -> tuple[str, str]:
    """``ModelConfig.image`` -> (kind, name): ``"timm:<timm model name>"`` -> ``("timm", name)``, a preset name
    (``IMAGE_CONFIGS``) -> ``("clip", name)``."""
    kind, sep, name = image.partition(":")
    return (kind, name) if sep else ("clip", image)


def text_config_of(cfg: ModelConfig) -> TextConfig:
    """The text preset (``"auto"``: the one paired with a CLIP image preset) with the config's overrides."""
    text_name = DEFAULT_TEXT.get(cfg.image) if cfg.text == "auto" else cfg.text
    if text_name is None:
        raise ValueError(f"no default text tower for image {cfg.image!r}; set ModelConfig.text")
    tcfg = dataclasses.replace(text_config(text_name), **cfg.text_overrides)
    if cfg.vocab_size is not None:
        tcfg.vocab_size = cfg.vocab_size
    if cfg.context_length is not None:
        tcfg.context_length = cfg.context_length
    return tcfg


def resolve_configs(cfg: ModelConfig) -> tuple[ImageConfig, TextConfig]:
    """The tower configs of a CLIP image preset (a timm tower's shapes come from timm: see :data:`IMAGE_TOWERS`)."""
    kind, name = image_tower_kind(cfg.image)
    if kind != "clip":
        raise ConfigError(f"model.image {cfg.image!r} is not a CLIP preset (one of {', '.join(IMAGE_CONFIGS.names())})")
    vcfg = dataclasses.replace(image_config(name), **cfg.image_overrides)
    tcfg = text_config_of(cfg)
    if cfg.image_size is not None:
        vcfg.image_size = cfg.image_size
    if vcfg.embed_dim != tcfg.embed_dim:
        raise ValueError(
            f"image {cfg.image!r} embeds to {vcfg.embed_dim} but text {cfg.text!r} to {tcfg.embed_dim}; "
            "pick matching presets or override embed_dim"
        )
    return vcfg, tcfg


# kind (image_tower_kind) -> (name, model config, text config) -> the image tower
IMAGE_TOWERS: Registry[Callable[[str, ModelConfig, TextConfig], ImageTower]] = Registry("image tower kind")


@IMAGE_TOWERS.register("clip")
def clip_image_tower(name: str, cfg: ModelConfig, tcfg: TextConfig) -> ImageTower:
    """vidlang's CLIP ViT from a preset (+ ``image_overrides``, ``image_size``)."""
    return ClipImageTower(resolve_configs(cfg)[0])


@IMAGE_TOWERS.register("timm")
def timm_image_tower(name: str, cfg: ModelConfig, tcfg: TextConfig) -> ImageTower:
    """A timm ViT trunk projected to the text tower's E; ``image_overrides`` are :class:`TimmImageTower` arguments
    (timm's ``create_model`` keywords, e.g. ``depth``, and ``weights``: a local trunk weights file)."""
    if cfg.pretrained:
        raise ConfigError(
            f"model.pretrained loads CLIP checkpoints into vidlang's CLIP towers; the timm tower {name!r} takes its "
            "trunk weights from model.image_overrides: {weights: FILE}"
        )
    kwargs = dict(cfg.image_overrides)
    if cfg.image_size is not None:
        kwargs.setdefault("img_size", cfg.image_size)
    kwargs.setdefault("proj_dim", tcfg.embed_dim)
    return TimmImageTower(name, **kwargs)


def tower_spec(vcfg: ImageConfig, tcfg: TextConfig, image_kind: str = "clip", rotary: bool = False) -> TowerSpec:
    return TowerSpec(
        width=vcfg.width,
        layers=vcfg.layers,
        heads=vcfg.heads,
        embed_dim=vcfg.embed_dim,
        grid=vcfg.grid,
        text_width=tcfg.width,
        text_layers=tcfg.layers,
        text_heads=tcfg.heads,
        context_length=tcfg.context_length,
        vocab_size=tcfg.vocab_size,
        image_kind=image_kind,
        rotary=rotary,
    )


def build_model(cfg: ModelConfig) -> VideoTextModel:
    kind, name = image_tower_kind(cfg.image)
    tcfg = text_config_of(cfg)
    image = IMAGE_TOWERS.get(kind)(name, cfg, tcfg)
    if image.embed_dim != tcfg.embed_dim:
        raise ValueError(f"image {cfg.image!r} embeds to {image.embed_dim} but text to {tcfg.embed_dim}")
    text = TextTower(tcfg)
    block = build_block(cfg.block, tower_spec(image.cfg, tcfg, image.kind, image.rotary), **cfg.block_args)
    model = VideoTextModel(image, text, block, cfg.logit_scale_init, cfg.lr_mults, cfg.weight_decays)
    check_prefixes(model, cfg)
    block_state: dict[str, Tensor] = {}
    if cfg.pretrained:
        info = load_weights(model, cfg.pretrained)
        block_state = info.pop("block_state")
        model.pretrained_info = info
    # Blocks copy or reference tower weights here (STAN's spatial layers, Prompt Switch's text
    # embeddings), so this runs after the towers are loaded; a checkpoint's own block weights, if
    # any, then overwrite those copies.
    block.init_from_tower(image, text)
    if block_state:
        block.load_state_dict(block_state)
        model.block_weights_loaded = True  # trained block weights: no word-dependent re-initialisation
    policy = ("block_only" if block.freeze_backbone else "full") if cfg.freeze == "auto" else cfg.freeze
    FREEZE_POLICIES.get(policy)(model)
    model.freeze_policy = policy
    model.set_gradient_checkpointing(cfg.gradient_checkpointing)
    if cfg.compile:
        from vidlang.models.compile import compile_model

        compile_model(model)
    return model


def check_prefixes(model: nn.Module, cfg: ModelConfig) -> None:
    """Refuse ``lr_mults`` / ``weight_decays`` prefixes that name neither a parameter nor a module of ``model``."""
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_modules() if n]
    for field_name, table in (("lr_mults", cfg.lr_mults), ("weight_decays", cfg.weight_decays)):
        unused = [p for p in table if not any(matches(p, n) for n in names)]
        if unused:
            tops = sorted({n.split(".")[0] for n in names})
            raise ConfigError(
                f"model.{field_name}: {unused} name no parameter or module of the model (prefixes end at a dot, "
                f"e.g. 'block' or 'image_tower.layers.0'; the model's top-level names: {', '.join(tops)})"
            )


# -- weights ---------------------------------------------------------------------------------------
def _fit_shapes(sd: dict[str, Tensor], model: nn.Module, source: str) -> None:
    """In place: resample spatial/temporal position embeddings and trim text context to the model's shapes."""
    own = model.state_dict()
    pe = "image_tower.positional_embedding"
    if pe in sd and sd[pe].shape != own[pe].shape:
        sd[pe] = resample_pos_embed(sd[pe], model.image_tower.grid)
    tpe = "text_tower.positional_embedding"
    if tpe in sd and sd[tpe].shape[0] != own[tpe].shape[0]:
        if sd[tpe].shape[0] < own[tpe].shape[0]:
            raise ValueError(f"{source}: text context {sd[tpe].shape[0]} < the model's {own[tpe].shape[0]}")
        sd[tpe] = sd[tpe][: own[tpe].shape[0]]
    for key, value in list(sd.items()):
        if key.rsplit(".", 1)[-1] in TEMPORAL_EMBED_NAMES and key in own and value.shape != own[key].shape:
            sd[key] = resample_temporal_embed(value, own[key].shape[-2])


def load_weights(model: VideoTextModel, path: str) -> dict[str, Any]:
    """Load a local checkpoint through ``vidlang.models.clip.pretrained.load_pretrained`` into ``model``.

    Tower weights must match exactly (after resampling); block weights load when present.
    """
    loader = importlib.import_module("vidlang.models.clip.pretrained").load_pretrained
    sd, info = loader(path, on_unknown="omit")  # what the file cannot tell comes from the model config
    sd = dict(sd)
    _fit_shapes(sd, model, path)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tower_missing = [k for k in missing if k.startswith(("image_tower.", "text_tower."))]
    if tower_missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not match the model: missing {tower_missing[:8]}"
            f"{' ...' if len(tower_missing) > 8 else ''}, unexpected {unexpected[:8]}"
        )
    info = dict(info) if isinstance(info, dict) else {"info": info}
    check_architecture(model, info, path)
    info["block_state"] = {k[len("block.") :]: v for k, v in sd.items() if k.startswith("block.")}
    info["loaded_block"] = bool(info["block_state"])
    return info


def check_architecture(model: VideoTextModel, info: dict[str, Any], source: str) -> None:
    """Refuse a checkpoint whose stored activation or head count differs from the model's presets.

    Weight shapes cannot reveal either, so a mismatch would load silently and compute wrongly.
    Only what the checkpoint tells is compared (its config, or heads of a known architecture's shapes);
    what it cannot tell (``info["unknown"]``) comes from the model config, with a warning.
    """
    # (key in the pretrained info / converted config.json, ModelConfig field, the built tower's config)
    towers = (("vision", "image", model.image_tower.cfg), ("text", "text", model.text_tower.cfg))
    for key, name, cfg in towers:
        stored = info.get(key) or {}
        for field_name in ("act", "heads"):
            if field_name in stored and stored[field_name] != getattr(cfg, field_name):
                raise ValueError(
                    f"{source}: the checkpoint's {name} tower has {field_name}={stored[field_name]!r} but the "
                    f"model preset has {getattr(cfg, field_name)!r}; set ModelConfig.{name}_overrides"
                    f"={{'{field_name}': {stored[field_name]!r}}} or pick the matching preset"
                )
    unknown = info.get("unknown") or []
    if unknown:
        cfgs = {key: cfg for key, _, cfg in towers}
        shown = {key: name for key, name, _ in towers}  # the file's "vision" is the config's "image" tower
        named = [f"{shown[u.split('.')[0]]}.{u.split('.')[1]}" for u in unknown]
        values = [getattr(cfgs[u.split(".")[0]], u.split(".")[1]) for u in unknown]
        used = ", ".join(f"{n}={v!r}" for n, v in zip(named, values, strict=True))
        warnings.warn(
            f"{source} does not record {', '.join(named)}; using the model config's {used}. If the weights were "
            "trained otherwise, set ModelConfig.image_overrides / text_overrides (e.g. {'act': 'gelu'})",
            stacklevel=3,
        )


# -- freezing --------------------------------------------------------------------------------------
def _set_trainable(module: nn.Module | nn.Parameter, flag: bool) -> None:
    params = [module] if isinstance(module, nn.Parameter) else module.parameters()
    for p in params:
        p.requires_grad_(flag)


@FREEZE_POLICIES.register("full")
def freeze_none(model: VideoTextModel) -> None:
    _set_trainable(model, True)


@FREEZE_POLICIES.register("frozen_backbone")
def freeze_image_tower(model: VideoTextModel) -> None:
    _set_trainable(model, True)
    _set_trainable(model.image_tower, False)


@FREEZE_POLICIES.register("block_only")
def freeze_all_but_block(model: VideoTextModel) -> None:
    _set_trainable(model, False)
    _set_trainable(model.block, True)


FREEZE_POLICIES.register("prompts_only")(freeze_all_but_block)


@FREEZE_POLICIES.register("frozen_text")
def freeze_text_tower(model: VideoTextModel) -> None:
    """X-CLIP's ``FIX_TEXT``: the text tower and ``logit_scale`` frozen; image tower and block train."""
    _set_trainable(model, True)
    _set_trainable(model.text_tower, False)
    _set_trainable(model.logit_scale, False)
