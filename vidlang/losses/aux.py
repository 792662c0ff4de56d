"""The weighting of temporal blocks' auxiliary losses, in one place for every task and the temporal bench."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor


def weigh_aux_losses(
    aux: Mapping[str, Tensor], defaults: Mapping[str, float], overrides: Mapping[str, float] | None = None
) -> tuple[Tensor | None, dict[str, float]]:
    """``(sum of weight * loss over aux, the weight used per name)``; ``None`` for no auxiliary loss.

    ``aux``: name -> scalar loss (``VideoOutput.aux_losses`` / ``TextOutput.aux_losses``). The weight of a name is
    ``overrides[name]`` (a task's ``aux_loss_weights``), else ``defaults[name]`` (the block's declared
    ``default_aux_weights``), else 1.0; a weight of 0 turns a loss off. Terms are added in ``aux``'s order.
    """
    weights = {name: float({**defaults, **(overrides or {})}.get(name, 1.0)) for name in aux}
    total: Tensor | None = None
    for name, value in aux.items():
        term = weights[name] * value
        total = term if total is None else total + term
    return total, weights
