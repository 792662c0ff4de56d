"""M2-CLIP's multi-task terms: CE on logits (not probabilities), soft same-label KL, masking, MLM head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vidlang.losses.classification import smooth_one_hot
from vidlang.losses.m2clip import CrossModalMLM, cross_modal_ce, mask_tokens, same_label_targets, soft_contrastive_kl


def test_cross_modal_ce_uses_logits_not_probabilities():
    torch.manual_seed(0)
    logits = torch.randn(6, 5, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    loss = cross_modal_ce(logits, smooth_one_hot(labels, 5))
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-6)
    buggy = F.cross_entropy(logits.softmax(-1), labels)  # the released code's CE on probabilities
    assert abs(buggy.item() - loss.item()) > 0.1
    # on probabilities the loss cannot approach 0 even for a perfectly confident, correct prediction
    sharp = torch.full((1, 5), -20.0)
    sharp[0, 2] = 20.0
    assert cross_modal_ce(sharp, smooth_one_hot(torch.tensor([2]), 5)).item() < 1e-6
    assert F.cross_entropy(sharp.softmax(-1), torch.tensor([2])).item() > 0.9
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_same_label_soft_targets_and_kl():
    labels = torch.tensor([0, 1, 0, 2])
    soft = same_label_targets(smooth_one_hot(labels, 3))
    expected = torch.tensor([[0.5, 0, 0.5, 0], [0, 1, 0, 0], [0.5, 0, 0.5, 0], [0, 0, 0, 1.0]])
    assert torch.allclose(soft, expected)
    # logits that reproduce the targets exactly give zero KL; a confident diagonal does not
    perfect = torch.log(expected.clamp_min(1e-12))
    assert soft_contrastive_kl(perfect, smooth_one_hot(labels, 3)).item() == pytest.approx(0.0, abs=1e-6)
    diag = torch.eye(4) * 30
    assert soft_contrastive_kl(diag, smooth_one_hot(labels, 3)).item() > 0.3  # pair (0, 2) wants 1/2 each


def test_mask_tokens():
    ids = torch.tensor([[1, 10, 11, 12, 2, 0, 0], [1, 20, 2, 0, 0, 0, 0], [1, 2, 0, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    mask[:, 0] = 1
    masked, labels = mask_tokens(ids, mask, mask_id=0, prob=0.0, generator=torch.Generator().manual_seed(0))
    assert (labels[0] != -100).sum() == 1 and (labels[1] != -100).tolist() == [0, 1, 0, 0, 0, 0, 0]
    assert (labels[2] == -100).all()  # no words to mask
    assert masked[1, 1] == 0 and masked[1, 0] == 1 and masked[1, 2] == 2  # BOS/EOT untouched
    full, lab = mask_tokens(ids, mask, mask_id=0, prob=1.0)
    assert (lab[0, 1:4] == ids[0, 1:4]).all() and (full[0, 1:4] == 0).all() and full[0, 4] == 2


def test_cross_modal_mlm_learns_from_the_video():
    torch.manual_seed(0)
    head = CrossModalMLM(embed_dim=16, vocab_size=7)
    text = torch.randn(4, 5, 16)
    frames = torch.randn(4, 3, 16)
    labels = torch.full((4, 5), -100)
    labels[:, 2] = torch.tensor([1, 2, 3, 4])
    loss = head.loss(text, frames, labels)
    assert loss.item() > 0 and head.forward(text, frames).shape == (4, 5, 7)
    loss.backward()
    assert all(p.grad is not None for p in head.parameters())
    # the prediction depends on the frames (cross-attention), so a different video changes it
    assert not torch.allclose(head(text, frames), head(text, frames.flip(0)))
