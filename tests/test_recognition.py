"""RecognitionTask end to end on a small synthetic corpus (supervised, zero-shot transfer, base-to-novel,
multi-view, M2-CLIP), mixup / cutmix / label-smoothing targets, and ``vidlang classify`` on generated files."""

from __future__ import annotations

import json
import math

import pytest
import pytorch_lightning as pl
import torch

from vidlang.data.config import LoaderConfig, SamplingConfig, TransformConfig
from vidlang.data.datamodule import VideoDataModule
from vidlang.data.formats.protocols import base_novel_split
from vidlang.data.synthetic import generate_corpus
from vidlang.losses.classification import (
    MixupCutmix,
    cutmix_box,
    cutmix_videos,
    mix_targets,
    mix_videos,
    smooth_one_hot,
    soft_target_cross_entropy,
)
from vidlang.models.clip.tokenizer import train_tokenizer
from vidlang.models.factory import ModelConfig
from vidlang.tasks.recognition import RecognitionTask, prompts_for

TINY = dict(image="vit_tiny", num_frames=4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec")
    info = generate_corpus(root / "corpus", 48, seed=0, size=32, frames=8, workers=1, progress=False)
    prompts = [p for n in info.classes for p in prompts_for([n], ["a photo of a {}.", "a video of {}"])]
    train_tokenizer(prompts * 4, root / "tok", vocab_size=300, min_frequency=1, context_length=16)
    return root, info


def datamodule(root, train=None, val=None, sampling=None, transform=None) -> VideoDataModule:
    src = {"format": "manifest", "path": str(root / "corpus" / "manifest.csv")}
    return VideoDataModule(train=train or {**src, "split": "train"}, val=val or {**src, "split": "val"},
                           sampling=SamplingConfig(num_frames=4, **(sampling or {})),
                           transform=TransformConfig(image_size=32, **(transform or {})),
                           loader=LoaderConfig(batch_size=8, num_workers=0, persistent_workers=False, pin_memory=False))


def trainer(tmp_path, **kw) -> pl.Trainer:
    args = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
    args.update(kw)
    return pl.Trainer(**args)


def task(root, **kw) -> RecognitionTask:
    args = dict(tokenizer=str(root / "tok"), optim={"lr": 1e-3, "warmup_steps": 1, "warmup_ratio": None})
    args.update(kw)
    return RecognitionTask(ModelConfig(**{**TINY, **args.pop("model", {})}), **args)


# -- mixing targets -----------------------------------------------------------------------------------------
def test_label_smoothing_targets():
    y = smooth_one_hot(torch.tensor([2, 0]), 4, 0.1)
    assert y[0].tolist() == pytest.approx([0.025, 0.025, 0.925, 0.025])
    assert y.sum(1).tolist() == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="outside|lie in"):
        smooth_one_hot(torch.tensor([4]), 4)
    logits = torch.randn(3, 5)
    hard = smooth_one_hot(torch.tensor([1, 4, 0]), 5)
    assert soft_target_cross_entropy(logits, hard) == pytest.approx(
        torch.nn.functional.cross_entropy(logits, torch.tensor([1, 4, 0])).item(), abs=1e-6)


def test_mixup_and_cutmix_targets():
    labels = torch.tensor([0, 1, 2])
    t = mix_targets(labels, 3, 0.7, smoothing=0.0)  # sample i mixed with 2 - i
    assert torch.allclose(t, torch.tensor([[0.7, 0, 0.3], [0, 1.0, 0], [0.3, 0, 0.7]]))
    video = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1, 1).expand(3, 4, 3, 8, 8)  # [B, T, C, H, W]
    mixed = mix_videos(video, 0.7)
    assert torch.allclose(mixed[0], torch.full_like(mixed[0], 0.7 * 0 + 0.3 * 2))  # every frame the same lambda
    box = (2, 6, 1, 5)
    cut = cutmix_videos(video, box)
    assert (cut[0, :, :, 2:6, 1:5] == 2).all() and cut[0].sum() == 2 * 4 * 3 * 16  # same box on every frame
    top, bottom, left, right = cutmix_box(32, 32, 0.75, torch.Generator().manual_seed(0))
    assert 0 <= top <= bottom <= 32 and 0 <= left <= right <= 32
    torch.manual_seed(0)
    mixer = MixupCutmix(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.1)
    out = mixer(video, labels, 3, torch.Generator().manual_seed(1))
    assert out.mode == "cutmix"
    pasted = (out.video[0, 0, 0] == 2).float().mean().item()  # fraction of sample 0 taken from sample 2
    assert out.lam == pytest.approx(1 - pasted)  # lambda corrected to the exact pasted area
    expected = smooth_one_hot(labels, 3, 0.1) * out.lam + smooth_one_hot(labels.flip(0), 3, 0.1) * (1 - out.lam)
    assert torch.allclose(out.targets, expected)
    off = MixupCutmix(mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0)(video, labels, 3)
    assert off.mode == "none" and torch.equal(off.video, video) and torch.equal(off.targets, torch.eye(3))


# -- end to end ---------------------------------------------------------------------------------------------
def test_supervised_fit_multiview_report_and_reload(corpus, tmp_path):
    root, info = corpus
    pl.seed_everything(0)
    dm = datamodule(root, sampling={"eval_sampler": "multiview", "eval_sampler_args": {"num_views": 2}},
                    transform={"three_crop": True})
    model = task(root, templates=["a photo of a {}.", "a video of {}"], evaluation={"view_layout": (2, 3)})
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    tr = trainer(tmp_path, max_steps=5, enable_checkpointing=True, callbacks=[ckpt],
                 logger=pl.loggers.CSVLogger(tmp_path / "logs"), log_every_n_steps=1)
    tr.fit(model, dm)
    report = json.loads((tmp_path / "ckpt" / "val_metrics.json").read_text())
    assert report["class_names"] == info.classes and report["classifier"] == "text"
    assert len(report["per_view"]) == 6 and "clip1_crop2" in report["per_view"]
    m = report["metrics"]
    assert m["num_samples"] == info.split_counts["val"] and 0 <= m["top1"] <= m["top5"] <= 100
    assert report["chance"]["top1"] == pytest.approx(100 / 9)
    assert (tmp_path / "ckpt" / "val_confusion.png").stat().st_size > 3000
    assert tr.callback_metrics["val/top1"].item() == pytest.approx(m["top1"])
    csv = next((tmp_path / "logs").rglob("metrics.csv")).read_text().splitlines()
    col = csv[0].split(",").index("train/loss_ce")
    losses = [float(r.split(",")[col]) for r in csv[1:] if r.split(",")[col]]
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses)
    # reload: tokenizer and class names travel in the checkpoint; same predictions
    loaded = RecognitionTask.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert loaded.class_names_by_split["train"] == info.classes
    video = torch.randn(2, 4, 3, 32, 32)
    model.eval()
    assert torch.allclose(loaded.classify(video), model.classify(video), atol=1e-5)


def test_zero_shot_transfer_and_base_to_novel(corpus, tmp_path):
    root, info = corpus
    pl.seed_everything(1)
    src = {"format": "manifest", "path": str(root / "corpus" / "manifest.csv")}
    base, novel = base_novel_split(len(info.classes))
    train = {"format": "class_subset", "classes": "base", "source": {**src, "split": "train"}}
    val = {"format": "class_subset", "classes": "novel", "source": {**src, "split": "train"}}
    dm = datamodule(root, train=train, val=val)
    model = task(root, head={"enabled": True})  # the head serves its own label set; novel classes fall back to the text
    tr = trainer(tmp_path, max_steps=3, limit_val_batches=2)
    tr.fit(model, dm)
    assert model.head.out_features == len(base)
    assert model.class_names_by_split["train"] == [info.classes[i] for i in base]
    report = json.loads((tmp_path / "val_metrics.json").read_text())
    assert report["class_names"] == [info.classes[i] for i in novel] and report["classifier"] == "text"
    # base-to-novel on the full label set: base / novel scored within their own classes, HM reported
    full = datamodule(root, val={**src, "split": "train"})
    b2n = task(root, evaluation={"base_to_novel": True})
    tr.validate(b2n, full, verbose=False)
    m = json.loads((tmp_path / "val_metrics.json").read_text())["metrics"]
    assert m["hm_top1"] == pytest.approx(2 * m["base_top1"] * m["novel_top1"] / (m["base_top1"] + m["novel_top1"]))
    assert m["base_num_samples"] + m["novel_num_samples"] == m["num_samples"]


def test_m2clip_ted_losses_train(corpus, tmp_path):
    root, _ = corpus
    pl.seed_everything(2)
    model = task(root, model={"block": "ted", "block_args": {"bottleneck": 16, "text_bottleneck": 16}},
                 m2clip={"enabled": True})
    tr = trainer(tmp_path, max_steps=2, limit_val_batches=0)
    batch = next(iter(datamodule(root).train_dataloader()))
    tr.fit(model, datamodule(root))
    assert model.model.freeze_policy == "block_only" and model.text_trains()  # TED's text adapters train
    batch = model.on_after_batch_transfer(batch, 0)
    total, parts = model.forward_loss(batch)
    assert set(parts) == {"cross_modal", "contrastive", "head", "mlm"}
    total.backward()
    assert model.head.weight.grad is not None and model.mlm.vocab.weight.grad is not None
    trained = [n for n, p in model.model.named_parameters() if p.requires_grad]
    assert trained and all(n.startswith("block.") for n in trained)
    adapters = [p for n, p in model.model.named_parameters() if p.requires_grad and "text_adapters" in n]
    assert adapters and all(p.grad is not None for p in adapters)


def test_m2clip_official_losses(corpus, tmp_path):
    """m2clip.official: the released weights 0.5/0.5/1/0.1, CE on the cross-modal probabilities (so the term lies
    in the narrow band [log(K-1+e) - 1, log(K-1+e)] whatever the logits), the word-level MLM over the prompt words."""
    import math

    from vidlang.losses.m2clip import M2CLIPMLM, OFFICIAL_WEIGHTS

    root, info = corpus
    pl.seed_everything(3)
    model = task(root, model={"block": "ted", "block_args": {"bottleneck": 16, "text_bottleneck": 16},
                              "text_overrides": {"width": 32}},
                 m2clip={"enabled": True, "official": True},
                 mix={"mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0})  # fmt: skip
    assert model.m2_weights == OFFICIAL_WEIGHTS and model.m2.mlm_rate == 0.2
    assert model.mlm is None  # the classes (its vocabulary) come with the data
    trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(model, datamodule(root))
    prompts = [model.templates[0].format(n.replace("_", " ")) for n in info.classes]
    assert isinstance(model.mlm, M2CLIPMLM)
    assert model.mlm_vocab.words == sorted({w for p in prompts for w in p.lower().split()})
    batch = model.on_after_batch_transfer(next(iter(datamodule(root).train_dataloader())), 0)
    total, parts = model.forward_loss(batch)
    k = len(info.classes)
    assert math.log(k - 1 + math.e) - 1 - 1e-5 <= float(parts["cross_modal"]) <= math.log(k - 1 + math.e) + 1e-5
    expected = sum(OFFICIAL_WEIGHTS[n] * parts[n] for n in ("cross_modal", "contrastive", "head", "mlm"))
    assert torch.allclose(total, expected, atol=1e-5)
    assert float(parts["mlm"]) > 0
    total.backward()
    assert model.mlm.adapter.down.weight.grad is not None
    plain = task(root, m2clip={"enabled": True, "official": False}, class_names=list(info.classes))
    assert plain.m2_weights["contrastive"] == 1.0 and plain.m2.mlm_rate == 0.15


def test_classify_command(corpus, tmp_path, capsys):
    from vidlang.cli import main

    root, info = corpus
    model = task(root, head={"enabled": True})
    tr = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    tr.fit(model, datamodule(root))
    ckpt = tmp_path / "model.ckpt"
    tr.save_checkpoint(ckpt)
    videos = [str(root / "corpus" / r["path"]) for r in info.rows[:2]]
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    code = main(["classify", "--ckpt", str(ckpt), videos[0], str(bad), videos[1], "--labels", "left,right,up",
                 "--topk", "2", "--frames", "4"])
    out = capsys.readouterr()
    assert code == 1
    assert out.out.count(":\n") == 2 and "  1. " in out.out and "  3. " not in out.out
    assert f"{bad}: ERROR" in out.err and len([x for x in out.err.splitlines() if "ERROR" in x]) == 1
    probs = [float(line.split()[-1]) for line in out.out.splitlines() if line.startswith("  ")]
    assert all(0 <= p <= 1 for p in probs) and probs[0] >= probs[1]
    assert main(["classify", "--ckpt", str(ckpt), videos[0], "--json", "--topk", "9"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert {n for n, _ in row["top"]} == set(info.classes)  # the checkpoint's own classes
    assert sum(p for _, p in row["top"]) == pytest.approx(1.0, abs=1e-4)


def test_classify_goes_through_the_inference_path_at_the_eval_frame_count(corpus, tmp_path, capsys):
    """``vidlang classify`` decodes like search and serve (InferenceBundle: decode-time resize, segment sampler,
    centre crop, normalise) at ``ModelConfig.inference_frames`` -- the evaluation count, here 6 frames for a
    model trained on 4 -- and classifies with the checkpoint's own classifier (its head, on its classes)."""
    from vidlang.cli import main
    from vidlang.serve.inference import load_classifier

    root, info = corpus
    model = task(root, head={"enabled": True}, model={"eval_num_frames": 6})
    tr = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    tr.fit(model, datamodule(root))
    ckpt = tmp_path / "model.ckpt"
    tr.save_checkpoint(ckpt)
    video = str(root / "corpus" / info.rows[0]["path"])

    bundle = load_classifier(ckpt)
    assert bundle.num_frames == 6 and bundle.classifier is not None and bundle.kind == "recognition"
    clip = bundle.decode_clip(video)  # what search / serve embed for this video
    assert clip.shape == (6, 3, 32, 32) and clip.dtype == torch.uint8
    model.eval()
    with torch.no_grad():  # the trained task itself on that clip
        from vidlang.data.transforms import normalize

        expected = model.classify(normalize(clip[None], model.model.image_mean, model.model.image_std))[0]  # [K]
    assert torch.allclose(bundle.classify_clips(clip[None], info.classes)[0], expected, atol=1e-6)

    assert main(["classify", "--ckpt", str(ckpt), video, "--json", "--topk", str(len(info.classes))]) == 0
    row = json.loads(capsys.readouterr().out)
    got = dict(row["top"])
    assert got == pytest.approx({n: float(expected[i]) for i, n in enumerate(info.classes)}, abs=1e-5)
    assert main(["classify", "--ckpt", str(ckpt), video, "--json", "--frames", "4"]) == 0  # --frames overrides
    assert load_classifier(ckpt, num_frames=4).decode_clip(video).shape[0] == 4


def synthetic_config(root, out) -> dict:
    """The recommended recognition YAML layout, as a dict (``vidlang fit --config ...``)."""
    src = {"format": "manifest", "path": str(root / "corpus" / "manifest.csv")}
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "num_sanity_val_steps": 0, "limit_val_batches": 1,
                    "val_check_interval": 2, "default_root_dir": str(out)},
        "model": {
            "class_path": "vidlang.tasks.recognition.RecognitionTask",
            "init_args": {
                "model": {"image": "vit_tiny", "num_frames": 4, "block": "mean", "freeze": "auto"},
                "tokenizer": str(root / "tok"),
                "templates": ["a photo of a {}."],
                "optim": {"lr": 1e-3, "weight_decay": 1e-3, "warmup_ratio": 0.1},
                "mix": {"mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1},
                "evaluation": {"view_layout": [1, 3]},
            },
        },
        "data": {
            "class_path": "vidlang.data.datamodule.VideoDataModule",
            "init_args": {
                "train": {**src, "split": "train"}, "val": {**src, "split": "val"}, "test": {**src, "split": "test"},
                "sampling": {"num_frames": 4, "sampler": "segment"},
                "transform": {"image_size": 32, "three_crop": True},
                "loader": {"batch_size": 8, "num_workers": 0, "persistent_workers": False},
            },
        },
    }


def test_config_dict_builds_and_trains(corpus, tmp_path):
    """The recommended layout: the task part parses through jsonargparse (the typed signature LightningCLI
    reads); data and trainer parts are instantiated as LightningCLI would and trained."""
    from jsonargparse import ArgumentParser

    root, info = corpus
    cfg = synthetic_config(root, tmp_path / "run")
    parser = ArgumentParser()
    parser.add_class_arguments(RecognitionTask, "model")
    parsed = parser.parse_object({"model": cfg["model"]["init_args"]})
    model = (getattr(parser, "instantiate", None) or parser.instantiate_classes)(parsed).model
    assert isinstance(model, RecognitionTask) and model.evaluation.view_layout == (1, 3)
    assert model.hparams.evaluation["view_layout"] == (1, 3) and model.optim.lr == 1e-3
    dm = VideoDataModule(**cfg["data"]["init_args"])
    pl.Trainer(**cfg["trainer"]).fit(model, dm)
    report = json.loads((tmp_path / "run" / "val_metrics.json").read_text())
    assert report["class_names"] == info.classes and list(report["per_view"]) == ["clip0_crop0", "clip0_crop1",
                                                                                   "clip0_crop2"]
