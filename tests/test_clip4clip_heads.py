"""CLIP4Clip's four similarity heads in vidlang (issue 14): meanP (``mean``), seqLSTM (``seq_lstm``), seqTransf
(``seq_transformer``) with the short-clip video mask, and tightTransf (:mod:`vidlang.models.cross_similarity`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vidlang.errors import ConfigError
from vidlang.models.contract import VIDEO_MASK_KEY, HookContext, TowerSpec
from vidlang.models.cross_similarity import TightTransformerSimilarity
from vidlang.models.factory import ModelConfig, build_model
from vidlang.models.temporal import BLOCKS, build_block
from vidlang.models.temporal.video_mask import check_video_mask, masked_mean, video_mask_state

WIDE_TEXT = {"text_overrides": {"width": 32, "heads": 4}}  # text width == E, as OpenAI CLIP (init from text)
SPEC = TowerSpec(width=16, layers=2, heads=2, embed_dim=8, grid=(2, 2), text_width=8, text_layers=2, text_heads=2)


def make(block: str, **kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(image="vit_tiny", block=block, **WIDE_TEXT, **kw)).eval()


@pytest.mark.parametrize("block", ["mean", "seq_transformer", "seq_lstm"])
def test_masked_short_clip_embeds_as_the_clip_alone(block: str):
    """A 3-frame clip padded to 6 slots (with arbitrary frames) and masked embeds exactly as the 3 frames alone."""
    model = make(block)
    g = torch.Generator().manual_seed(1)
    video = torch.randn(2, 6, 3, 32, 32, generator=g)  # clip 0: 3 real frames + 3 padded slots; clip 1: 6 real
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6], dtype=torch.bool)
    with torch.no_grad():
        out = model.encode_video(video, state=video_mask_state(model.block, mask))
        alone = model.encode_video(video[:1, :3]).embeds
        full = model.encode_video(video[1:]).embeds
        unmasked = model.encode_video(video).embeds
    torch.testing.assert_close(out.embeds[:1], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.embeds[1:], full, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmasked[:1], alone, atol=1e-3)  # without the mask the padding does count
    assert BLOCKS.get(block).uses_video_mask


def test_blocks_that_ignore_the_mask_refuse_padding():
    model = make("ted")
    padded = torch.tensor([[True, True, False]])
    with pytest.raises(ConfigError, match="does not honour a video mask"):
        video_mask_state(model.block, padded)
    state = video_mask_state(model.block, torch.ones(1, 3, dtype=torch.bool), {"other": 1})
    assert state["other"] == 1 and state[VIDEO_MASK_KEY].all()  # a mask without padding is fine anywhere
    assert video_mask_state(model.block, None) is None


def test_video_mask_checks_and_masked_mean():
    with pytest.raises(ValueError, match="prefix"):
        check_video_mask(torch.tensor([[True, False, True]]))
    with pytest.raises(ValueError, match="at least one real frame"):
        check_video_mask(torch.tensor([[False, False]]))
    with pytest.raises(ValueError, match="shape"):
        check_video_mask(torch.ones(2, 3), batch=2, frames=4)
    x = torch.tensor([[[1.0], [3.0], [100.0]], [[2.0], [4.0], [6.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    assert masked_mean(x, mask).flatten().tolist() == [2.0, 4.0]
    assert masked_mean(x, None).flatten().tolist() == pytest.approx([104 / 3, 4.0])


def test_seq_lstm_is_clip4clips_seqlstm():
    """LSTM over the real frames, + input frames, per-frame L2 norm, mean over the real frames."""
    torch.manual_seed(0)
    block = build_block("seq_lstm", SPEC).eval()
    e = SPEC.embed_dim
    assert block.extra_param_count() == 8 * e * e + 8 * e  # one LSTM layer E -> E (two bias vectors)
    x = torch.randn(2, 5, e)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    ctx = HookContext(batch=2, frames=5, state={VIDEO_MASK_KEY: mask})
    with torch.no_grad():
        out = block.pool(None, x, ctx)
        expected = []
        for row, n in zip(x, (2, 5), strict=True):
            y = F.normalize(block.lstm(row[None, :n])[0][0] + row[:n], dim=-1)
            expected.append(y.mean(0))
        no_mask = block.pool(None, x, HookContext(batch=2, frames=5))
        manual = F.normalize(block.lstm(x)[0] + x, dim=-1).mean(1)
    torch.testing.assert_close(out.embeds, torch.stack(expected), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(no_mask.embeds, manual, atol=1e-6, rtol=1e-5)
    assert out.frame_embeds.shape == (2, 5, e)
    # order aware: the same frames reversed give another embedding
    assert not torch.allclose(block.pool(None, x.flip(1), HookContext(batch=2, frames=5)).embeds, no_mask.embeds)


# -- tightTransf ----------------------------------------------------------------------------------------------
def tight(**kw) -> TightTransformerSimilarity:
    torch.manual_seed(0)
    return TightTransformerSimilarity(embed_dim=32, layers=2, heads=4, max_positions=24, **kw).eval()


def test_tight_init_from_the_text_tower():
    model = make("mean")
    head = tight()
    head.init_from_text_tower(model.text_tower)
    for src, dst in zip(model.text_tower.layers, head.layers, strict=True):
        for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    assert torch.equal(head.position_embedding, model.text_tower.positional_embedding[:24])
    assert (head.pool_dense.bias == 0).all() and (head.score.bias == 0).all()
    assert 0.01 < head.score.weight.std().item() < 0.04  # N(0, 0.02)
    with pytest.raises(ValueError, match="text width"):
        TightTransformerSimilarity(embed_dim=16, layers=1).init_from_text_tower(model.text_tower)
    with pytest.raises(ValueError, match="heads"):
        TightTransformerSimilarity(embed_dim=32, layers=1).init_from_text_tower(model.text_tower)  # 1 head vs 4
    with pytest.raises(ValueError, match="layers"):
        deeper = TightTransformerSimilarity(embed_dim=32, layers=3, heads=4, max_positions=24)
        deeper.init_from_text_tower(model.text_tower)


def test_tight_scores_every_pair_in_chunks():
    head = tight()
    g = torch.Generator().manual_seed(2)
    text, frames = torch.randn(5, 32, generator=g), torch.randn(3, 4, 32, generator=g)
    with torch.no_grad():
        full = head(text, frames)
        assert full.shape == (5, 3)
        for chunk in (1, 2, 5, 64):
            torch.testing.assert_close(head(text, frames, chunk=chunk), full)
        one = head.pair_logits(text[3:4], frames[1:2])  # the pair (caption 3, video 1) alone
    torch.testing.assert_close(one, full[3:4, 1])
    assert full.std() > 0  # pairs differ: the frames and the caption interact
    with pytest.raises(ValueError, match="text \\[A, E\\]"):
        head(text[:, :16], frames)


def test_tight_video_mask_and_dropout():
    head = tight()
    g = torch.Generator().manual_seed(3)
    text, frames = torch.randn(2, 32, generator=g), torch.randn(2, 5, 32, generator=g)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1] * 5], dtype=torch.bool)
    with torch.no_grad():
        masked = head(text, frames, mask)
        alone = head(text, frames[:1, :2])
    torch.testing.assert_close(masked[:, :1], alone, atol=1e-5, rtol=1e-5)  # padded frames have no say
    assert not torch.allclose(head(text, frames)[:, :1], alone, atol=1e-4)
    head.train()  # dropout 0.1 after the position embeddings, as CLIP4Clip
    assert not torch.equal(head(text, frames), head(text, frames))


def test_tight_training_loss_reaches_every_parameter():
    head = tight().train()
    g = torch.Generator().manual_seed(4)
    text = torch.randn(3, 32, generator=g, requires_grad=True)
    frames = torch.randn(3, 4, 32, generator=g, requires_grad=True)
    loss = head.loss(text, frames)
    logits = head(text, frames, chunk=3)
    assert loss.ndim == 0 and torch.isfinite(loss) and logits.shape == (3, 3)
    loss.backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing and text.grad.abs().sum() > 0 and frames.grad.abs().sum() > 0
