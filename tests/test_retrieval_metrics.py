"""Retrieval metrics against hand-computed ranks (ties, several captions per video, chunking, DSL)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vidlang.eval.plots import plot_recall_at_k, recall_curve
from vidlang.eval.retrieval import (
    chance_levels,
    chunked_similarity,
    evaluate_embeddings,
    evaluate_similarity,
    retrieval_metrics,
)

# 4 texts x 3 videos; texts 0 and 1 describe video 0, text 2 video 1, text 3 video 2.
SIM = torch.tensor(
    [
        [0.9, 0.1, 0.4],  # gt 0: best -> rank 1
        [0.2, 0.8, 0.2],  # gt 0: one greater (0.8), one tie (0.2) -> opt 2, pess 3
        [0.7, 0.7, 0.1],  # gt 1: tie with video 0 -> opt 1, pess 2
        [0.3, 0.6, 0.4],  # gt 2: one greater -> rank 2
    ]
)
INDEX = torch.tensor([0, 0, 1, 2])
# video -> text (columns): v0 best caption 0.9 -> 1; v1 caption 0.7 < 0.8 -> 2;
# v2 caption 0.4 ties text 0's 0.4 -> opt 1, pess 2.


def brute_ranks(sim: torch.Tensor, index: torch.Tensor, pessimistic: bool) -> tuple[list[int], list[int]]:
    """Loop-based reference: text->video ranks and video->text best-caption ranks."""
    s = sim.tolist()
    t2v = []
    for i, row in enumerate(s):
        g = int(index[i])
        t2v.append(1 + sum((v >= row[g]) if pessimistic else (v > row[g]) for j, v in enumerate(row) if j != g))
    v2t = []
    for j in range(sim.shape[1]):
        pos = [a for a in range(sim.shape[0]) if int(index[a]) == j]
        if not pos:
            continue
        best = max(s[a][j] for a in pos)
        neg = [s[a][j] for a in range(sim.shape[0]) if a not in pos]
        v2t.append(1 + sum((v >= best) if pessimistic else (v > best) for v in neg))
    return t2v, v2t


def test_hand_computed_ranks_pessimistic_default():
    res = evaluate_similarity(SIM, INDEX)
    assert res.ranks["t2v"].tolist() == [1, 3, 2, 2]
    assert res.ranks["v2t"].tolist() == [1, 2, 2]
    m = res.metrics
    assert m["t2v_R@1"] == pytest.approx(25.0)
    assert m["t2v_R@5"] == pytest.approx(100.0)
    assert m["t2v_MdR"] == pytest.approx(2.0)
    assert m["t2v_MnR"] == pytest.approx(2.0)
    assert m["v2t_R@1"] == pytest.approx(100.0 / 3)
    assert m["v2t_MdR"] == pytest.approx(2.0)
    assert m["v2t_MnR"] == pytest.approx(5.0 / 3)


def test_hand_computed_ranks_optimistic_design_formula():
    # r = 1 + #{j: S[i,j] > S[i,gt]}: ties with the ground truth are not counted.
    res = evaluate_similarity(SIM, INDEX, ties="optimistic")
    assert res.ranks["t2v"].tolist() == [1, 2, 1, 2]
    assert res.ranks["v2t"].tolist() == [1, 2, 1]
    assert res.metrics["t2v_R@1"] == pytest.approx(50.0)
    assert res.metrics["t2v_MdR"] == pytest.approx(1.5)  # even count: mean of the two middle ranks
    assert res.metrics["t2v_MnR"] == pytest.approx(1.5)


def test_collapsed_model_gets_no_credit_from_ties():
    sim = torch.zeros(6, 6)  # every similarity tied
    index = torch.arange(6)
    m = retrieval_metrics(sim, index)
    assert m["t2v_R@1"] == 0.0 and m["v2t_R@1"] == 0.0
    assert m["t2v_MnR"] == 6.0 and m["v2t_MnR"] == 6.0
    assert retrieval_metrics(sim, index, ties="optimistic")["t2v_R@1"] == 100.0  # why the default is pessimistic


def test_video_to_text_takes_best_caption_and_own_captions_never_count():
    # video 0 has captions 0, 1, 2; its best caption (text 1, 0.9) ties its other caption (text 2)
    sim = torch.tensor([[0.1, 0.5], [0.9, 0.2], [0.9, 0.3], [0.95, 0.1]])
    index = torch.tensor([0, 0, 0, 1])
    res = evaluate_similarity(sim, index)
    # only text 3 (video 1's caption, 0.95) beats the best caption of video 0
    # video 1: its only caption scores 0.1 < 0.5, 0.2, 0.3 -> rank 4
    assert res.ranks["v2t"].tolist() == [2, 4]
    assert res.ranks["t2v"].tolist() == [2, 1, 1, 2]


def test_videos_without_captions_stay_in_gallery_only():
    sim = torch.tensor([[0.9, 0.95, 0.1], [0.1, 0.2, 0.8]])
    index = torch.tensor([0, 2])  # video 1 has no caption: a distractor
    res = evaluate_similarity(sim, index)
    assert res.ranks["t2v"].tolist() == [2, 1]
    assert res.ranks["v2t"].tolist() == [1, 1]  # two queries, not three
    assert res.metrics["num_videos"] == 3


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_random_quantised_matrix_matches_brute_force(ties):
    g = torch.Generator().manual_seed(0)
    sim = torch.randint(0, 5, (23, 11), generator=g).float() / 4  # many ties
    index = torch.randint(0, 11, (23,), generator=g)
    t2v, v2t = brute_ranks(sim, index, ties == "pessimistic")
    for chunk in (1, 4, 100):
        res = evaluate_similarity(sim, index, chunk=chunk, ties=ties)
        assert res.ranks["t2v"].tolist() == t2v
        assert res.ranks["v2t"].tolist() == v2t


def test_chunked_embeddings_equal_unchunked_and_numpy_reference():
    g = torch.Generator().manual_seed(1)
    text, video = torch.randn(37, 16, generator=g), torch.randn(13, 16, generator=g)
    index = torch.cat([torch.arange(13), torch.randint(0, 13, (24,), generator=g)])
    blocks = list(chunked_similarity(text, video, chunk=5))
    assert [s for s, _ in blocks] == list(range(0, 37, 5))
    assert max(b.shape[0] for _, b in blocks) == 5
    torch.testing.assert_close(torch.cat([b for _, b in blocks]), text @ video.t())
    full = F.normalize(text, dim=-1) @ F.normalize(video, dim=-1).t()
    dense = retrieval_metrics(full, index, dsl=True)
    for chunk in (1, 5, 64):
        assert evaluate_embeddings(text, video, index, dsl=True, chunk=chunk).metrics == pytest.approx(dense)
    # numpy reference for text->video (argsort-based, no ties with random floats)
    order = np.argsort(-full.numpy(), axis=1)
    ref = [int(np.where(order[i] == int(index[i]))[0][0]) + 1 for i in range(37)]
    assert evaluate_embeddings(text, video, index).ranks["t2v"].tolist() == ref


def test_dsl_is_separate_and_matches_dense_dual_softmax():
    g = torch.Generator().manual_seed(2)
    sim = torch.randn(12, 6, generator=g) * 0.3
    index = torch.arange(12) % 6
    plain = retrieval_metrics(sim, index)
    assert not any(k.startswith("dsl_") for k in plain)
    both = retrieval_metrics(sim, index, dsl=True, dsl_temperature=0.05, chunk=5)
    assert {k: v for k, v in both.items() if not k.startswith("dsl_")} == plain  # plain keys untouched
    assert {f"dsl_{k}" for k in plain if k.startswith(("t2v", "v2t"))} <= set(both)
    t2v_sim = sim * torch.softmax(sim / 0.05, dim=0)
    v2t_sim = sim * torch.softmax(sim / 0.05, dim=1)
    ref_t2v, _ = brute_ranks(t2v_sim, index, True)
    _, ref_v2t = brute_ranks(v2t_sim, index, True)
    res = evaluate_similarity(sim, index, dsl=True, dsl_temperature=0.05, chunk=5)
    assert res.ranks["dsl_t2v"].tolist() == ref_t2v
    assert res.ranks["dsl_v2t"].tolist() == ref_v2t


def test_dsl_changes_ranks_on_a_hub_video():
    # video 0 is a "hub" scoring high for every text; DSL's column prior demotes it
    sim = torch.tensor([[0.9, 0.8, 0.1], [0.9, 0.2, 0.85], [0.95, 0.3, 0.2]])
    index = torch.tensor([1, 2, 0])
    m = retrieval_metrics(sim, index, dsl=True, dsl_temperature=0.01)
    assert m["t2v_R@1"] == pytest.approx(100 / 3)
    assert m["dsl_t2v_R@1"] == pytest.approx(100.0)


def test_bad_inputs_raise_clear_errors():
    sim = SIM.clone()
    sim[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(sim, INDEX)
    with pytest.raises(ValueError, match="caption_index"):
        retrieval_metrics(SIM, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match="caption_index"):
        retrieval_metrics(SIM, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="ties"):
        retrieval_metrics(SIM, INDEX, ties="random")


def test_chance_levels():
    c = chance_levels(torch.tensor([0, 0, 1, 2]), 3)
    assert c["t2v_R@1"] == pytest.approx(100 / 3) and c["t2v_R@5"] == 100.0
    # video 0 has 2 of 4 captions: P(a positive first) = 1/2; videos 1, 2: 1/4
    assert c["v2t_R@1"] == pytest.approx(100 * (0.5 + 0.25 + 0.25) / 3)
    assert c["v2t_R@10"] == 100.0  # K beyond the gallery


def test_recall_curve_and_png(tmp_path):
    ranks = torch.tensor([1, 1, 2, 5, 30])
    curve = recall_curve(ranks, 10)
    assert curve.tolist()[:5] == [40.0, 60.0, 60.0, 60.0, 80.0]
    assert curve[-1] == 80.0
    res = evaluate_similarity(SIM, INDEX, dsl=True)
    out = plot_recall_at_k(res.ranks, tmp_path / "plots" / "recall.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 5000


# ---------------------------------------------------------------- video -> text, CLIP4Clip convention


def brute_clip4clip_v2t(sim: torch.Tensor, index: torch.Tensor, pessimistic: bool) -> list[int]:
    """Loop reference: captions collapsed by max per owner video, query video ranked among caption sets."""
    s = sim.tolist()
    owners = sorted({int(i) for i in index})
    collapsed = {i: [max(s[a][j] for a in range(len(s)) if int(index[a]) == i) for j in range(sim.shape[1])]
                 for i in owners}  # owner video -> [score against each query video]
    ranks = []
    for j in range(sim.shape[1]):
        if j not in collapsed:
            continue
        own = collapsed[j][j]
        ranks.append(1 + sum((collapsed[i][j] >= own) if pessimistic else (collapsed[i][j] > own)
                             for i in owners if i != j))
    return ranks


def test_clip4clip_video_to_text_by_hand():
    # 5 texts x 3 videos: video 0 owns texts 0-2, video 1 text 3, video 2 text 4.
    sim = torch.tensor([
        [0.50, 0.10, 0.20],
        [0.30, 0.90, 0.40],  # a caption of video 0 that scores high on video 1
        [0.45, 0.20, 0.70],
        [0.60, 0.80, 0.10],
        [0.10, 0.30, 0.70],
    ])
    index = torch.tensor([0, 0, 0, 1, 2])
    # collapsed M[i, j] (owner i, query j): M[0] = [0.50, 0.90, 0.70], M[1] = [0.60, 0.80, 0.10],
    # M[2] = [0.10, 0.30, 0.70]
    # query 0: own 0.50, others 0.60 (v1), 0.10 -> rank 2
    # query 1: own 0.80, others 0.90 (v0), 0.30 -> rank 2
    # query 2: own 0.70, others 0.70 (v0, tie), 0.10 -> pessimistic 2, optimistic 1
    res = evaluate_similarity(sim, index, v2t="clip4clip")
    assert res.ranks["v2t"].tolist() == [2, 2, 2]
    assert evaluate_similarity(sim, index, v2t="clip4clip", ties="optimistic").ranks["v2t"].tolist() == [2, 2, 1]
    # the best-caption rule ranks among all 5 captions instead: query 0 best 0.50 < 0.60 -> 2;
    # query 1 best 0.80 < 0.90 -> 2; query 2 best 0.70, tied by text 2 (another video's) -> 2
    assert evaluate_similarity(sim, index).ranks["v2t"].tolist() == [2, 2, 2]
    assert res.ranks["t2v"].tolist() == evaluate_similarity(sim, index).ranks["t2v"].tolist()  # t2v unchanged


def test_clip4clip_differs_from_best_caption_when_a_video_has_many_captions():
    # video 1 has 3 captions that all beat video 0's caption on video 0's column; collapsed, they count once
    sim = torch.tensor([[0.5, 0.0], [0.6, 0.9], [0.7, 0.9], [0.8, 0.9]])
    index = torch.tensor([0, 1, 1, 1])
    assert evaluate_similarity(sim, index).ranks["v2t"].tolist() == [4, 1]
    assert evaluate_similarity(sim, index, v2t="clip4clip").ranks["v2t"].tolist() == [2, 1]


def test_clip4clip_videos_without_captions_are_neither_queries_nor_candidates():
    sim = torch.tensor([[0.9, 0.95, 0.1], [0.1, 0.99, 0.8]])
    index = torch.tensor([0, 2])  # video 1 has no caption
    res = evaluate_similarity(sim, index, v2t="clip4clip")
    assert res.ranks["v2t"].tolist() == [1, 1]  # video 1's column is no query; it has no caption set to rank


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_clip4clip_random_quantised_matrix_matches_brute_force(ties):
    g = torch.Generator().manual_seed(1)
    sim = torch.randint(0, 5, (29, 13), generator=g).float() / 4
    index = torch.randint(0, 13, (29,), generator=g)
    want = brute_clip4clip_v2t(sim, index, ties == "pessimistic")
    for chunk in (1, 5, 100):
        assert evaluate_similarity(sim, index, chunk=chunk, ties=ties, v2t="clip4clip").ranks["v2t"].tolist() == want
    emb_t, emb_v = torch.randn(29, 8, generator=g), torch.randn(13, 8, generator=g)
    dense = evaluate_similarity(F.normalize(emb_t, dim=-1) @ F.normalize(emb_v, dim=-1).t(), index, v2t="clip4clip",
                                dsl=True)
    chunked = evaluate_embeddings(emb_t, emb_v, index, chunk=3, v2t="clip4clip", dsl=True)
    for key in ("v2t", "dsl_v2t"):
        assert torch.equal(dense.ranks[key], chunked.ranks[key])
    with pytest.raises(ValueError, match="v2t must be one of"):
        evaluate_similarity(sim, index, v2t="mean")
