"""Opt-in ``torch.compile`` of a :class:`~vidlang.models.video_clip.VideoTextModel` (``ModelConfig.compile``).

What is compiled: every transformer layer of both towers (:meth:`Tower.compile_layers`) and every module of the
temporal block (the elements of its module lists, its other direct children). Each unit is compiled in place
with ``nn.Module.compile``, so parameter names, checkpoints, freezing and the hook calls of the block contract
(which run between the compiled layers, in eager mode) are unchanged. The first calls pay the compilation (tens
of seconds on a CPU for B/32); ``vidlang bench model --compile`` measures what it gains.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def compile_block(block: nn.Module, **kwargs: Any) -> int:
    """Compile the block's modules in place (list elements one by one) -> how many were compiled."""
    count = 0
    for child in block.children():
        for module in child if isinstance(child, nn.ModuleList) else [child]:
            if any(True for _ in module.parameters()):  # parameter-free children (Identity, ...) stay eager
                module.compile(**kwargs)
                count += 1
    return count


def compile_model(model: nn.Module, **kwargs: Any) -> None:
    """``torch.compile`` the towers' layers and the block of ``model`` in place (see the module docstring)."""
    for name in ("image_tower", "text_tower"):
        tower = getattr(model, name, None)
        if tower is not None and hasattr(tower, "compile_layers"):
            tower.compile_layers(**kwargs)
    block = getattr(model, "block", None)
    if block is not None:
        compile_block(block, **kwargs)


__all__ = ["compile_block", "compile_model"]
