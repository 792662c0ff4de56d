"""Losses; they own the cross-rank collectives (models never call them).

Retrieval losses are selected by name from :data:`LOSSES` (``contrastive.loss`` of the retrieval task): every
module of this package registers its entries (auto-discovered)."""

from vidlang.losses.contrastive import LOSSES, ContrastiveLoss, ContrastiveOutput
from vidlang.losses.distributed import all_gather_no_grad, all_gather_with_grad
from vidlang.registry import import_submodules

__all__ = ["LOSSES", "ContrastiveLoss", "ContrastiveOutput", "all_gather_no_grad", "all_gather_with_grad"]

import_submodules(__name__, __path__)
