"""Optimizer parameter groups: backbone vs block vs ``logit_scale``, with and without weight decay."""

from __future__ import annotations

from torch import nn

# Parameter-name fragments that never get weight decay (besides every 1-D tensor: norms, biases).
NO_DECAY_NAMES = ("embedding", "prompt", "pos_embed", "cls_token", "logit_scale", "query_tokens")


def _no_decay(name: str, param: nn.Parameter, extra: set[str]) -> bool:
    return param.ndim < 2 or any(s in name for s in NO_DECAY_NAMES) or name in extra


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    lr_mult_backbone: float = 1.0,
    lr_mult_block: float = 1.0,
) -> list[dict]:
    """Groups of trainable parameters for ``torch.optim`` (empty groups dropped).

    Each group has ``name``, ``params``, ``lr`` (= ``lr * mult``), ``lr_mult`` and ``weight_decay``.
    ``block.*`` parameters use ``lr_mult_block``; ``logit_scale`` and the towers use ``lr_mult_backbone``.
    Norms, biases, embeddings, position embeddings, prompts and ``logit_scale`` get no weight decay,
    nor any name a module lists in ``no_weight_decay()`` (timm convention, names relative to it).
    """
    extra: set[str] = set()
    for prefix, mod in model.named_modules():
        if hasattr(mod, "no_weight_decay") and callable(mod.no_weight_decay):
            extra |= {f"{prefix}.{n}" if prefix else n for n in mod.no_weight_decay()}
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name == "logit_scale":
            part, mult = "logit_scale", lr_mult_backbone
        elif name.startswith("block."):
            part, mult = "block", lr_mult_block
        else:
            part, mult = "backbone", lr_mult_backbone
        decay = part != "logit_scale" and not _no_decay(name, p, extra)
        key = part if part == "logit_scale" else f"{part}_{'decay' if decay else 'no_decay'}"
        wd = weight_decay if decay else 0.0
        new = {"name": key, "params": [], "lr": lr * mult, "lr_mult": mult, "weight_decay": wd}
        group = groups.setdefault(key, new)
        group["params"].append(p)
    return list(groups.values())
