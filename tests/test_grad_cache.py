"""Feature-cache gradient accumulation (vidlang/losses/grad_cache.py): over K micro-batches the loss and every
parameter gradient equal the full-batch computation (1e-5), with a real tiny video-text model; random layers
are replayed; with 2 gloo processes and the loss's cross-rank gather, the rank-averaged gradients equal the
single-process gradients of the global batch."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

from vidlang.losses import ContrastiveLoss
from vidlang.losses.grad_cache import cached_contrastive_backward
from vidlang.models.factory import ModelConfig, build_model

SIZES = [(3, [1, 2, 1]), (2, [2, 1]), (3, [1, 1, 3])]  # micro-batches: (videos, captions per video)


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(image="vit_tiny", num_frames=2, block="mean", freeze="full"))
    return model.train()


def micro_batches(sizes=SIZES, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for videos, caps in sizes:
        a = sum(caps)
        out.append({"video": torch.randn(videos, 2, 3, 32, 32, generator=g),
                    "ids": torch.randint(1, 500, (a, 24), generator=g), "mask": torch.ones(a, 24, dtype=torch.long),
                    "caption_index": torch.repeat_interleave(torch.arange(videos), torch.tensor(caps))})
    return out


def full_batch(mbs: list[dict]) -> dict:
    offsets = torch.tensor([0] + [m["video"].shape[0] for m in mbs[:-1]]).cumsum(0)
    return {"video": torch.cat([m["video"] for m in mbs]), "ids": torch.cat([m["ids"] for m in mbs]),
            "mask": torch.cat([m["mask"] for m in mbs]),
            "caption_index": torch.cat([m["caption_index"] + o for m, o in zip(mbs, offsets, strict=True)])}


def encoders(model, dropout: float = 0.0):
    def video(mb):
        return F.dropout(model.encode_video(mb["video"]).embeds, dropout, training=dropout > 0)

    def text(mb):
        return F.dropout(model.encode_text(mb["ids"], mb["mask"]).embeds, dropout, training=dropout > 0)

    return video, text


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def reference(model, mbs, loss_fn, dropout: float = 0.0) -> tuple[torch.Tensor, dict]:
    """One autograd graph over the whole batch; with dropout the micro-batches are encoded in the same order
    (video, text of each), so the random masks are the same draws."""
    model.zero_grad()
    enc_v, enc_t = encoders(model, dropout)
    if dropout:
        v, t = zip(*[(enc_v(m), enc_t(m)) for m in mbs], strict=True)
        v, t = torch.cat(v), torch.cat(t)
        index = full_batch(mbs)["caption_index"]
    else:
        b = full_batch(mbs)
        v, t, index = enc_v(b), enc_t(b), b["caption_index"]
    loss = loss_fn(v, t, index, model.logit_scale).loss
    loss.backward()
    return loss.detach(), grads(model)


def cached(model, mbs, loss_fn, dropout: float = 0.0) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    enc_v, enc_t = encoders(model, dropout)
    out = cached_contrastive_backward(mbs, enc_v, enc_t, lambda v, t, i: loss_fn(v, t, i, model.logit_scale),
                                      [m["caption_index"] for m in mbs])
    assert not out.loss.requires_grad
    return out.loss, grads(model)


def assert_same(a: tuple, b: tuple) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-5)
    assert set(a[1]) == set(b[1]) and len(a[1]) > 20 and "logit_scale" in a[1]
    for name, g in a[1].items():
        torch.testing.assert_close(b[1][name], g, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("local_loss", [False, True])
def test_loss_and_every_gradient_equal_the_full_batch(local_loss):
    model, mbs = tiny_model(), micro_batches()
    loss_fn = ContrastiveLoss(local_loss=local_loss)
    want = reference(model, mbs, loss_fn)
    got = cached(model, mbs, loss_fn)
    assert_same(want, got)
    assert want[1]["image_tower.conv1.weight"].abs().sum() > 0
    # plain accumulation (each micro-batch its own negatives) is a different loss: the check can fail
    model.zero_grad()
    enc_v, enc_t = encoders(model)
    plain = sum(loss_fn(enc_v(m), enc_t(m), m["caption_index"], model.logit_scale).loss for m in mbs) / len(mbs)
    assert abs(float(plain) - float(want[0])) > 1e-3


def test_random_layers_are_replayed():
    """Dropout on the embeddings: the replay draws the masks of the cached pass (else the gradients would
    belong to other masks), and the RNG ends where a plain forward would leave it."""
    model, mbs = tiny_model(), micro_batches()
    loss_fn = ContrastiveLoss()
    torch.manual_seed(7)
    want = reference(model, mbs, loss_fn, dropout=0.3)
    after_reference = torch.rand(1)
    torch.manual_seed(7)
    got = cached(model, mbs, loss_fn, dropout=0.3)
    assert_same(want, got)
    assert torch.equal(torch.rand(1), after_reference)


def test_frozen_text_tower_and_errors():
    model, mbs = tiny_model(), micro_batches()
    for p in model.text_tower.parameters():
        p.requires_grad_(False)
    loss_fn = ContrastiveLoss()
    want, got = reference(model, mbs, loss_fn), cached(model, mbs, loss_fn)
    assert not any(n.startswith("text_tower.") for n in got[1])
    assert_same(want, got)
    enc_v, enc_t = encoders(model)
    with pytest.raises(ValueError, match="no micro-batches"):
        cached_contrastive_backward([], enc_v, enc_t, lambda v, t, i: v.sum(), [])
    with pytest.raises(ValueError, match="3 micro-batches but 2 caption_index"):
        cached_contrastive_backward(mbs, enc_v, enc_t, lambda v, t, i: v.sum(), [m["caption_index"] for m in mbs[:2]])


# -- 2 processes -------------------------------------------------------------------------------------
RANK_SIZES = [[(2, [1, 2]), (2, [1, 1])], [(1, [3]), (3, [1, 2, 1])]]  # per rank: its micro-batches


def _rank(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = tiny_model()
        mbs = micro_batches(RANK_SIZES[rank], seed=10 + rank)
        loss, g = cached(model, mbs, ContrastiveLoss(gather=True))
        for t in g.values():  # what DDP does: average the ranks' gradients
            dist.all_reduce(t)
            t /= world
        torch.save({"loss": loss, "grads": g}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    with tempfile.NamedTemporaryFile(dir=tmp_path, delete=False) as f:
        init = f"file://{f.name}"
    os.unlink(f.name)
    mp.spawn(_rank, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    mbs = micro_batches(RANK_SIZES[0], seed=10) + micro_batches(RANK_SIZES[1], seed=11)  # global batch, rank order
    want = reference(tiny_model(), mbs, ContrastiveLoss(gather=True))  # no process group here: one process
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert_same(want, (got["loss"], got["grads"]))


def test_tiny_gradcache_benchmark_run(capsys):
    """``vidlang bench gradcache``: a tiny run prints the full-batch row and a feature-cache row whose ratios are
    computed from the rows."""
    import re

    from vidlang.cli import main

    argv = ["bench", "gradcache", "--image-size", "32", "--frames", "2", "--batch", "8", "--micro", "4",
            "--iters", "1"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = {m[1]: [float(x) for x in m.groups()[2:]] for m in re.finditer(
        r"^\| (full batch|feature cache) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", out, re.M)}
    assert set(rows) == {"full batch", "feature cache"}
    full, cached = rows["full batch"], rows["feature cache"]
    assert full[1] == 1.0 and full[0] > 0 and cached[2] > 0
    (c, f), ratio = (cached[0], full[0]), cached[1]  # MiB printed rounded to integers: the ratio within that rounding
    assert (c - 0.5) / (f + 0.5) - 0.01 <= ratio <= (c + 0.5) / max(f - 0.5, 0.5) + 0.01
