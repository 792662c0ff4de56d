"""Mug (mutual-guided) similarity and the retrieval-similarity registry."""

from __future__ import annotations

import math

import pytest
import torch

from vidlang.models.contract import TextOutput, VideoOutput
from vidlang.models.similarity import SIMILARITIES, cosine_similarity, mug_similarity


def _softmax(values: list[float], tau: float) -> list[float]:
    exps = [math.exp(tau * v) for v in values]
    return [e / sum(exps) for e in exps]


def _mug_by_hand(s: list[list[float]], tau: float) -> float:
    """Scalar reference: ``s[w][t]`` word-frame cosines of one caption (no padding) and one video."""
    words, frames = range(len(s)), range(len(s[0]))
    word_score = [sum(x * p for x, p in zip(s[w], _softmax(s[w], tau), strict=True)) for w in words]
    t2v = sum(x * p for x, p in zip(word_score, _softmax(word_score, tau), strict=True))
    cols = [[s[w][t] for w in words] for t in frames]
    frame_score = [sum(x * p for x, p in zip(c, _softmax(c, tau), strict=True)) for c in cols]
    v2t = sum(x * p for x, p in zip(frame_score, _softmax(frame_score, tau), strict=True))
    return (t2v + v2t) / 2


def test_mug_matches_hand_computation():
    r = 1 / math.sqrt(2)
    words = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # [1, 2, 2]; norms do not matter (cosine)
    frames = torch.tensor([[[3.0, 0.0], [1.0, 1.0]]])  # [1, 2, 2]
    s = [[1.0, r], [0.0, r]]  # cos(word, frame)
    for tau in (1.0, 5.0, 100.0):
        got = mug_similarity(words, torch.ones(1, 2, dtype=torch.bool), frames, temperature=tau)
        assert got.shape == (1, 1)
        assert got.item() == pytest.approx(_mug_by_hand(s, tau), abs=1e-6)


def test_mug_padding_is_masked():
    g = torch.Generator().manual_seed(0)
    words = torch.randn(3, 5, 8, generator=g)
    frames = torch.randn(4, 6, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    base = mug_similarity(words, mask, frames)
    changed = words.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), 8, generator=g) * 10  # garbage in padded slots
    torch.testing.assert_close(mug_similarity(changed, mask, frames), base)
    # same as the caption cut to its real tokens
    torch.testing.assert_close(mug_similarity(words[:1, :3], mask[:1, :3], frames), base[:1])
    torch.testing.assert_close(mug_similarity(words[2:, :1], mask[2:, :1], frames), base[2:])


def test_mug_equals_cosine_for_one_word_one_frame():
    g = torch.Generator().manual_seed(1)
    text, video = torch.randn(5, 16, generator=g), torch.randn(7, 16, generator=g)
    mug = mug_similarity(text[:, None], torch.ones(5, 1), video[:, None])
    torch.testing.assert_close(mug, cosine_similarity(text, video))


def test_mug_chunking_and_shape():
    g = torch.Generator().manual_seed(2)
    words, frames = torch.randn(9, 4, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    mask = torch.ones(9, 4, dtype=torch.bool)
    full = mug_similarity(words, mask, frames)
    assert full.shape == (9, 3)
    torch.testing.assert_close(mug_similarity(words, mask, frames, chunk=2), full)


def test_mug_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one real token"):
        mug_similarity(torch.randn(2, 3, 4), torch.zeros(2, 3), torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match="word_mask"):
        mug_similarity(torch.randn(2, 3, 4), torch.ones(2, 4), torch.randn(1, 2, 4))


def test_similarity_registry():
    assert {"cosine", "mug"} <= set(SIMILARITIES.names())
    g = torch.Generator().manual_seed(3)
    tokens, frames = torch.randn(2, 3, 8, generator=g), torch.randn(4, 5, 8, generator=g)
    text = TextOutput(embeds=tokens[:, -1], tokens=tokens, mask=torch.ones(2, 3, dtype=torch.bool))
    video = VideoOutput(embeds=frames.mean(1), frame_embeds=frames)
    assert SIMILARITIES.get("cosine")(text, video).shape == (2, 4)
    torch.testing.assert_close(SIMILARITIES.get("mug")(text, video), mug_similarity(tokens, text.mask, frames))
    with pytest.raises(ValueError, match="frame_embeds"):
        SIMILARITIES.get("mug")(text, VideoOutput(embeds=frames.mean(1)))
