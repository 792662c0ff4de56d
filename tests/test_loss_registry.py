"""Retrieval losses of the registry (``contrastive.loss``): hand-computed small cases, config errors, the gather
(2 gloo processes), and a short synthetic-corpus run per loss on the tiny model."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_retrieval_task import TINY, ColorVideos, tokenizer_dir  # noqa: F401  (tokenizer_dir: a fixture)

from vidlang.data.collate import collate_samples
from vidlang.errors import ConfigError
from vidlang.losses import LOSSES, ContrastiveLoss
from vidlang.losses.m2mix import slerp
from vidlang.losses.soft_target import soft_cross_entropy
from vidlang.losses.symile import SymileLoss
from vidlang.tasks.config import ContrastiveConfig

ZERO = torch.tensor(0.0)  # logit_scale 0: scale 1
R = 1 / math.sqrt(2)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_registry_lists_the_losses_and_infonce_is_contrastive_loss():
    assert set(LOSSES.names()) >= {"infonce", "soft_target", "m2mix", "align_uniform", "symile"}
    assert LOSSES.get("infonce") is ContrastiveLoss
    assert ContrastiveConfig().loss == "infonce"


def test_soft_target_hand_computed_smoothing_and_bootstrap():
    video, text = t([1, 0], [0, 1]), t([1, 0], [0.6, 0.8])
    idx = torch.arange(2)
    lse1, lse2 = math.log(math.e + 1), math.log(math.exp(0.6) + math.exp(0.8))
    # t2v rows: [1, 0] target 0; [0.6, 0.8] target 1. v2t rows: [1, 0.6] target 0; [0, 0.8] target 1.
    lse3, lse4 = math.log(math.e + math.exp(0.6)), math.log(1 + math.exp(0.8))
    s = 0.2
    t2v = (-(0.9 * (1 - lse1) + 0.1 * (0 - lse1)) - (0.1 * (0.6 - lse2) + 0.9 * (0.8 - lse2))) / 2
    v2t = (-(0.9 * (1 - lse3) + 0.1 * (0.6 - lse3)) - (0.1 * (0 - lse4) + 0.9 * (0.8 - lse4))) / 2
    out = LOSSES.build("soft_target", smoothing=s)(video, text, idx, ZERO)
    assert out.loss_t2v.item() == pytest.approx(t2v, abs=1e-6)
    assert out.loss_v2t.item() == pytest.approx(v2t, abs=1e-6)
    assert out.loss.item() == pytest.approx((t2v + v2t) / 2, abs=1e-6)
    # bootstrap 0.5: q = 0.5 onehot + 0.5 p on the first t2v row
    p = [math.exp(1 - lse1), math.exp(-lse1)]
    q = [0.5 + 0.5 * p[0], 0.5 * p[1]]
    row0 = -(q[0] * (1 - lse1) + q[1] * (0 - lse1))
    boot = LOSSES.build("soft_target", smoothing=0.0, bootstrap=0.5)
    logits = torch.tensor([[1.0, 0.0]])
    got = soft_cross_entropy(logits, torch.ones(1, 2, dtype=torch.bool), torch.tensor([0]), 0.0, 0.5)
    assert got.item() == pytest.approx(row0, abs=1e-6)
    assert boot(video, text, idx, ZERO).loss.item() > 0


def test_soft_target_without_softening_is_infonce_and_smooths_over_valid_candidates_only():
    g = torch.Generator().manual_seed(0)
    video, text = torch.randn(3, 5, generator=g), torch.randn(6, 5, generator=g)
    idx = torch.tensor([0, 0, 1, 2, 2, 2])
    ref = ContrastiveLoss()(video, text, idx, torch.tensor(1.5))
    out = LOSSES.build("soft_target", smoothing=0.0)(video, text, idx, torch.tensor(1.5))
    assert out.loss.item() == pytest.approx(ref.loss.item(), abs=1e-6)
    # v2t with smoothing: video 2 has 3 captions; each pair's candidates = itself + 3 negatives (K = 4)
    s = 0.3
    out = LOSSES.build("soft_target", smoothing=s)(video, text, idx, ZERO)
    vn, tn = torch.nn.functional.normalize(video, dim=-1), torch.nn.functional.normalize(text, dim=-1)
    sims = (vn @ tn.t()).tolist()
    per_video = []
    for b in range(3):
        own = [a for a in range(6) if idx[a] == b]
        neg = [a for a in range(6) if idx[a] != b]
        pairs = []
        for a in own:
            cand = [a] + neg
            lse = math.log(sum(math.exp(sims[b][c]) for c in cand))
            q = {c: s / len(cand) + (1 - s) * (c == a) for c in cand}
            pairs.append(-sum(q[c] * (sims[b][c] - lse) for c in cand))
        per_video.append(sum(pairs) / len(pairs))
    assert out.loss_v2t.item() == pytest.approx(sum(per_video) / 3, abs=1e-5)


def test_m2mix_hand_computed():
    video, text = t([1, 0], [-1, 0]), t([0, 1], [0, -1])
    mixed = slerp(video, text, 0.5)
    assert torch.allclose(mixed, t([R, R], [-R, -R]), atol=1e-5)
    loss = LOSSES.build("m2mix", weight=1.0, mix_temperature=1.0, lam=0.5)
    out = loss(video, text, torch.arange(2), ZERO)
    mix = 2 * math.log(1 + math.exp(-R))  # each row: positive 0, one negative at -1/sqrt(2); video + caption rows
    assert out.extra["mix"].item() == pytest.approx(mix, abs=1e-5)
    assert out.loss.item() == pytest.approx(math.log(2) + mix, abs=1e-5)  # InfoNCE: every cosine 0
    drawn = LOSSES.build("m2mix")(video, text, torch.arange(2), ZERO)  # lam ~ Beta(0.5, 0.5)
    assert torch.isfinite(drawn.loss)


def test_m2mix_several_captions_hand_computed():
    """Captions 0, 1 of video 0, caption 2 of video 1: pair 1 is no negative of caption 0 (same video)."""
    video, text = t([1, 0], [0, 1]), t([1, 0], [0.8, 0.6], [0, 1])
    loss = LOSSES.build("m2mix", weight=1.0, mix_temperature=1.0, lam=0.5)
    out = loss(video, text, torch.tensor([0, 0, 1]), ZERO)
    n1 = math.sqrt(0.1) / 0.6 * 0.6  # slerp(v0, t1; 0.5) . (0, 1): sin(th/2)/sin th * (v0 + t1)_y, cos th = 0.8
    # mixed negatives: n0 = v0, n2 = v1 (identical pairs), n1 as above
    text_rows = [math.log(1 + math.exp(-1)),  # t0: positive 1, negative t0.n2 = 0 (n1: same video)
                 -math.log(math.exp(0.8) / (math.exp(0.8) + math.exp(0.6))),  # t1: positive 0.8, t1.n2 = 0.6
                 -math.log(math.e / (math.e + 1 + math.exp(n1)))]  # t2: positive 1, t2.n0 = 0, t2.n1
    video_rows = [(math.log(math.e + 1) - 1 + math.log(math.exp(0.8) + 1) - 0.8) / 2,  # v0: 2 positives, v0.n2 = 0
                  math.log(math.e + 1 + math.exp(n1)) - 1]  # v1: positive t2, negatives v1.n0 = 0, v1.n1
    assert out.extra["mix"].item() == pytest.approx(sum(text_rows) / 3 + sum(video_rows) / 2, abs=1e-4)


def test_align_uniform_hand_computed():
    video, text = t([1, 0], [0, 1]), t([1, 0], [0, 1])
    out = LOSSES.build("align_uniform")(video, text, torch.arange(2), ZERO)
    assert out.extra["align"].item() == pytest.approx(0.0, abs=1e-6)
    assert out.extra["uniform"].item() == pytest.approx(-4.0, abs=1e-5)  # ||v1 - v2||^2 = 2, t = 2
    assert out.loss.item() == pytest.approx(math.log(1 + math.exp(-1)) - 4.0, abs=1e-5)
    text2 = t([0, 1], [1, 0])
    out = LOSSES.build("align_uniform", uniform_weight=0.0, infonce_weight=0.0)(video, text2, torch.arange(2), ZERO)
    assert out.loss.item() == pytest.approx(2.0, abs=1e-5)  # ||(1,0) - (0,1)||^2


def test_symile_hand_computed_with_and_without_audio():
    e = t([1, 0], [0, 1])
    out = SymileLoss()(e, e, torch.arange(2), ZERO, audio=e)
    r2 = math.sqrt(2)
    assert out.loss.item() == pytest.approx(math.log(1 + 3 * math.exp(-r2)), abs=1e-5)
    out = SymileLoss()(e, e, torch.arange(2), ZERO, audio=e, audio_mask=torch.tensor([True, False]))
    a = -math.log(math.exp(r2) / (math.exp(r2) + math.e + 2))  # clip 0 (audio): its pair with the neutral audio
    b = -math.log(math.e / (math.e + 3))  # clip 1 (no audio): pairwise cosine 1
    audio_anchor = -math.log(math.exp(r2) / (math.exp(r2) + 3))
    assert out.loss_t2v.item() == pytest.approx((a + b) / 2, abs=1e-5)
    assert out.loss_v2t.item() == pytest.approx((a + b) / 2, abs=1e-5)
    assert out.extra["audio_anchor"].item() == pytest.approx(audio_anchor, abs=1e-5)
    assert out.loss.item() == pytest.approx(((a + b) / 2 * 2 + audio_anchor) / 3, abs=1e-5)


def test_symile_several_captions_and_errors():
    g = torch.Generator().manual_seed(1)
    v, u, x = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g)
    v.requires_grad_(True)
    out = SymileLoss()(v, x, torch.tensor([0, 0, 1, 2, 2]), ZERO, audio=u, audio_mask=torch.tensor([1, 0, 1]).bool())
    out.loss.backward()
    assert torch.isfinite(out.loss) and v.grad is not None and torch.isfinite(v.grad).all()
    with pytest.raises(ValueError, match="needs audio"):
        SymileLoss()(v, x, torch.tensor([0, 0, 1, 2, 2]), ZERO)
    with pytest.raises(ConfigError, match="local_loss"):
        SymileLoss(local_loss=True)
    with pytest.raises(ConfigError, match="directions"):
        SymileLoss(directions="sum")


def test_config_and_argument_errors():
    with pytest.raises(ConfigError, match="unknown retrieval loss 'infonse'.*soft_target"):
        ContrastiveConfig(loss="infonse")
    with pytest.raises(ConfigError, match="needs similarity 'cosine'"):
        ContrastiveConfig(loss="m2mix", similarity="mug")
    with pytest.raises(ConfigError, match="feature cache"):
        ContrastiveConfig(loss="symile", micro_batch_size=2)
    with pytest.raises(ConfigError, match="needs similarity 'cosine'"):
        ContrastiveConfig(loss="symile", similarity="mug")
    with pytest.raises(ConfigError, match="smoothin"):
        LOSSES.build("soft_target", smoothin=0.1)
    with pytest.raises(ConfigError, match="smoothing"):
        LOSSES.build("soft_target", smoothing=1.5)
    with pytest.raises(ConfigError, match="lam"):
        LOSSES.build("m2mix", lam=1.0)
    with pytest.raises(ValueError, match="embeddings"):
        LOSSES.build("align_uniform")(t([1, 0]), t([1, 0]), torch.arange(1), ZERO, similarity=lambda a, b: a @ b.t())
    ContrastiveConfig(loss="soft_target", similarity="mug", loss_args={"smoothing": 0.1})  # logits only: fine


# -- the gather: 2 processes, each with half the batch, equal the single-process loss and gradients ------------
CASES = [("infonce", {}), ("soft_target", {"smoothing": 0.1, "bootstrap": 0.2}),
         ("m2mix", {"lam": 0.3, "weight": 0.5}), ("align_uniform", {}), ("symile", {})]


def _data():
    g = torch.Generator().manual_seed(3)
    return (torch.randn(4, 6, generator=g), torch.randn(6, 6, generator=g), torch.tensor([0, 0, 1, 2, 3, 3]),
            torch.randn(4, 6, generator=g), torch.tensor([True, False, True, True]))


def _run(name, kwargs, video, text, idx, audio, mask):
    loss = LOSSES.build(name, **kwargs)
    extra = {"audio": audio, "audio_mask": mask} if name == "symile" else {}
    return loss(video, text, idx, torch.tensor(1.0), **extra).loss


def _worker(rank: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    video, text, idx, audio, mask = _data()
    vs, ts = slice(2 * rank, 2 * rank + 2), slice(3 * rank, 3 * rank + 3)
    res = {}
    for name, kwargs in CASES:
        v, x, a = (z.clone().requires_grad_(True) for z in (video[vs], text[ts], audio[vs]))
        loss = _run(name, kwargs, v, x, idx[ts] - 2 * rank, a, mask[vs])
        loss.backward()
        res[name] = (loss.item(), v.grad / 2, x.grad / 2)  # / world: DDP averages the parameter gradients
    out[rank] = res
    dist.destroy_process_group()


def test_every_loss_under_the_gather_equals_the_single_process_loss():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(port, out), nprocs=2, join=True)
    video, text, idx, audio, mask = _data()
    for name, kwargs in CASES:
        v, x = video.clone().requires_grad_(True), text.clone().requires_grad_(True)
        loss = _run(name, kwargs, v, x, idx, audio, mask)
        loss.backward()
        for rank in (0, 1):
            value, gv, gx = out[rank][name]
            assert value == pytest.approx(loss.item(), abs=1e-5), name
            assert torch.allclose(gv, v.grad[2 * rank: 2 * rank + 2], atol=1e-5), name
            assert torch.allclose(gx, x.grad[3 * rank: 3 * rank + 3], atol=1e-5), name


# -- each loss trains: 30 steps on the tiny model over the colour-video corpus (symile: small linear encoders) ---
@pytest.mark.parametrize(("name", "args"), [("infonce", {}), ("soft_target", {"smoothing": 0.1, "bootstrap": 0.1}),
                                            ("m2mix", {"weight": 0.1}), ("align_uniform", {})])
def test_each_loss_trains_on_a_synthetic_corpus(name, args, tokenizer_dir):  # noqa: F811  (the fixture)
    from vidlang.tasks import RetrievalTask

    torch.manual_seed(1)
    task = RetrievalTask(TINY, tokenizer=str(tokenizer_dir), optim={"lr": 3e-3, "weight_decay": 0.0},
                         contrastive={"loss": name, "loss_args": args})
    assert type(task.loss) is LOSSES.get(name)
    batch = task.on_after_batch_transfer(collate_samples([ColorVideos()[i] for i in range(8)]), 0)
    opt = torch.optim.AdamW(task.parameters(), lr=3e-3)
    losses, retrieval = [], []
    for _ in range(30):
        loss, out, _ = task.forward_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(out.loss.item())
        retrieval.append((out.loss_t2v.item() + out.loss_v2t.item()) / 2)
    print(name, [round(x, 3) for x in losses[::5]], [round(x, 3) for x in retrieval[::5]])
    assert sum(losses[-5:]) / 5 < losses[0] - 0.3, losses
    assert sum(retrieval[-5:]) / 5 < 0.7 * retrieval[0], retrieval


def test_symile_trains_on_a_synthetic_triple_corpus():
    """Clip i has a video, an audio and a caption view of a shared latent (one audio in four missing)."""
    torch.manual_seed(0)
    latent = torch.randn(32, 8)
    views = [latent @ torch.randn(8, 16) + 0.1 * torch.randn(32, 16) for _ in range(3)]
    enc = torch.nn.ModuleList([torch.nn.Linear(16, 8) for _ in range(3)])
    mask = torch.arange(32) % 4 != 0
    opt = torch.optim.Adam(enc.parameters(), lr=1e-2)
    loss_fn, losses = SymileLoss(), []
    for _ in range(30):
        v, u, x = (e(z) for e, z in zip(enc, views, strict=True))
        loss = loss_fn(v, x, torch.arange(32), torch.tensor(math.log(10.0)), audio=u, audio_mask=mask).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0], losses
