"""Named evaluation protocols: registry, a stable hash of each definition, and every protocol on hand-made edge cases
(videos with no caption, duplicate captions, ties, paragraph joining) against hand-computed ranks."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from vidlang.data.config import SamplingConfig, TransformConfig
from vidlang.data.sample import FormatIndex, Official, VideoEntry
from vidlang.eval.protocols import (
    PROTOCOLS,
    CaptionSpec,
    EvalProtocol,
    combine_base_novel,
    combine_splits,
    get_protocol,
)

ROOT = Path(__file__).resolve().parents[1]
RETRIEVAL = ["msrvtt-1ka", "msrvtt-full", "msvd", "didemo-paragraph", "anet-paragraph", "lsmdc", "vatex"]
RECOGNITION = [n for n in PROTOCOLS.names() if get_protocol(n).task == "recognition"]


def test_the_named_protocols_exist():
    assert set(RETRIEVAL) | {"kinetics", "charades", "k600-zeroshot-1", "k600-zeroshot-3", "hmdb51-zeroshot-2",
                             "ucf101-base2novel-novel", "ssv2-fewshot"} <= set(PROTOCOLS.names())
    for name in PROTOCOLS.names():
        p = get_protocol(name)
        assert p.name == name and len(p.hash) == 16 and p.dsl is False  # DSL never in the headline numbers


# ---------------------------------------------------------------- the hash

# Pinned: a change here means a protocol's definition (or METRIC_VERSION) changed -- update deliberately, and say so.
PINNED = {"msrvtt-1ka": "95a98aa07cda6c27", "msvd": "1b1d690cd60a9fa8", "didemo-paragraph": "c0b7d35fd6195519",
          "kinetics": "a288c9cf49653f4b", "charades": "f6acbbc90f07eccd"}


def test_hash_is_pinned_and_the_same_in_a_fresh_process():
    assert {n: get_protocol(n).hash for n in PINNED} == PINNED
    code = "from vidlang.eval.protocols import PROTOCOLS as P\nprint(','.join(P.get(n).hash for n in P.names()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().split(",") == [get_protocol(n).hash for n in PROTOCOLS.names()]
    assert len({get_protocol(n).hash for n in PROTOCOLS.names()}) == len(PROTOCOLS.names())  # all distinct


def test_hash_follows_the_definition_not_the_prose():
    p = get_protocol("msvd")
    changed = [
        replace(p, ties="optimistic"),
        replace(p, captions=replace(p.captions, video_to_text="best_caption")),
        replace(p, captions=replace(p.captions, max_text_tokens=77)),
        replace(p, sampling=replace(p.sampling, num_frames=16)),
        replace(p, sampling=replace(p.sampling, sampler_args=(("fps", 2.0),))),
        replace(p, official=replace(p.official, videos=669)),
        replace(p, data=(("format", "msvd"), ("split", "val"))),
    ]
    hashes = {q.hash for q in changed}
    assert len(hashes) == len(changed) and p.hash not in hashes
    reworded = replace(p, name="msvd-copy", notes="other words", split="the test split",
                       official=replace(p.official, name="x", source="y"))
    assert reworded.hash == p.hash
    assert json.loads(json.dumps(p.definition()))["captions"]["video_to_text"] == "clip4clip"


# ---------------------------------------------------------------- retrieval edge cases

# 7 texts x 4 videos. Video 3 has no caption (a distractor); texts 0 and 1 are a duplicate caption of video 0;
# texts 2 and 4 are the same text for videos 1 and 2 (a duplicate across videos); several ties.
SIM = torch.tensor([
    [0.90, 0.20, 0.10, 0.95],  # a0 -> v0: the distractor beats it            t2v 2
    [0.90, 0.20, 0.10, 0.95],  # a1 -> v0: duplicate of a0, its own query      t2v 2
    [0.30, 0.60, 0.60, 0.00],  # a2 -> v1: tie with v2 (pessimistic)           t2v 2
    [0.10, 0.20, 0.80, 0.30],  # a3 -> v2                                      t2v 1
    [0.30, 0.60, 0.60, 0.00],  # a4 -> v2: same text as a2, tie with v1         t2v 2
    [0.95, 0.50, 0.00, 0.00],  # a5 -> v1                                      t2v 2
    [0.92, 0.55, 0.00, 0.00],  # a6 -> v1                                      t2v 2
])
INDEX = torch.tensor([0, 0, 1, 2, 2, 1, 1])
T2V = [2, 2, 2, 1, 2, 2, 2]
# video -> text, three queries (video 3 has no caption):
#   best_caption: v0 best 0.90 < a5 0.95, a6 0.92 -> 3; v1 best 0.60 tied by a4 -> 2; v2 best 0.80 -> 1
#   clip4clip:    M[1] = max(a2, a5, a6) = [.95, .60, .60, 0]: v0 0.90 < 0.95 (one video) -> 2;
#                 v1 0.60 tied by M[2, 1] = 0.60 -> 2; v2 0.80 > 0.10, 0.60 -> 1
V2T = {"best_caption": [3, 2, 1], "clip4clip": [2, 2, 1]}


@pytest.mark.parametrize("name", RETRIEVAL)
def test_retrieval_protocol_edge_cases(name):
    p = get_protocol(name)
    v2t = V2T[p.captions.video_to_text]
    out = p.evaluate_similarity(SIM, INDEX)
    m = out["metrics"]
    assert out["protocol"] == name and out["protocol_hash"] == p.hash
    assert (out["num_videos"], out["num_texts"]) == (4, 7)
    assert m["t2v_R@1"] == pytest.approx(100 / 7) and m["t2v_MnR"] == pytest.approx(sum(T2V) / 7)
    assert m["v2t_R@1"] == pytest.approx(100 * v2t.count(1) / 3) and m["v2t_MnR"] == pytest.approx(sum(v2t) / 3)
    assert not out["comparable"] and "not comparable" in out["comparable_reason"]
    # the embedding path gives the same numbers: text rows = SIM, videos = the unit vectors
    emb = p.evaluate(SIM, torch.eye(4), INDEX, normalize=False)
    assert emb["metrics"] == m
    # DSL numbers only under dsl_ keys; the protocol's own numbers are unchanged
    with_dsl = p.evaluate(SIM, torch.eye(4), INDEX, normalize=False, dsl=True)["metrics"]
    assert {k: v for k, v in with_dsl.items() if not k.startswith("dsl_")} == m and "dsl_t2v_R@1" in with_dsl


def test_protocol_conventions():
    assert get_protocol("msvd").captions.video_to_text == "clip4clip"
    assert get_protocol("vatex").captions.video_to_text == "clip4clip"
    assert get_protocol("msrvtt-1ka").captions.video_to_text == "best_caption"
    assert get_protocol("anet-paragraph").captions.mode == "paragraph"
    assert get_protocol("didemo-paragraph").captions.max_text_tokens == 64
    assert all(get_protocol(n).ties == "pessimistic" for n in RETRIEVAL)


@pytest.mark.parametrize("name", ["didemo-paragraph", "anet-paragraph"])
def test_paragraph_joining_and_a_video_without_sentences(name):
    p = get_protocol(name)
    index = FormatIndex([
        VideoEntry("a.mp4", "a", ["A man  ", " walks in.", "He sits."]),
        VideoEntry("b.mp4", "b", []),  # no sentence: no paragraph, stays in the gallery only
        VideoEntry("c.mp4", "c", ["  ", "A dog."]),
    ])
    prepared = p.prepare_index(index)
    assert [e.captions for e in prepared.entries] == [["A man walks in. He sits."], [], ["A dog."]]
    assert p.prepare_index(prepared).entries[0].captions == ["A man walks in. He sits."]  # idempotent
    caption_index = torch.tensor([i for i, e in enumerate(prepared.entries) for _ in e.captions])
    assert caption_index.tolist() == [0, 2]
    sim = torch.tensor([[0.5, 0.7, 0.5], [0.1, 0.2, 0.9]])  # paragraph a: beaten by b, tied by c -> 3
    m = p.evaluate_similarity(sim, caption_index)["metrics"]
    assert (m["t2v_MnR"], m["t2v_R@1"]) == (2.0, 50.0)
    assert (m["v2t_MnR"], m["v2t_R@1"]) == (1.0, 100.0)  # two queries: video b has no paragraph


def test_multi_caption_protocol_keeps_captions_as_they_are():
    index = FormatIndex([VideoEntry("a.mp4", "a", ["x", "x", "y"])])
    assert get_protocol("msvd").prepare_index(index).entries[0].captions == ["x", "x", "y"]  # duplicates kept


def test_official_size_decides_comparable():
    p = get_protocol("msrvtt-1ka")
    sim = torch.eye(1000)
    out = p.evaluate_similarity(sim, torch.arange(1000))
    assert out["comparable"] and out["metrics"]["t2v_R@1"] == 100.0
    ok, why = p.check_counts(999, 999)
    assert not ok and "999 videos, official 1000" in why
    ok, why = get_protocol("msvd").check_counts(670, 27000)
    assert not ok and "27000 texts, official 27763" in why


def test_check_sampling_names_each_difference():
    p = get_protocol("msvd")
    assert p.check_sampling(SamplingConfig(num_frames=12, sampler="fps", sampler_args={"fps": 1.0})) == []
    diffs = p.check_sampling(SamplingConfig(num_frames=8, eval_num_frames=16, eval_sampler="segment"),
                             TransformConfig(three_crop=True))
    assert diffs == ["frames: 16 != 12", "sampler: segment != fps", "sampler args: {} != {'fps': 1.0}",
                     "three_crop: True != False"]
    k = get_protocol("kinetics")
    assert k.sampling.as_data_config()["sampling"]["eval_sampler"] == "multiview"
    good = SamplingConfig(num_frames=8, eval_sampler="multiview",
                          eval_sampler_args={"sampler": "segment", "num_views": 4})
    assert k.check_sampling(good, TransformConfig(three_crop=True)) == []


def test_a_protocol_refuses_the_other_task_and_bad_definitions():
    with pytest.raises(ValueError, match="is a retrieval protocol, not recognition"):
        get_protocol("msvd").evaluate_logits(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="is a recognition protocol, not retrieval"):
        get_protocol("kinetics").evaluate_similarity(SIM, INDEX)
    with pytest.raises(ValueError, match="video_to_text must be one of"):
        CaptionSpec("multi", "mean")
    with pytest.raises(ValueError, match="needs a caption spec"):
        EvalProtocol("x", "retrieval", "d", "s", (), get_protocol("msvd").sampling)


# ---------------------------------------------------------------- recognition


def test_single_label_protocol_ties_and_views():
    p = get_protocol("kinetics")
    logits = torch.tensor([[[2.0, 2.0, 0.0]], [[0.0, 3.0, 1.0]], [[1.0, 0.0, 0.0]]])  # sample 0: a tie at the top
    out = p.evaluate_logits(logits, torch.tensor([0, 1, 0]))
    assert out["metrics"]["top1"] == pytest.approx(200 / 3)  # the tie is a miss (pessimistic)
    assert out["protocol"] == "kinetics" and not out["comparable"] and out["num_videos"] == 3
    two_views = torch.cat([logits, torch.tensor([[[0.0, 0.0, 5.0]], [[0.0, 3.0, 1.0]], [[1.0, 0.0, 0.0]]])], dim=1)
    fused = p.evaluate_logits(two_views, torch.tensor([0, 1, 0]))["metrics"]
    assert fused["top1"] == pytest.approx(200 / 3)  # sample 0 now goes to class 2 after the softmax average


def test_charades_protocol_is_map_on_multi_hot_targets():
    p = get_protocol("charades")
    scores = torch.tensor([[3.0, 0.0], [2.0, 1.0], [1.0, 2.0]])
    targets = torch.tensor([[1, 0], [0, 1], [1, 1]])
    m = p.evaluate_logits(scores, targets)["metrics"]
    # class 0 ranks samples 0, 1, 2 (sigmoid keeps the order): positives at 1 and 3 -> AP (1 + 2/3) / 2
    # class 1 ranks 2, 1, 0: positives at 1, 2 -> AP 1
    assert m["mAP"] == pytest.approx(100 * ((1 + 2 / 3) / 2 + 1) / 2)
    with pytest.raises(ValueError, match="multi-hot targets"):
        p.evaluate_logits(scores, torch.tensor([0, 1, 1]))


def test_combine_splits_and_base_novel():
    ps = [get_protocol(f"k600-zeroshot-{s}") for s in (1, 2, 3)]
    results = [{**p.header(), "comparable": True, "metrics": {"top1": t, "top5": 90.0}}
               for p, t in zip(ps, (60.0, 62.0, 64.0), strict=True)]
    c = combine_splits(results)
    assert c["metrics"]["top1"] == pytest.approx(62.0) and c["std"]["top1"] == pytest.approx((8 / 3) ** 0.5)
    assert c["protocol_hashes"] == [p.hash for p in ps] and c["splits"] == 3
    base = {**get_protocol("hmdb51-base2novel-base").header(), "comparable": True, "metrics": {"top1": 80.0}}
    novel = {**get_protocol("hmdb51-base2novel-novel").header(), "comparable": False, "metrics": {"top1": 40.0}}
    hm = combine_base_novel(base, novel)
    assert hm["metrics"]["hm_top1"] == pytest.approx(2 * 80 * 40 / 120) and not hm["comparable"]


@pytest.mark.parametrize("name", RECOGNITION)
def test_every_recognition_protocol_evaluates_a_perfect_and_a_tied_model(name):
    p = get_protocol(name)
    n, k = 6, 3
    labels = torch.arange(n) % k
    if p.metric == "mAP":
        target = torch.nn.functional.one_hot(labels, k)
        assert p.evaluate_logits(target.float() * 5, target)["metrics"]["mAP"] == pytest.approx(100.0)
        return
    perfect = torch.nn.functional.one_hot(labels, k).float()[:, None] * 5  # [N, 1, K]
    assert p.evaluate_logits(perfect, labels)["metrics"]["top1"] == pytest.approx(100.0)
    assert p.evaluate_logits(torch.zeros(n, 1, k), labels)["metrics"]["top1"] == 0.0  # all tied: no credit
    assert isinstance(p.official, Official) and p.official.videos > 0
