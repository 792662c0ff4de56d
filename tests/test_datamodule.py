"""VideoDataModule: the batch contract with 0 and 2 workers, multi-view, audio, streaming, Lightning fit, config."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from vidlang.data.config import LoaderConfig, SamplingConfig
from vidlang.data.datamodule import VideoDataModule
from vidlang.errors import ConfigError

T, S = 4, 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from vidlang.data.synthetic import generate_corpus

    out = tmp_path_factory.mktemp("dm")
    generate_corpus(out, 12, seed=4, size=40, frames=8, workers=1, progress=False)
    return out


GROUPS = dict(sampling={"num_frames": T}, transform={"image_size": S},
              loader={"batch_size": 4, "num_workers": 0, "pin_memory": False}, decode={"backend": "pyav"})


def module(corpus: Path, **kw) -> VideoDataModule:
    """Train and val on the corpus; a group given in ``kw`` (a dict) updates the defaults of that group."""
    manifest = {"format": "manifest", "path": str(corpus / "manifest.csv")}
    args: dict = dict(train=manifest, val=manifest)
    for group, defaults in GROUPS.items():
        args[group] = {**defaults, **kw.pop(group, {})}
    return VideoDataModule(**{**args, **kw})


def check_batch(batch: dict, b: int, views: int | None = None, frames: int = T) -> None:
    video = batch["video"]
    shape = (b, frames, 3, S, S) if views is None else (b, views, frames, 3, S, S)
    assert tuple(video.shape) == shape and video.dtype == torch.uint8
    assert len(batch["key"]) == b and batch["label"].shape == (b,) and batch["label"].dtype == torch.long
    assert len(batch["captions"]) == batch["caption_index"].numel()
    assert batch["caption_index"].max() < b and (batch["caption_index"].diff() >= 0).all()


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_follow_the_contract(corpus, workers):
    dm = module(corpus, loader={"num_workers": workers, "persistent_workers": False})
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
    dm = module(corpus, sampling={"eval_sampler": "multiview", "eval_sampler_args": {"num_views": 2}},
                transform={"three_crop": True}, decode={"audio": True, "audio_sample_rate": 8000})
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
    dm = module(corpus, train={"format": "webdataset", "shards": str(tmp_path)},
                streaming={"enabled": True, "shuffle_buffer": 4},
                loader={"num_workers": 2, "persistent_workers": False})
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == len(dm.train_dataloader())
    assert sorted(k for b in batches for k in b["key"]) == [f"{i:09d}" for i in range(12)]
    check_batch(batches[0], len(batches[0]["key"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for CPU-only machines (this one has a GPU)")
def test_gpu_decode_falls_back_to_cpu_with_a_warning(corpus):
    with pytest.warns(UserWarning, match="no CUDA GPU"):
        dm = module(corpus, decode={"device": "cuda"}, loader={"num_workers": 2})
    assert dm.decode_device == "cpu" and dm.num_workers == 2
    dm.setup("validate")
    assert next(iter(dm.val_dataloader()))["video"].device.type == "cpu"


@pytest.mark.gpu
def test_gpu_decode_keeps_frames_on_gpu(corpus):
    with warnings.catch_warnings(record=True):
        dm = module(corpus, decode={"device": "cuda", "backend": "torchcodec"}, loader={"num_workers": 2})
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
    dm = module(bad_corpus, val=None, loader={"num_workers": 2},
                bad_samples={"report_dir": str(tmp_path / "report"), "max_skip_rate": 0.2})
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

    strict = module(bad_corpus, val=None, bad_samples={"report_dir": str(tmp_path / "r2"), "max_skip_rate": 0.05})
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    from vidlang.data.badsamples import BadSampleError

    with pytest.raises(BadSampleError, match=r"1 of 13 samples failed"):
        trainer.fit(_Tiny(), datamodule=strict)


def _data_parser():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(VideoDataModule, "data")
    return parser


def _instantiate(parser, cfg) -> VideoDataModule:
    return (getattr(parser, "instantiate", None) or parser.instantiate_classes)(cfg).data


def test_typed_signature_builds_from_yaml(corpus):
    parser = _data_parser()
    cfg = parser.parse_string(
        f"data:\n  train: {{format: manifest, path: {corpus / 'manifest.csv'}, split: train}}\n"
        "  sampling: {num_frames: 4, eval_num_frames: 6}\n  transform: {image_size: 32, crop_scale: [0.4, 1.0]}\n"
        "  decode: {backend: pyav}\n  loader: {num_workers: 0}\n  bad_samples: {max_skip_rate: 0.2}\n")
    dm = _instantiate(parser, cfg)
    assert isinstance(dm, VideoDataModule) and dm.transform.crop_scale == (0.4, 1.0)
    assert isinstance(dm.sampling, SamplingConfig) and (dm.sampling.num_frames, dm.sampling.eval_num_frames) == (4, 6)
    assert dm.bad_samples.max_skip_rate == 0.2 and dm.loader.batch_size == LoaderConfig().batch_size
    with pytest.raises(ValueError, match="needs a 'format' key"):
        VideoDataModule(train={"path": "x.csv"})


def test_group_options_override_on_the_command_line_and_typos_are_errors():
    from jsonargparse import ArgumentError

    parser = _data_parser()
    cfg = parser.parse_args(["--data.loader.batch_size", "4", "--data.sampling.eval_num_frames", "16",
                             "--data.decode.audio", "true", "--data.bad_samples.report_dir", "/tmp/r"])
    dm = _instantiate(parser, cfg)
    assert dm.loader.batch_size == 4 and dm.loader.batch(training=False) == 4 and dm.decode.audio
    assert (dm.sampling.frames(training=True), dm.sampling.frames(training=False)) == (8, 16)
    assert dm.bad_samples.report_dir == "/tmp/r"
    with pytest.raises(ArgumentError, match="batch_sise"):  # a typo'd key inside a group, on the command line
        parser.parse_args(["--data.loader.batch_sise", "4"])
    with pytest.raises(ArgumentError, match="num_frame"):  # ... and in YAML
        parser.parse_string("data:\n  sampling: {num_frame: 4}\n")
    with pytest.raises(ArgumentError, match="num_frames"):  # an old flat key is refused, not ignored
        parser.parse_string("data:\n  num_frames: 4\n")


@pytest.mark.parametrize("group,values,message", [
    ("sampling", {"num_frames": 0}, r"data\.sampling\.num_frames must be >= 1, got 0"),
    ("sampling", {"eval_num_frames": -2}, r"data\.sampling\.eval_num_frames must be >= 1, got -2"),
    ("transform", {"image_size": 0}, r"data\.transform\.image_size must be >= 1, got 0"),
    ("loader", {"batch_size": -1}, r"data\.loader\.batch_size must be >= 1, got -1"),
    ("loader", {"eval_batch_size": 0}, r"data\.loader\.eval_batch_size must be >= 1, got 0"),
    ("loader", {"num_workers": -1}, r"data\.loader\.num_workers must be >= 0, got -1"),
    ("loader", {"prefetch_factor": 0}, r"data\.loader\.prefetch_factor must be >= 1, got 0"),
    ("decode", {"resize_short_side": 0}, r"data\.decode\.resize_short_side must be >= 1, got 0"),
    ("streaming", {"samples_per_epoch": 0}, r"data\.streaming\.samples_per_epoch must be >= 1, got 0"),
    ("bad_samples", {"max_skip_rate": 1.5}, r"data\.bad_samples\.max_skip_rate must be in \[0, 1\], got 1\.5"),
    ("bad_samples", {"max_retries": -1}, r"data\.bad_samples\.max_retries must be >= 0, got -1"),
    ("loader", {"batch_sise": 3}, r"data\.loader: unknown key\(s\) batch_sise; it takes batch_size, eval_batch_size"),
])
def test_bad_group_values_are_config_errors(group, values, message):
    with pytest.raises(ConfigError, match=message):
        VideoDataModule(**{group: values})


def test_eval_clips_have_eval_num_frames(corpus):
    """Training samples ``num_frames`` per clip, validation and test ``eval_num_frames`` (default: the same)."""
    test = {"format": "manifest", "path": str(corpus / "manifest.csv")}
    dm = module(corpus, test=test, sampling={"eval_num_frames": 6})
    dm.setup(None)
    check_batch(next(iter(dm.train_dataloader())), 4, frames=T)
    check_batch(next(iter(dm.val_dataloader())), 4, frames=6)
    check_batch(next(iter(dm.test_dataloader())), 4, frames=6)
    views = module(corpus, sampling={"eval_num_frames": 2, "eval_sampler": "multiview",
                                     "eval_sampler_args": {"num_views": 2}})
    views.setup("validate")
    check_batch(next(iter(views.val_dataloader())), 4, views=2, frames=2)
    same = module(corpus)  # no eval_num_frames: evaluation takes num_frames
    same.setup("validate")
    check_batch(next(iter(same.val_dataloader())), 4, frames=T)
    fps = module(corpus, sampling={"sampler": "fps", "sampler_args": {"fps": 100.0}, "eval_num_frames": 3})
    assert (fps.sampling.build(True).max_frames, fps.sampling.build(False).max_frames) == (T, 3)


def test_hyper_parameters_are_plain_values(corpus):
    """The hyper-parameters go into checkpoints: plain values only (a vidlang class would make the safe reader
    refuse the checkpoint), and they round-trip into an equal datamodule."""
    dm = module(corpus, sampling={"eval_num_frames": 6}, bad_samples={"max_skip_rate": 0.1})

    def plain(x) -> bool:
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, (list, tuple)):
            return all(plain(v) for v in x)
        return x is None or isinstance(x, (str, int, float, bool))

    hp = dict(dm.hparams)
    assert plain(hp) and hp["sampling"]["eval_num_frames"] == 6 and hp["bad_samples"]["max_skip_rate"] == 0.1
    again = VideoDataModule(**hp)
    assert (again.sampling, again.transform, again.loader, again.decode, again.streaming) == (
        dm.sampling, dm.transform, dm.loader, dm.decode, dm.streaming)
    assert again.bad_samples == dm.bad_samples and again.splits == dm.splits


def test_default_bad_sample_policy_is_not_shared():
    a, b = VideoDataModule(), VideoDataModule()
    a.setup(None)  # no splits: only picks a report folder
    assert a.bad_samples.report_dir is not None and b.bad_samples.report_dir is None
    assert VideoDataModule.__init__.__defaults__ is not None  # the signature default stays untouched
    assert all(getattr(d, "report_dir", None) is None for d in VideoDataModule.__init__.__defaults__)


def test_lightning_streaming_epochs_are_exact_and_reshuffled(corpus, tmp_path):
    from vidlang.commands.shards import write_shards
    from vidlang.data.formats import build_index

    write_shards(build_index("manifest", path=str(corpus / "manifest.csv")), tmp_path / "s", 2, progress=False)
    dm = module(corpus, val=None, train={"format": "webdataset", "shards": str(tmp_path / "s")},
                streaming={"enabled": True, "shuffle_buffer": 3}, loader={"num_workers": 2},
                bad_samples={"report_dir": str(tmp_path / "r")})
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
    dm = module(bad_corpus, val=val, loader={"num_workers": 1},
                bad_samples={"report_dir": str(tmp_path / "report"), "max_skip_rate": 0.5})
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

    strict = module(bad_corpus, val=val, loader={"num_workers": 1},
                    bad_samples={"report_dir": str(tmp_path / "r2"), "max_skip_rate": 0.05})
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


def test_every_flat_key_of_before_the_groups_has_a_hint_to_a_real_option():
    """The 32 flat settings VideoDataModule took before the groups each map to an existing group field."""
    from dataclasses import fields

    from vidlang.data.config import MOVED_KEYS, moved_keys_hint
    from vidlang.data.datamodule import GROUP_TYPES

    old = ("num_frames sampler sampler_args eval_sampler eval_sampler_args image_size crop_scale crop_ratio hflip "
           "three_crop batch_size eval_batch_size num_workers persistent_workers pin_memory prefetch_factor backend "
           "decode_device resize_short_side max_pixels decode_audio audio_sample_rate streaming shuffle_buffer "
           "resampled samples_per_epoch bad_sample_dir max_skip_rate max_retries decode_timeout_s loader_timeout_s "
           "preflight_entries").split()
    assert sorted(MOVED_KEYS) == sorted(old)
    for new in MOVED_KEYS.values():
        group, key = new.split(".")
        assert key in {f.name for f in fields(GROUP_TYPES[group])}, new
    assert moved_keys_hint("unrecognized arguments: --data.decode_audio true") == (
        " (data settings are grouped: data.decode_audio is now data.decode.audio)")
    assert moved_keys_hint("data.sampling.num_frames must be >= 1") == ""  # a grouped key is not flagged
