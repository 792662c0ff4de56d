"""``vidlang bench temporal``: symmetric eval sampling, label-aware augmentation, metrics, a tiny full run."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from vidlang.bench.motion.data import augment, eval_indices
from vidlang.bench.motion.train import TrainRecipe, model_config, motion_metrics
from vidlang.data.synthetic import MOTIONS, REVERSE_PAIRS, encode_video, make_specs, render_video
from vidlang.data.transforms import normalize
from vidlang.models.factory import build_model


def _reverse_twin(spec):
    """The same video with its motion replaced by the reverse: its frames are ``spec``'s, reversed in time."""
    return dataclasses.replace(spec, motion=REVERSE_PAIRS[spec.motion], key=str(int(spec.key) + 1))


def _paired_spec(motion: str = "left"):
    return next(s for s in make_specs(40, seed=3, size=32, frames=24) if s.motion == motion)


@pytest.mark.parametrize("motion", ["left", "up", "grow", "clockwise"])
def test_reversed_pair_same_frames_reversed_and_same_mean_embedding(motion):
    spec = _paired_spec(motion)
    a, b = render_video(spec), render_video(_reverse_twin(spec))  # [N, H, W, 3]
    assert np.array_equal(a, b[::-1]) and not np.array_equal(a, b)
    n = a.shape[0]
    idx = eval_indices(torch.arange(n, dtype=torch.float64) / spec.fps, spec.duration, 8)  # [T]
    assert torch.equal(idx, (n - 1) - idx.flip(0))  # symmetric under time reversal
    clip_a = torch.from_numpy(a[idx.numpy()]).permute(0, 3, 1, 2)  # [T, 3, H, W]
    clip_b = torch.from_numpy(b[idx.numpy()]).permute(0, 3, 1, 2)
    assert torch.equal(clip_a, clip_b.flip(0))  # the same frame set, in reverse order
    assert not torch.equal(clip_a, clip_b)

    torch.manual_seed(0)
    model = build_model(model_config(TrainRecipe(size=32), "mean")).eval()
    video = normalize(torch.stack([clip_a, clip_b]), model.image_mean, model.image_std)  # [2, T, 3, 32, 32]
    with torch.no_grad():
        emb = model.encode_video(video).embeds
    assert torch.allclose(emb[0], emb[1], atol=1e-5)
    frames = model.encode_video(video).frame_embeds
    assert not torch.allclose(frames[0], frames[1], atol=1e-3)  # the frames themselves differ, in order


def test_eval_indices_of_decoded_videos_are_symmetric(tmp_path):
    from vidlang.data.decoding import open_video

    spec = _paired_spec("right")
    encode_video(spec, tmp_path / "a.mp4")
    with open_video(tmp_path / "a.mp4") as reader:
        ts, duration = reader.frame_timestamps(), reader.metadata.duration
    idx = eval_indices(ts, duration, 8)
    assert idx.tolist() == [1, 4, 7, 10, 13, 16, 19, 22]


def test_eval_indices_refuse_asymmetric_layout():
    ts = torch.arange(24, dtype=torch.float64) / 8
    with pytest.raises(ValueError, match="not symmetric"):
        eval_indices(ts, 3.0, 6)  # segment middles land on frame boundaries


def test_augment_swaps_labels_with_the_transform():
    import itertools

    from vidlang.bench.motion.data import AUGMENTATIONS

    names = {m: MOTIONS.index(m) for m in MOTIONS}
    assert [MOTIONS[i] for i in AUGMENTATIONS["reverse_time"][1]] == [REVERSE_PAIRS.get(m, m) for m in MOTIONS]
    hmap, vmap = AUGMENTATIONS["hflip"][1], AUGMENTATIONS["vflip"][1]
    assert MOTIONS[hmap[names["left"]]] == "right" and MOTIONS[hmap[names["up"]]] == "up"
    assert MOTIONS[vmap[names["up"]]] == "down" and MOTIONS[vmap[names["grow"]]] == "grow"
    assert MOTIONS[vmap[names["clockwise"]]] == MOTIONS[hmap[names["clockwise"]]] == "counterclockwise"

    clips = torch.arange(4 * 3 * 3 * 2, dtype=torch.uint8).reshape(1, 4, 3, 3, 2).repeat(3, 1, 1, 1, 1)
    labels = torch.tensor([names["left"], names["clockwise"], names["static"]])
    combos = [c for k in range(4) for c in itertools.combinations(AUGMENTATIONS, k)]
    seen = set()
    for seed in range(24):
        out, lab = augment(clips, labels, torch.Generator().manual_seed(seed))
        for i in range(3):  # identify the flips applied to clip i; its label must follow them
            combo = next(c for c in combos if torch.equal(out[i], _apply(clips[i], c, AUGMENTATIONS)))
            expected = labels[i]
            for name in combo:
                expected = AUGMENTATIONS[name][1][expected]
            assert lab[i] == expected, (seed, i, combo)
            seen.add(combo)
    assert len(seen) == 8  # every combination occurs


def _apply(clip, combo, augs):
    for name in combo:
        clip = clip.flip([d - 1 for d in augs[name][0]])  # dims are for [B, T, ...]; clip has no B
    return clip


def test_motion_metrics_pair_and_static():
    lab = {m: MOTIONS.index(m) for m in MOTIONS}
    labels = torch.tensor([lab["left"], lab["right"], lab["up"], lab["static"]])
    logits = torch.zeros(4, len(MOTIONS))
    logits[0, lab["left"]] = 2.0  # correct
    logits[1, lab["left"]] = 2.0  # right video called left: 9-way wrong, pair wrong
    logits[2, lab["up"]], logits[2, lab["grow"]] = 1.0, 3.0  # 9-way wrong but up beats down: pair right
    logits[3, lab["static"]] = 1.0
    m = motion_metrics(logits, labels)
    assert m["acc"] == pytest.approx(2 / 4)
    assert m["paired_acc"] == pytest.approx(1 / 3)
    assert m["pair_acc"] == pytest.approx(2 / 3)
    assert m["static_acc"] == 1.0 and m["n_paired"] == 3 and m["n_static"] == 1
    assert motion_metrics(logits[:3], labels[:3])["static_acc"] is None


def test_tiny_benchmark_run(tmp_path, capsys):
    from vidlang.cli import main

    out = tmp_path / "res.json"
    argv = ["bench", "temporal", "--corpus", str(tmp_path / "corpus"), "--videos", "90", "--steps", "3",
            "--pretrain-steps", "2", "--batch", "8", "--blocks", "seq_transformer", "--timing-rounds", "1",
            "--json", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    res = json.loads(out.read_text())
    rows = {r["block"]: r for r in res["rows"]}
    assert list(rows) == ["mean", "seq_transformer"]  # mean is always the reference
    for r in rows.values():
        for key in ("acc", "pair_acc", "paired_acc", "static_acc"):
            assert 0.0 <= r[key] <= 1.0, (r["block"], key, r[key])
        assert r["n_static"] > 0 and r["n_paired"] > 0 and r["n_eval"] == res["budget"]["held_out_videos"]
        assert r["ms_per_step"] > 0 and math.isfinite(r["final_loss"])
    assert rows["mean"]["params_added"] == 0 and rows["mean"]["rel_step"] == 1.0
    assert rows["seq_transformer"]["params_added"] > 0
    assert rows["seq_transformer"]["trainable"] > rows["mean"]["trainable"]
    # mean pooling is order-free by construction (reversed clips embed identically); seq_transformer is not
    assert rows["mean"]["order_aware"] == "no" and rows["seq_transformer"]["order_aware"] == "yes"
    assert rows["seq_transformer"]["order_sensitivity"] > 100 * rows["mean"]["order_sensitivity"]
    assert res["seed"] == 0 and res["budget"]["steps"] == 3 and res["budget"]["eval_frame_indices"] == [
        1, 4, 7, 10, 13, 16, 19, 22]  # fmt: skip
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if line.startswith("| block"))
    assert "pair acc (2-way)" in header and "x mean" in header and "order-aware" in header
    assert sum(line.startswith(("| mean ", "| seq_transformer ")) for line in table.splitlines()) == 2


def test_calibrate_embed_norm_sets_the_scale_and_keeps_directions():
    from vidlang.bench.motion.data import ClipBank
    from vidlang.bench.motion.train import calibrate_embed_norm

    torch.manual_seed(0)
    n = 6
    bank = ClipBank(frames=torch.randint(0, 256, (n, 4, 3, 32, 32), dtype=torch.uint8),
                    timestamps=torch.arange(4, dtype=torch.float64), duration=0.5,
                    labels=torch.zeros(n, dtype=torch.long), shapes=torch.zeros(n, dtype=torch.long),
                    colors=torch.zeros(n, dtype=torch.long),
                    rgb=torch.zeros(n, 3, dtype=torch.uint8), keys=[str(i) for i in range(n)])  # fmt: skip
    model = build_model(model_config(TrainRecipe(size=32), "mean")).eval()
    x = normalize(bank.frames[:, 0], model.image_mean, model.image_std)
    with torch.no_grad():
        before = model.encode_image(x)
        factor = calibrate_embed_norm(model, bank, 0.5, seed=1, count=64)
        after = model.encode_image(x)
    assert factor > 0 and not math.isclose(factor, 1.0, rel_tol=1e-3)
    assert torch.allclose(after, factor * before, rtol=1e-4, atol=1e-6)  # same directions, new scale
    assert after.norm(dim=-1).mean().item() == pytest.approx(0.5, rel=0.3)


@pytest.mark.parametrize(("steps", "warmup"), [(300, 0.1), (1000, 0.1), (7, 0.0), (5, 0.5)])
def test_bench_schedule_is_the_tasks_warmup_cosine(steps, warmup):
    """The benchmark's lr schedule is the tasks' (``vidlang.tasks.schedule``), with the factors of the closed form
    it used to write out itself: ``(s+1)/w`` while warming up (w >= 1 step), then a cosine from 1 to 0."""
    from vidlang.bench.motion.train import schedule

    w = max(1, round(steps * warmup))
    expected = [(s + 1) / w if s < w else 0.5 * (1 + math.cos(math.pi * (s - w) / max(1, steps - w)))
                for s in range(steps)]  # fmt: skip
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched, got = schedule(opt, steps, warmup), []
    for _ in range(steps):
        got.append(opt.param_groups[0]["lr"] / 2.0)
        opt.step()
        sched.step()
    assert got == pytest.approx(expected, abs=1e-12)
