"""The one weighting of blocks' auxiliary losses (issue 13 item 2): defaults, overrides, unlisted names."""

from __future__ import annotations

import torch

from vidlang.losses.aux import weigh_aux_losses
from vidlang.models.temporal import BLOCKS


def test_overrides_over_block_defaults_over_one():
    aux = {"caption": torch.tensor(2.0), "align": torch.tensor(3.0), "other": torch.tensor(5.0)}
    total, weights = weigh_aux_losses(aux, {"caption": 0.5, "align": 2.0}, {"align": 0.0})
    assert weights == {"caption": 0.5, "align": 0.0, "other": 1.0}
    assert total.item() == 0.5 * 2 + 0 * 3 + 1 * 5


def test_no_aux_loss_is_none_and_gradients_flow():
    assert weigh_aux_losses({}, {"caption": 0.5}) == (None, {})
    x = torch.tensor(4.0, requires_grad=True)
    total, _ = weigh_aux_losses({"caption": x * x}, {"caption": 0.25})
    total.backward()
    assert x.grad.item() == 0.25 * 2 * 4


def test_blocks_declare_their_weights():
    declared = {name: dict(BLOCKS.get(name).default_aux_weights) for name in BLOCKS.names()}
    assert declared["prompt_switch"] == {"caption": 0.5} and declared["ila"] == {"ila_align": 1.0}
    assert declared["mean"] == {}
