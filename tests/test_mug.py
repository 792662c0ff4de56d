"""Mug (mutual-guided) similarity and the retrieval-similarity registry."""

from __future__ import annotations

import math

import pytest
import torch

from vidlang.models.contract import TextOutput, VideoOutput
from vidlang.models.similarity import SIMILARITIES, cosine_similarity, mug_similarity, mug_similarity_rows


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


def _released_mug(text: torch.Tensor, mask: torch.Tensor, video: torch.Tensor, tau: float = 100.0) -> torch.Tensor:
    """The released ``mug_frame_token_simple`` computation, padding found by exact zeros (reference)."""
    t = text / text.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    v = video / video.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    s = torch.einsum("awd,bfd->abwf", t, v) * mask[:, None, :, None]
    inf = torch.tensor(float("-inf"), dtype=s.dtype)
    per_word = (s * torch.softmax(s * tau, dim=-1)).sum(-1)  # [a, b, w]
    per_frame = (s * torch.softmax(torch.where(s == 0, inf, s) * tau, dim=-2)).sum(-2)  # [a, b, f]
    t2v = (per_word * torch.softmax(torch.where(per_word == 0, inf, per_word) * tau, dim=-1)).sum(-1)
    v2t = (per_frame * torch.softmax(per_frame * tau, dim=-1)).sum(-1)
    return (t2v + v2t) / 2


def test_mug_matches_the_released_formula_with_padding():
    g = torch.Generator().manual_seed(4)
    words, frames = torch.randn(6, 7, 16, generator=g), torch.randn(5, 4, 16, generator=g)
    mask = torch.ones(6, 7)
    for row, length in enumerate([7, 3, 1, 5, 2, 6]):
        mask[row, length:] = 0
    expected = _released_mug(words, mask, frames)
    torch.testing.assert_close(mug_similarity(words, mask, frames), expected)
    soft = mug_similarity(words, mask, frames, temperature=10.0)
    torch.testing.assert_close(soft, _released_mug(words, mask, frames, 10.0))


def _symmetric_loss(sim: torch.Tensor) -> torch.Tensor:
    logits = 100 * sim  # the released loss: fixed scale 1 / 0.01, the sum of both directions
    target = torch.arange(sim.shape[0])
    return torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)


def test_mug_blocking_changes_neither_values_nor_gradients():
    g = torch.Generator().manual_seed(5)  # fp64: the x100 logits amplify summation-order rounding
    words = torch.randn(7, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    frames = torch.randn(7, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(7, 6, dtype=torch.bool)
    mask[1::2, 3:] = False
    results = []
    for chunk, video_chunk in [(1000, 1000), (2, 3), (1, 1), (3, 7)]:
        words.grad = frames.grad = None
        sim = mug_similarity(words, mask, frames, chunk=chunk, video_chunk=video_chunk)
        _symmetric_loss(sim).backward()
        results.append((sim.detach(), words.grad.clone(), frames.grad.clone()))
    full = results[0]
    assert full[1].abs().sum() > 0 and full[2].abs().sum() > 0
    assert not full[1][~mask].any()  # padded word slots get no gradient
    for sim, gw, gf in results[1:]:
        torch.testing.assert_close(sim, full[0])
        torch.testing.assert_close(gw, full[1])
        torch.testing.assert_close(gf, full[2])
    with torch.no_grad():
        rows = list(mug_similarity_rows(words, mask, frames, chunk=3, video_chunk=2))
    assert [start for start, _ in rows] == [0, 3, 6] and [r.shape for _, r in rows] == [(3, 7), (3, 7), (1, 7)]
    torch.testing.assert_close(torch.cat([r for _, r in rows]), full[0])


def test_mug_gradcheck():
    g = torch.Generator().manual_seed(6)
    words = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    frames = torch.randn(3, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    assert mug_similarity(words, mask, frames).dtype == torch.float64  # fp64 stays fp64
    fn = lambda w, f: mug_similarity(w, mask, f, temperature=5.0, chunk=1, video_chunk=2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (words, frames))


def test_mug_in_fp32_under_autocast():
    g = torch.Generator().manual_seed(7)
    words, frames = torch.randn(4, 5, 8, generator=g), torch.randn(3, 6, 8, generator=g)
    mask = torch.ones(4, 5, dtype=torch.bool)
    ref = mug_similarity(words, mask, frames)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mug_similarity(words.bfloat16(), mask, frames.bfloat16())
        states = []
        for _, block in mug_similarity_rows(words, mask, frames, chunk=2):
            states.append(torch.is_autocast_enabled("cpu"))  # the caller's autocast is left alone between blocks
            assert block.dtype == torch.float32
    assert got.dtype == torch.float32 and states == [True, True]
    torch.testing.assert_close(got, mug_similarity(words.bfloat16().float(), mask, frames.bfloat16().float()))
    assert (got - ref).abs().max() < 0.02  # only the bf16 rounding of the inputs


def test_mug_rejects_bad_input():
    with pytest.raises(ValueError, match="chunks"):
        mug_similarity(torch.randn(2, 3, 4), torch.ones(2, 3), torch.randn(1, 2, 4), video_chunk=0)
    with pytest.raises(ValueError, match="dim"):
        mug_similarity(torch.randn(2, 3, 4), torch.ones(2, 3), torch.randn(1, 2, 5))
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
