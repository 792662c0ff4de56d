"""Losses; they own the cross-rank collectives (models never call them)."""

from vidlang.losses.contrastive import ContrastiveLoss, ContrastiveOutput
from vidlang.losses.distributed import all_gather_no_grad, all_gather_with_grad

__all__ = ["ContrastiveLoss", "ContrastiveOutput", "all_gather_no_grad", "all_gather_with_grad"]
