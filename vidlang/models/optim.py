"""Optimizer parameter groups from an optimisation recipe: learning-rate multipliers and weight decays keyed by
parameter-name prefix (the longest matching prefix wins), with the usual no-decay exclusions.

A prefix matches a parameter name when it is ``""`` (every parameter), the name itself, or the name up to a
dot: ``"block"`` matches ``block.prompts`` but not ``blocks.0.weight``. A ``*`` segment matches any one name
segment: ``"block.layers.*.skip_fc"`` covers ``block.layers.3.skip_fc.weight`` (a module repeated per layer).
The recipe of a video-text model is
:meth:`vidlang.models.video_clip.VideoTextModel.param_groups`; this module knows nothing of models.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

# Parameter-name fragments that never get weight decay (besides every 1-D tensor: norms, biases).
NO_DECAY_NAMES = ("embedding", "prompt", "pos_embed", "cls_token", "logit_scale", "query_tokens")
DEFAULT_GROUP = "backbone"  # the name of the groups of parameters no prefix but "" covers


def matches(prefix: str, name: str) -> bool:
    """True if ``prefix`` covers parameter ``name`` (see the module docstring)."""
    if prefix == "":
        return True
    if "*" not in prefix:
        return name == prefix or name.startswith(prefix + ".")
    want, have = prefix.split("."), name.split(".")
    return len(have) >= len(want) and all(w in ("*", h) for w, h in zip(want, have, strict=False))


def longest_prefix(name: str, table: Mapping[str, float]) -> str | None:
    """The longest key of ``table`` that covers ``name`` (None: no key does)."""
    found = [p for p in table if matches(p, name)]
    return max(found, key=len) if found else None


def lookup(table: Mapping[str, float], name: str, default: float) -> float:
    """``table``'s value for ``name`` (longest prefix), else ``default``."""
    key = longest_prefix(name, table)
    return default if key is None else float(table[key])


def join(prefix: str, relative: str) -> str:
    """``join("block", "")`` -> ``"block"``; ``join("block", "aggregate")`` -> ``"block.aggregate"``."""
    return ".".join(p for p in (prefix, relative) if p)


def _no_decay(name: str, param: nn.Parameter, extra: set[str]) -> bool:
    return param.ndim < 2 or any(s in name for s in NO_DECAY_NAMES) or name in extra


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    lr_mults: Mapping[str, float] | None = None,
    weight_decays: Mapping[str, float] | None = None,
) -> list[dict]:
    """Groups of the trainable parameters of ``model`` for ``torch.optim`` (in parameter order; no empty group).

    ``lr_mults`` / ``weight_decays``: parameter-name prefix -> lr multiplier / weight decay (longest prefix wins;
    lr multiplier 1 and ``weight_decay`` where no prefix covers a parameter). Each group has ``name``, ``params``,
    ``lr`` (= ``lr * lr_mult``), ``lr_mult`` and ``weight_decay``. A group gathers the parameters whose longest
    covering prefix (of either table) is the same, split by decay: ``"{prefix}_decay"`` / ``"{prefix}_no_decay"``
    (prefix ``""`` is named ``backbone``); ``logit_scale`` is a group of its own. Norms, biases, embeddings,
    position embeddings, prompts and ``logit_scale`` get no weight decay, nor any name a module lists in
    ``no_weight_decay()`` (timm convention, names relative to it).
    """
    lr_mults, weight_decays = dict(lr_mults or {}), dict(weight_decays or {})
    extra: set[str] = set()
    for prefix, mod in model.named_modules():
        if hasattr(mod, "no_weight_decay") and callable(mod.no_weight_decay):
            extra |= {f"{prefix}.{n}" if prefix else n for n in mod.no_weight_decay()}
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mult = lookup(lr_mults, name, 1.0)
        covering = [k for k in (longest_prefix(name, lr_mults), longest_prefix(name, weight_decays)) if k is not None]
        label = max(covering, key=len) if covering else ""
        decay = name != "logit_scale" and not _no_decay(name, p, extra)
        if name == "logit_scale":
            key = "logit_scale"
        else:
            key = f"{label or DEFAULT_GROUP}_{'decay' if decay else 'no_decay'}"
        wd = lookup(weight_decays, name, weight_decay) if decay else 0.0
        new = {"name": key, "params": [], "lr": lr * mult, "lr_mult": mult, "weight_decay": wd}
        groups.setdefault(key, new)["params"].append(p)
    return list(groups.values())
