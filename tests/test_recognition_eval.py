"""RecognitionTask on multi-label batches (soft-target CE on normalised multi-hot rows, or BCE; mAP at
evaluation) and its evaluation bookkeeping: ``{stage}/num_videos`` and repeats of a video counted once,
single-process here and under 2-process DDP with a distributed sampler's padding."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from vidlang.data.badsamples import SkippedSample
from vidlang.data.collate import collate_samples
from vidlang.data.sample import VideoSample
from vidlang.eval.classification import evaluate_views
from vidlang.losses.classification import multi_hot, soft_target_cross_entropy
from vidlang.models.clip.tokenizer import train_tokenizer
from vidlang.models.factory import ModelConfig
from vidlang.tasks.recognition import RecognitionTask, prompts_for

CLASSES = ["open door", "sit", "drink", "walk"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(prompts_for(CLASSES, ["a photo of a {}."]) * 4, out, vocab_size=280, min_frequency=1,
                    context_length=16)
    return out


def make_task(tok, **kw) -> RecognitionTask:
    args = dict(tokenizer=str(tok), class_names=CLASSES, mix={"mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0},
                optim={"warmup_steps": 1, "warmup_ratio": None}, evaluation={"write_plots": False})
    args.update(kw)
    return RecognitionTask(ModelConfig(image="vit_tiny", num_frames=4), **args)


class Clips(Dataset):
    """Random clips; item i is (key, label, window) of ``items[i]``; equal keys share the same pixels."""

    def __init__(self, items: list[tuple[str, object, tuple[float, float] | None]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> VideoSample | SkippedSample:
        key, label, window = self.items[i]
        if label == "bad":  # what an evaluation dataset returns for a sample that failed to load
            return SkippedSample(key, f"/videos/{key}.mp4", "VideoDecodeError: test")
        g = torch.Generator().manual_seed(int(key[1:]))
        video = torch.randint(0, 256, (1, 4, 3, 32, 32), generator=g, dtype=torch.uint8)
        return VideoSample(video, key, [], window=window, label=label, path=f"/videos/{key}.mp4")


MULTI = [("v0", (0, 3), None), ("v1", (1,), None), ("v2", (2, 3), None), ("v3", (), None), ("v4", (3,), None),
         ("v5", (0, 1, 2), None)]
SINGLE = [("v0", 0, None), ("v1", 1, None), ("v2", 2, None), ("v3", 3, None), ("v4", 3, None), ("v5", 0, None)]


def batch_of(task: RecognitionTask, items) -> dict:
    data = Clips(items)
    return task.on_after_batch_transfer(collate_samples([data[i] for i in range(len(data))]), 0)


@pytest.mark.parametrize("loss", ["soft_ce", "bce"])
def test_multi_label_training_loss(tok, loss):
    task = make_task(tok, multi_label_loss=loss)
    batch = batch_of(task, MULTI)
    total, parts = task.forward_loss(batch)
    with torch.no_grad():
        emb = F.normalize(task.model.encode_video(batch["video"]).embeds.float(), dim=-1)
        logits = task.scale * emb @ task.class_embeddings(CLASSES).t()  # [B, K]
    y = multi_hot(batch["label_set"], 4)
    if loss == "soft_ce":  # a video with m labels puts 1/m on each; one without labels contributes 0
        expected = soft_target_cross_entropy(logits, y / y.sum(1, keepdim=True).clamp_min(1))
    else:
        expected = F.binary_cross_entropy_with_logits(logits, y)
    assert set(parts) == {"ce" if loss == "soft_ce" else "bce"}
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    total.backward()
    assert task.model.logit_scale.grad is not None


def test_multi_label_refuses_m2clip_and_unknown_loss(tok):
    with pytest.raises(ValueError, match="multi_label_loss"):
        make_task(tok, multi_label_loss="focal")
    task = make_task(tok, m2clip={"enabled": True})
    with pytest.raises(ValueError, match="M2-CLIP.*single-label"):
        task.forward_loss(batch_of(task, MULTI))


def trainer(tmp_path, **kw) -> pl.Trainer:
    args = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=tmp_path)
    args.update(kw)
    return pl.Trainer(**args)


def reference(task: RecognitionTask, items, fuse: str):
    """Metrics of the distinct items, evaluated in one batch by hand."""
    batch = batch_of(task, items)
    task.eval()
    with torch.no_grad():
        logits = task.view_logits(batch["video"], CLASSES, task.class_embeddings(CLASSES))
    labels = multi_hot(batch["label_set"], 4) if "label_set" in batch else batch["label"]
    return evaluate_views(logits, labels, fuse=fuse).metrics


@pytest.mark.parametrize(("items", "loss"), [(MULTI, "soft_ce"), (MULTI, "bce"), (SINGLE, "soft_ce")])
def test_eval_counts_videos_and_drops_repeats(tok, tmp_path, items, loss):
    task = make_task(tok, multi_label_loss=loss)
    # repeats in the middle and at the end (what a sampler's padding or a replaced sample produces); "v0" again
    # with a window is another item (a second window of the same video) and is kept
    windowed = ("v0", items[0][1], (1.0, 2.0))
    served = [*items[:3], items[1], *items[3:], windowed, items[0], items[5]]
    loader = DataLoader(Clips(served), batch_size=4, collate_fn=collate_samples)
    trainer(tmp_path).validate(task, dataloaders=loader, verbose=False)
    metrics = task.last_metrics["val"]
    assert metrics["num_videos"] == len(items) + 1 and metrics["num_samples"] == len(items) + 1
    expected = reference(task, [*items, windowed], "sigmoid" if (items is MULTI and loss == "bce") else "softmax")
    assert metrics == pytest.approx({**expected, "num_videos": len(items) + 1, "num_skipped": 0})
    assert ("mAP" in metrics) == (items is MULTI)
    logged = task.trainer.callback_metrics
    assert logged["val/num_videos"].item() == len(items) + 1
    report = json.loads((tmp_path / "val_metrics.json").read_text())
    assert report["metrics"]["num_videos"] == len(items) + 1 and report["duplicates_dropped"] == 3


def test_ddp_eval_drops_sampler_padding(tok, tmp_path):
    """2 CPU processes (gloo): Lightning's distributed sampler pads 5 videos to 6, rank 1 repeating video 0;
    the repeat counts once and the gathered multi-label metrics equal single-process evaluation."""
    items = MULTI[:5]
    task = make_task(tok)
    ddp = trainer(tmp_path, devices=2, strategy="ddp_spawn")
    ddp.validate(task, dataloaders=DataLoader(Clips(items), batch_size=2, collate_fn=collate_samples), verbose=False)
    report = json.loads((tmp_path / "val_metrics.json").read_text())
    assert report["metrics"]["num_videos"] == 5 and report["duplicates_dropped"] == 1
    assert report["metrics"] == pytest.approx({**reference(task, items, "softmax"), "num_videos": 5, "num_skipped": 0})


def test_multi_label_list_file_end_to_end(tok, tmp_path):
    """A list file with several labels per line, through the datamodule (decoding real files), training and mAP."""
    from vidlang.data.config import LoaderConfig, SamplingConfig, TransformConfig
    from vidlang.data.datamodule import VideoDataModule
    from vidlang.data.synthetic import generate_corpus

    generate_corpus(tmp_path / "c", 8, seed=0, size=32, frames=8, workers=1, progress=False)
    rows = [json.loads(ln) for ln in (tmp_path / "c" / "manifest.jsonl").read_text().splitlines()]
    sets = [(0, 3), (1,), (2, 3, 1), (3,), (0, 1), (2,), (1, 3), (0,)]
    lines = [f"{r['path']} {' '.join(map(str, s))}" for r, s in zip(rows, sets, strict=True)]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "val.txt").write_text("\n".join(lines[:5]) + "\n")
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    split = {"format": "kinetics", "classes": str(tmp_path / "classes.txt"), "video_root": str(tmp_path / "c")}
    dm = VideoDataModule(train={**split, "list_file": str(tmp_path / "train.txt")},
                         val={**split, "list_file": str(tmp_path / "val.txt")}, sampling=SamplingConfig(num_frames=4),
                         transform=TransformConfig(image_size=32), loader=LoaderConfig(
                             batch_size=4, num_workers=0, persistent_workers=False, pin_memory=False))
    task = make_task(tok, class_names=None, mix={"mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1},
                     optim={"lr": 1e-3, "warmup_steps": 1, "warmup_ratio": None})
    fit = trainer(tmp_path, max_steps=2, num_sanity_val_steps=0)
    fit.fit(task, dm)
    m = task.last_metrics["val"]
    assert m["num_videos"] == 5 and m["map_classes"] == 4 and 0 < m["mAP"] <= 100
    assert torch.equal(task.last_outputs["val"]["labels"], multi_hot(torch.tensor(
        [[0, 3, -1], [1, -1, -1], [2, 3, 1], [3, -1, -1], [0, 1, -1]]), 4))
    assert torch.isfinite(fit.callback_metrics["train/loss_ce"]) and "val/mAP" in fit.callback_metrics


def test_eval_skips_bad_samples_and_counts_them(tok, tmp_path):
    """Bad samples are left out (never replaced), counted once each, also when a whole batch is bad."""
    task = make_task(tok)
    bad = [("v90", "bad", None), ("v91", "bad", None), ("v92", "bad", None), ("v93", "bad", None)]
    served = [*SINGLE[:2], bad[0], SINGLE[2], *bad, *SINGLE[3:], bad[1]]  # batch 2 (4 items) is all bad
    loader = DataLoader(Clips(served), batch_size=4, collate_fn=collate_samples)
    trainer(tmp_path).validate(task, dataloaders=loader, verbose=False)
    metrics = task.last_metrics["val"]
    assert metrics["num_videos"] == len(SINGLE) and metrics["num_skipped"] == len(bad)
    assert metrics == pytest.approx({**reference(task, SINGLE, "softmax"), "num_videos": 6, "num_skipped": 4})
    assert task.trainer.callback_metrics["val/num_skipped"].item() == 4
