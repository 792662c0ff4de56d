"""RetrievalTask end to end with the real tiny model: fit a few steps, validate, test, reload a checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from vidlang.data.badsamples import SkippedSample
from vidlang.data.collate import collate_samples
from vidlang.data.sample import VideoSample
from vidlang.eval.retrieval import evaluate_embeddings
from vidlang.models.clip.tokenizer import train_tokenizer
from vidlang.models.factory import ModelConfig
from vidlang.tasks import RetrievalTask
from vidlang.tasks.base import normalize_uint8_video
from vidlang.tasks.retrieval import first_occurrences
from vidlang.tasks.schedule import resolve_warmup, warmup_cosine, warmup_cosine_factor

COLORS = ["red", "green", "blue", "yellow", "white", "black", "purple", "orange"]
RGB = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 255, 255), (0, 0, 0), (128, 0, 128), (255, 128, 0)]
TINY = ModelConfig(image="vit_tiny", num_frames=4)


class ColorVideos(Dataset):
    """Video i: a square of colour i moving right over 4 frames; captions name the colour.

    ``items``: the colour served at each position (repeats model sampler padding); ``bad``: colours that fail
    to load, served as :class:`SkippedSample` (what an evaluation dataset returns for them)."""

    def __init__(self, n: int = 8, captions_per_video: int = 2, items: list[int] | None = None,
                 bad: frozenset[int] = frozenset()) -> None:
        self.items = list(range(n)) if items is None else list(items)
        self.cpv, self.bad = captions_per_video, bad

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> VideoSample | SkippedSample:
        c = self.items[i]
        if c in self.bad:
            return SkippedSample(key=f"video{c:02d}", path=f"/videos/{c}.mp4", reason="VideoDecodeError: broken")
        video = torch.full((1, 4, 3, 32, 32), 40, dtype=torch.uint8)
        for t in range(4):
            video[0, t, :, 8:20, 4 + 4 * t : 16 + 4 * t] = torch.tensor(RGB[c], dtype=torch.uint8)[:, None, None]
        caps = [f"a {COLORS[c]} square moving right", f"the {COLORS[c]} box slides"][: self.cpv]
        return VideoSample(video=video, key=f"video{c:02d}", captions=caps)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    words = [f"a {c} square moving right the {c} box slides" for c in COLORS] * 5
    train_tokenizer(words, out, vocab_size=300, min_frequency=1, context_length=24)
    return out


def loaders(batch_size: int = 4, **kw) -> tuple[DataLoader, DataLoader]:
    train = DataLoader(ColorVideos(), batch_size=batch_size, shuffle=True, collate_fn=collate_samples)
    val = DataLoader(ColorVideos(**kw), batch_size=3, collate_fn=collate_samples)
    return train, val


def make_trainer(tmp_path, **kw) -> pl.Trainer:
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    args = dict(
        accelerator="cpu",
        devices=1,
        logger=pl.loggers.CSVLogger(tmp_path / "logs"),
        callbacks=[ckpt],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    args.update(kw)
    return pl.Trainer(**args)


def test_schedule_warmup_then_cosine():
    assert resolve_warmup(100, warmup_ratio=0.1) == 10
    assert resolve_warmup(100, warmup_steps=7) == 7
    assert resolve_warmup(100, warmup_steps=5, warmup_ratio=0.1) == 5  # explicit steps win
    assert resolve_warmup(100) == 0
    with pytest.raises(ValueError):
        resolve_warmup(100, warmup_ratio=1.5)
    f = [warmup_cosine_factor(s, 4, 12) for s in range(14)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[8] == pytest.approx(0.5)  # half-way through the cosine
    assert f[12] == pytest.approx(0.0) and f[13] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(f[4:], f[5:], strict=False))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = warmup_cosine(opt, 2, 10, min_ratio=0.1)
    lrs = []
    for _ in range(11):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1.0) and lrs[1] == pytest.approx(2.0) and lrs[10] == pytest.approx(0.2)


def test_fit_validate_test_and_reload(tmp_path, tokenizer_dir):
    pl.seed_everything(0)
    tok_dir = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, tok_dir)
    task = RetrievalTask(TINY, tokenizer=str(tok_dir), optim={"lr": 2e-3, "weight_decay": 0.01, "warmup_steps": 2})
    train, val = loaders()
    trainer = make_trainer(tmp_path, max_steps=12, val_check_interval=None, check_val_every_n_epoch=3)
    trainer.fit(task, train, val)
    history = [json.loads(x) for x in (tmp_path / "ckpt" / "val_metrics_history.jsonl").read_text().splitlines()]
    assert len(history) == 2  # epochs 2 and 5 of 6 (2 steps each)
    report = json.loads((tmp_path / "ckpt" / "val_metrics.json").read_text())
    m = report["metrics"]
    assert m["num_videos"] == 8 and m["num_texts"] == 16
    assert report["chance"]["t2v_R@1"] == pytest.approx(12.5)
    for key in ("t2v_R@1", "t2v_R@5", "t2v_R@10", "t2v_MdR", "t2v_MnR", "v2t_R@1", "dsl_t2v_R@1", "dsl_v2t_MnR"):
        assert trainer.callback_metrics[f"val/{key}"].item() == pytest.approx(m[key])
    assert 1 <= m["t2v_MnR"] <= 8 and 0 <= m["t2v_R@1"] <= 100
    assert (tmp_path / "ckpt" / "val_recall_at_k.png").stat().st_size > 5000
    # training moved the loss: the colour captions are learnable within 12 steps
    csv = (next((tmp_path / "logs").rglob("metrics.csv"))).read_text().splitlines()
    header = csv[0].split(",")
    col = header.index("train/loss_contrastive")
    losses = [float(r.split(",")[col]) for r in csv[1:] if r.split(",")[col]]
    assert losses and math.isfinite(losses[-1])
    assert "train/lr" in header and "train/scale" in header
    # test stage writes its own report
    trainer.test(task, val, verbose=False)
    test_report = json.loads((tmp_path / "ckpt" / "test_metrics.json").read_text())
    assert test_report["metrics"] == pytest.approx(m)  # same model, same data -> same numbers
    # a checkpoint reloads without the tokenizer directory (the tokenizer is embedded)
    shutil.rmtree(tok_dir)
    loaded = RetrievalTask.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert loaded.tokenizer("a red square")[0].tolist() == task.tokenizer("a red square")[0].tolist()
    for (n, a), b in zip(task.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    again = make_trainer(tmp_path / "again").validate(loaded, val, verbose=False)[0]
    assert again["val/t2v_R@1"] == pytest.approx(m["t2v_R@1"])
    assert again["val/v2t_MnR"] == pytest.approx(m["v2t_MnR"])


def test_training_lowers_the_loss(tokenizer_dir, tmp_path):
    pl.seed_everything(1)
    task = RetrievalTask(TINY, tokenizer=str(tokenizer_dir),
                         optim={"lr": 3e-3, "weight_decay": 0.0, "warmup_ratio": None})
    batch = collate_samples([ColorVideos()[i] for i in range(8)])
    batch = task.on_after_batch_transfer(batch, 0)
    opt = torch.optim.AdamW(task.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss, out, _ = task.forward_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def reference_metrics(task: RetrievalTask, colours: list[int]) -> dict[str, float]:
    """Single-pass evaluation of the distinct videos ``colours`` (no duplicates, no bad samples)."""
    task.eval()
    data = ColorVideos()
    batch = task.on_after_batch_transfer(collate_samples([data[c] for c in colours]), 0)
    with torch.no_grad():
        video = task.encode_video(batch["video"])
        text = torch.nn.functional.normalize(task.model.encode_text(*task.tokenize(batch["captions"])).embeds, dim=-1)
    return evaluate_embeddings(text, video, batch["caption_index"], dsl=True).metrics


def test_first_occurrences_keeps_each_key_once_with_compact_ids():
    keep, new_id = first_occurrences(["a", "b", "b", "c", "a", "d"])
    assert keep.tolist() == [True, True, False, True, False, True]
    assert new_id.tolist() == [0, 1, 1, 2, 0, 3]  # position of each key's video among the kept ones
    keep, new_id = first_occurrences([])
    assert keep.shape == (0,) and new_id.shape == (0,)


DUPLICATES = {
    "middle": [0, 1, 2, 2, 3, 4, 5, 6, 7],
    "first_again_mid_batch": [0, 1, 2, 3, 0, 4, 5, 6, 7],
    "three_served_as_four": [0, 1, 1, 2],  # the case: 3 distinct videos were reported as 2
    "end": [0, 1, 2, 3, 4, 5, 6, 7, 7],
    "several_at_end": [0, 1, 2, 3, 4, 5, 6, 7, 0, 5],
}


@pytest.mark.parametrize("case", list(DUPLICATES))
def test_repeated_videos_are_counted_once_and_none_is_lost(tokenizer_dir, tmp_path, case):
    """Repeats (sampler padding) anywhere in the evaluation order: every distinct video is kept once, with its
    captions, and the metrics equal an evaluation of the distinct videos alone."""
    pl.seed_everything(0)
    task = RetrievalTask(TINY, tokenizer=str(tokenizer_dir), evaluation={"write_plots": False})
    items = DUPLICATES[case]
    val = DataLoader(ColorVideos(items=items), batch_size=3, collate_fn=collate_samples)
    out = make_trainer(tmp_path).validate(task, val, verbose=False)[0]
    distinct = sorted(set(items))
    assert out["val/num_videos"] == len(distinct) and out["val/num_captions"] == 2 * len(distinct)
    assert out["val/num_skipped"] == 0
    expected = reference_metrics(task, distinct)
    assert {k: out[f"val/{k}"] for k in expected} == pytest.approx(expected)
    report = json.loads((tmp_path / "ckpt" / "val_metrics.json").read_text())
    counts = (report["num_videos"], report["num_captions"], report["num_skipped"])
    assert counts == (len(distinct), 2 * len(distinct), 0)


def test_bad_eval_samples_are_skipped_counted_and_never_replaced(tokenizer_dir, tmp_path):
    """Colours 3, 4, 5 fail to load: the whole second batch is skipped (the eval step must cope with an empty
    batch), colour 4 is also repeated by padding (counted once); the gallery is exactly the 5 good videos."""
    pl.seed_everything(0)
    task = RetrievalTask(TINY, tokenizer=str(tokenizer_dir), evaluation={"write_plots": False})
    data = ColorVideos(items=[0, 1, 2, 3, 4, 5, 6, 7, 4], bad=frozenset({3, 4, 5}))
    val = DataLoader(data, batch_size=3, collate_fn=collate_samples)
    out = make_trainer(tmp_path).test(task, val, verbose=False)[0]
    assert (out["test/num_videos"], out["test/num_captions"], out["test/num_skipped"]) == (5, 10, 3)
    expected = reference_metrics(task, [0, 1, 2, 6, 7])
    assert {k: out[f"test/{k}"] for k in expected} == pytest.approx(expected)
    report = json.loads((tmp_path / "ckpt" / "test_metrics.json").read_text())
    assert (report["num_videos"], report["num_captions"], report["num_skipped"]) == (5, 10, 3)
    assert report["metrics"] == pytest.approx(expected)


def test_evaluation_with_every_sample_bad_says_so(tokenizer_dir, tmp_path):
    task = RetrievalTask(TINY, tokenizer=str(tokenizer_dir), evaluation={"write_plots": False})
    val = DataLoader(ColorVideos(n=3, bad=frozenset({0, 1, 2})), batch_size=2, collate_fn=collate_samples)
    with pytest.raises(RuntimeError, match=r"no video to evaluate.*3 .*skipped"):
        make_trainer(tmp_path).validate(task, val, verbose=False)


def test_optimizer_groups_and_missing_tokenizer(tmp_path):
    task = RetrievalTask(dataclasses.replace(TINY, lr_mults={"block": 10.0}), optim={"lr": 1e-3, "weight_decay": 0.2})
    trainer = make_trainer(tmp_path, max_steps=10)
    task.trainer = trainer  # estimated_stepping_batches reads max_steps
    conf = task.configure_optimizers()
    groups = {g["name"]: g for g in conf["optimizer"].param_groups}
    assert groups["logit_scale"]["weight_decay"] == 0.0
    assert groups["backbone_decay"]["weight_decay"] == 0.2 and groups["backbone_no_decay"]["weight_decay"] == 0.0
    n_trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == n_trainable
    with pytest.raises(RuntimeError, match="no tokenizer"):
        task.tokenize(["a red square"])


def test_multi_view_eval_averages_views_and_training_rejects_views(tokenizer_dir):
    task = RetrievalTask(TINY, tokenizer=str(tokenizer_dir)).eval()
    one = collate_samples([ColorVideos()[i] for i in range(3)])
    video = task.on_after_batch_transfer(one, 0)["video"]  # [3, T, C, H, W]
    flipped = video.flip(-1)
    two_views = torch.stack([video, flipped], dim=1)  # [3, 2, T, C, H, W]
    with torch.no_grad():
        a, b, both = task.encode_video(video), task.encode_video(flipped), task.encode_video(two_views)
    torch.testing.assert_close(both, torch.nn.functional.normalize(a + b, dim=-1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one view|\\[B, T, C, H, W\\]"):
        task.forward_loss({**one, "video": two_views})


def test_logit_scale_parameter_is_clamped_after_each_step():
    task = RetrievalTask(TINY)
    with torch.no_grad():
        task.model.logit_scale.fill_(10.0)
    task.on_train_batch_end(None, None, 0)
    assert task.model.logit_scale.item() == pytest.approx(math.log(100.0))


@pytest.mark.parametrize("overrides, weight", [(None, 0.5), ({"caption": 2.0}, 2.0)])
def test_aux_losses_use_the_block_defaults_unless_overridden(tokenizer_dir, overrides, weight):
    """Prompt Switch's caption loss weighs its declared 0.5 in retrieval too (issue 13 item 2), unless the config
    overrides it."""
    cfg = ModelConfig(image="vit_tiny", num_frames=4, block="prompt_switch", block_args={"caption_layers": 1})
    task = RetrievalTask(cfg, tokenizer=str(tokenizer_dir), aux_loss_weights=overrides).train()
    batch = task.on_after_batch_transfer(collate_samples([ColorVideos()[i] for i in range(3)]), 0)
    torch.manual_seed(0)
    total, out, aux = task.forward_loss(batch)
    assert set(aux) == {"caption"} and aux["caption"] > 0
    torch.testing.assert_close(total, out.loss + weight * aux["caption"])


@pytest.mark.parametrize("block, args", [("xclip", {}), ("qformer", {"llm_dim": 24})])
def test_every_trainable_parameter_gets_a_gradient_from_the_retrieval_loss(tokenizer_dir, block, args):
    """DDP's gradient synchronisation needs a gradient for every trainable parameter on every step: parts of a
    block that retrieval never uses (X-CLIP's video-specific class prompts, Video-LLaMA's llama_proj) are frozen."""
    task = RetrievalTask(ModelConfig(image="vit_tiny", num_frames=4, block=block, block_args=args),
                         tokenizer=str(tokenizer_dir))
    batch = collate_samples([ColorVideos()[i] for i in range(3)])
    batch = normalize_uint8_video(batch, task.model.image_mean, task.model.image_std)
    total, _, _ = task.forward_loss(batch)
    total.backward()
    missing = [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    frozen = [n for n, p in task.model.block.named_parameters() if not p.requires_grad]
    assert frozen and all(n.split(".")[0] in ("generator", "visual_ln", "visual_proj", "llm_proj") for n in frozen)
