"""VideoDataModule: the batch contract with 0 and 2 workers, multi-view, audio, streaming, Lightning fit, config."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from vidlang.data.datamodule import VideoDataModule

T, S = 4, 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from vidlang.data.synthetic import generate_corpus

    out = tmp_path_factory.mktemp("dm")
    generate_corpus(out, 12, seed=4, size=40, frames=8, workers=1, progress=False)
    return out


def module(corpus: Path, **kw) -> VideoDataModule:
    manifest = {"format": "manifest", "path": str(corpus / "manifest.csv")}
    defaults = dict(train=manifest, val=manifest, num_frames=T, image_size=S, batch_size=4, num_workers=0,
                    backend="pyav", pin_memory=False)
    return VideoDataModule(**{**defaults, **kw})


def check_batch(batch: dict, b: int, views: int | None = None) -> None:
    video = batch["video"]
    shape = (b, T, 3, S, S) if views is None else (b, views, T, 3, S, S)
    assert tuple(video.shape) == shape and video.dtype == torch.uint8
    assert len(batch["key"]) == b and batch["label"].shape == (b,) and batch["label"].dtype == torch.long
    assert len(batch["captions"]) == batch["caption_index"].numel()
    assert batch["caption_index"].max() < b and (batch["caption_index"].diff() >= 0).all()


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_follow_the_contract(corpus, workers):
    dm = module(corpus, num_workers=workers, persistent_workers=False)
    dm.setup("fit")
    assert dm.classes == (corpus / "classes.txt").read_text().split("\n")[:-1]
    train = list(dm.train_dataloader())
    assert sum(len(b["key"]) for b in train) == 12
    for batch in train:
        check_batch(batch, len(batch["key"]))
        assert len(batch["captions"]) == len(batch["key"])  # training: one random caption per video
        assert (batch["label"] >= 0).all()
    val = next(iter(dm.val_dataloader()))
    check_batch(val, 4)
    assert len(val["captions"]) == 5 * 4  # eval: all 5 paraphrases of each video


def test_epochs_reshuffle_and_are_reproducible(corpus):
    dm = module(corpus)
    dm.setup("fit")
    loader = dm.train_dataloader()

    def keys(epoch):
        loader.sampler.set_epoch(epoch)
        return [k for b in loader for k in b["key"]]

    e0, e1 = keys(0), keys(1)
    assert sorted(e0) == sorted(e1) and e0 != e1 and keys(0) == e0
    assert dm.datasets["train"].epoch.get() == 0


def test_multiview_three_crop_and_audio(corpus):
    dm = module(corpus, eval_sampler="multiview", eval_sampler_args={"num_views": 2}, three_crop=True,
                decode_audio=True, audio_sample_rate=8000)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    check_batch(batch, 4, views=6)
    rows = [json.loads(x) for x in (corpus / "manifest.jsonl").read_text().splitlines()]
    has_audio = {str(r["key"]): r["has_audio"] for r in rows}
    assert batch["audio_mask"].tolist() == [has_audio[k] for k in batch["key"]]
    assert batch["audio"].shape[0] == 4 and batch["audio"].dtype == torch.float32
    assert (batch["audio_lengths"][batch["audio_mask"]] > 0).all()


def test_streaming_split(corpus, tmp_path):
    from vidlang.commands.shards import write_shards
    from vidlang.data.formats import build_index

    write_shards(build_index("manifest", path=str(corpus / "manifest.csv")), tmp_path, 3, progress=False)
    dm = module(corpus, train={"format": "webdataset", "shards": str(tmp_path)}, streaming=True, num_workers=2,
                persistent_workers=False, shuffle_buffer=4)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == len(dm.train_dataloader())
    assert sorted(k for b in batches for k in b["key"]) == [f"{i:09d}" for i in range(12)]
    check_batch(batches[0], len(batches[0]["key"]))


def test_gpu_decode_falls_back_to_cpu_with_a_warning(corpus):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the fallback is for CPU-only machines")
    with pytest.warns(UserWarning, match="no CUDA GPU"):
        dm = module(corpus, decode_device="cuda", num_workers=2)
    assert dm.decode_device == "cpu" and dm.num_workers == 2
    dm.setup("validate")
    assert next(iter(dm.val_dataloader()))["video"].device.type == "cpu"


@pytest.mark.gpu
def test_gpu_decode_keeps_frames_on_gpu(corpus):
    with warnings.catch_warnings(record=True):
        dm = module(corpus, decode_device="cuda", backend="torchcodec", num_workers=2)
    assert dm.num_workers == 0
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["video"].is_cuda
    check_batch(batch, 4)


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[str]] = []

    def training_step(self, batch, idx):
        self.seen.append(list(batch["key"]))
        return (self.w * batch["video"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_sets_epochs_and_reports_bad_samples(corpus, tmp_path):
    import shutil

    bad_corpus = tmp_path / "c"
    shutil.copytree(corpus, bad_corpus)
    victim = json.loads((bad_corpus / "manifest.jsonl").read_text().splitlines()[2])
    (bad_corpus / victim["path"]).write_bytes(b"garbage")
    dm = module(bad_corpus, val=None, num_workers=2, bad_sample_dir=str(tmp_path / "report"), max_skip_rate=0.2)
    model = _Tiny()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=dm)
    assert dm.datasets["train"].epoch.get() == 1
    epochs = [sorted(k for b in model.seen[i * 3 : i * 3 + 3] for k in b) for i in range(2)]
    assert len(model.seen) == 6 and all(len(e) == 12 for e in epochs)
    assert all(str(victim["key"]) not in e for e in epochs)
    report = [json.loads(x) for x in (tmp_path / "report" / "bad_samples.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in report] == [0, 1] and {r["key"] for r in report} == {str(victim["key"])}

    strict = module(bad_corpus, val=None, bad_sample_dir=str(tmp_path / "r2"), max_skip_rate=0.05)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    from vidlang.data.badsamples import BadSampleError

    with pytest.raises(BadSampleError, match=r"1 of 13 samples failed"):
        trainer.fit(_Tiny(), datamodule=strict)


def test_typed_signature_builds_from_yaml(corpus):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(VideoDataModule, "data")
    cfg = parser.parse_string(
        f"data:\n  train: {{format: manifest, path: {corpus / 'manifest.csv'}, split: train}}\n"
        f"  num_frames: 4\n  image_size: 32\n  crop_scale: [0.4, 1.0]\n  backend: pyav\n  num_workers: 0\n")
    dm = getattr(parser, "instantiate", None) or parser.instantiate_classes
    dm = dm(cfg).data
    assert isinstance(dm, VideoDataModule) and dm.hparams.crop_scale == (0.4, 1.0)
    with pytest.raises(ValueError, match="needs a 'format' key"):
        VideoDataModule(train={"path": "x.csv"})


def test_lightning_streaming_epochs_are_exact_and_reshuffled(corpus, tmp_path):
    from vidlang.commands.shards import write_shards
    from vidlang.data.formats import build_index

    write_shards(build_index("manifest", path=str(corpus / "manifest.csv")), tmp_path / "s", 2, progress=False)
    dm = module(corpus, val=None, train={"format": "webdataset", "shards": str(tmp_path / "s")}, streaming=True,
                num_workers=2, shuffle_buffer=3, bad_sample_dir=str(tmp_path / "r"))
    model = _Tiny()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=dm)
    n = len(dm.datasets["train"])
    assert len(model.seen) == 2 * n
    epochs = [[k for b in model.seen[i * n : (i + 1) * n] for k in b] for i in range(2)]
    assert all(sorted(e) == [f"{i:09d}" for i in range(12)] for e in epochs)  # exactly once per epoch
    assert epochs[0] != epochs[1] and dm.datasets["train"].epoch.get() == 1  # Lightning's set_epoch reached it


class _TinyVal(_Tiny):
    def __init__(self) -> None:
        super().__init__()
        self.val_seen: list[str] = []

    def validation_step(self, batch, idx):
        self.val_seen.extend(batch["key"])


def test_validation_bad_samples_are_counted_reported_and_checked_per_split(corpus, tmp_path):
    import shutil

    bad_corpus = tmp_path / "c"
    shutil.copytree(corpus, bad_corpus)
    rows = (bad_corpus / "manifest.jsonl").read_text().splitlines()
    good = json.loads(rows[0])
    val_rows = [json.dumps(good)] + [json.dumps({**json.loads(r), "path": "videos/nowhere.mp4"}) for r in rows[1:3]]
    (bad_corpus / "val.jsonl").write_text("\n".join(val_rows + rows[3:8]) + "\n")  # 2 of 8 val entries are missing
    val = {"format": "manifest", "path": str(bad_corpus / "val.jsonl")}
    dm = module(bad_corpus, val=val, num_workers=1, bad_sample_dir=str(tmp_path / "report"), max_skip_rate=0.5)
    model = _TinyVal()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=dm)
    # evaluation skips the 2 bad entries (never replaces them): the 6 good ones, each once
    assert sorted(model.val_seen) == sorted([str(good["key"])] + [str(json.loads(r)["key"]) for r in rows[3:8]])
    report = [json.loads(x) for x in (tmp_path / "report" / "bad_samples.jsonl").read_text().splitlines()]
    assert {r["split"] for r in report} == {"val"} and len(report) == 2  # no training failure; each val one once
    assert all("nowhere.mp4" in r["path"] for r in report)

    strict = module(bad_corpus, val=val, num_workers=1, bad_sample_dir=str(tmp_path / "r2"), max_skip_rate=0.05)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=str(tmp_path))
    from vidlang.data.badsamples import BadSampleError

    with pytest.raises(BadSampleError, match=r"2 of 8 samples failed to load in val epoch 0"):
        trainer.fit(_TinyVal(), datamodule=strict)


@pytest.mark.parametrize("n,world", [(1, 2), (5, 2), (3, 4), (4, 2)])
def test_eval_sampler_pads_every_rank_and_covers_every_sample(n, world):
    """Evaluation ranks each get the same number (>= 1) of indices and together every index at least once
    (a rank with no batch would skip the evaluation loop and leave the others waiting in a gather)."""
    from vidlang.data.datamodule import EpochSampler

    data = list(range(n))
    parts = [list(EpochSampler(data, shuffle=False, seed=0, rank=r, world_size=world, drop_tail=False))
             for r in range(world)]
    lengths = {len(p) for p in parts}
    assert lengths == {-(-n // world)} and min(lengths) >= 1
    assert [len(EpochSampler(data, False, 0, r, world, False)) for r in range(world)] == [len(p) for p in parts]
    assert sorted(set(i for p in parts for i in p)) == data


def test_train_sampler_drops_the_tail_without_repeats():
    from vidlang.data.datamodule import EpochSampler

    parts = [list(EpochSampler(list(range(5)), shuffle=True, seed=1, rank=r, world_size=2, drop_tail=True))
             for r in range(2)]
    flat = [i for p in parts for i in p]
    assert len(flat) == 4 and len(set(flat)) == 4
