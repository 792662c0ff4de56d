"""Every YAML in configs/ is instantiated through vidlang's LightningCLI (model, data and trainer)."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from vidlang.cli.lightning import VidlangCLI
from vidlang.data.formats import FORMATS
from vidlang.models.factory import ModelConfig
from vidlang.tasks.config import TASK_MOVED

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
DATA_CONFIGS = [p for p in CONFIGS if p.parent.name == "data"]
TASK_CONFIGS = [p for p in CONFIGS if p.parent.name != "data"]
CPU = ["--trainer.accelerator", "cpu", "--trainer.logger", "false"]
TINY = ["--model.init_args.model.image", "vit_tiny", *CPU]


def instantiate(*configs: Path, extra: list[str] | None = None) -> VidlangCLI:
    """Parse and build everything; parameters live on the meta device (full-size towers, no init cost)."""
    args = [arg for c in configs for arg in ("--config", str(c))] + (extra or [])
    with mock.patch.object(sys, "argv", ["vidlang"]), torch.device("meta"):  # LightningCLI warns on pytest's argv
        return VidlangCLI(args=args, run=False)


def test_configs_are_found():
    assert len(DATA_CONFIGS) >= 5 and len(TASK_CONFIGS) >= 8
    for path in CONFIGS:
        assert yaml.safe_load(path.read_text()), f"{path} is empty"


@pytest.mark.parametrize("task_config", TASK_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_task_config_instantiates(task_config: Path, tmp_path: Path):
    # Tasks are built exactly as configured (full-size towers; no checkpoint is loaded: the paper presets' weights
    # path is a placeholder the user replaces, so it is unset here).
    configs = [task_config, ROOT / "configs/data/synthetic.yaml"]
    if task_config.parent.name == "papers":
        configs.append(tmp_path / "no_weights.yaml")
        configs[-1].write_text("model: {init_args: {model: {pretrained: null}}}\n")
    cli = instantiate(*configs, extra=CPU)
    raw = yaml.safe_load(task_config.read_text())["model"]["init_args"]
    task = cli.model
    video_text = getattr(task, "video_text", task.model)  # audio-visual tasks wrap the video-text model
    assert task.hparams.model["block"] == raw["model"]["block"]
    assert task.hparams.model["image"] == raw["model"]["image"]
    assert video_text.image_tower.cfg.width == {"vit_tiny": 64, "vit_b32": 768, "vit_b16": 768}[raw["model"]["image"]]
    assert video_text.freeze_policy in ("full", "frozen_backbone", "frozen_text", "block_only", "prompts_only")
    assert cli.datamodule is not None
    # the number of frames is one setting: data.sampling drives it and the model follows (a model section that
    # set its own count would disagree with the data it is trained on -- e.g. 16 against ucf101's 8)
    for key in ("num_frames", "eval_num_frames"):
        assert key not in raw["model"], f"{task_config}: model.{key} comes from data.sampling (linked in the CLI)"
    sampling, cfg = cli.datamodule.sampling, ModelConfig.from_dict(task.hparams.model)
    assert cfg.num_frames == sampling.num_frames
    assert cfg.inference_frames == (sampling.eval_num_frames or sampling.num_frames)
    # the task's settings are typed groups (vidlang.tasks.config): no flat key of before them, and every value of a
    # group reaches the task (stored in its hyper-parameters, as checkpoints keep them)
    groups = type(task).config_groups()
    assert not [k for k in raw if k in TASK_MOVED.moved and k not in groups], f"{task_config}: flat task keys"
    for name, values in raw.items():
        if name in groups:
            assert isinstance(values, dict), f"{task_config}: {name} is a group (a mapping of its fields)"
            assert {k: task.hparams[name][k] for k in values} == {
                k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}, name


@pytest.mark.parametrize(("train", "evaluate"), [(6, 12), (8, None)])
def test_model_frames_follow_the_data(train, evaluate):
    """The CLI links data.sampling's training / evaluation frame counts into the model config, which is what
    inference (classify, search, serve) reads from the checkpoint."""
    extra = [*TINY, "--data.sampling.num_frames", str(train)]
    if evaluate is not None:
        extra += ["--data.sampling.eval_num_frames", str(evaluate)]
    cli = instantiate(ROOT / "configs/recognition/mean.yaml", ROOT / "configs/data/ucf101.yaml", extra=extra)
    cfg = ModelConfig.from_dict(cli.model.hparams.model)
    assert (cfg.num_frames, cfg.eval_num_frames, cfg.inference_frames) == (train, evaluate, evaluate or train)
    assert cli.model.hparams.model["num_frames"] == train  # stored in checkpoints


@pytest.mark.parametrize("data_config", DATA_CONFIGS, ids=lambda p: p.stem)
def test_data_config_instantiates(data_config: Path):
    cli = instantiate(ROOT / "configs/retrieval/mean.yaml", data_config, extra=TINY)
    raw = yaml.safe_load(data_config.read_text())["data"]
    dm = cli.datamodule
    assert dm.sampling.num_frames == raw["sampling"]["num_frames"]
    for group, values in raw.items():
        if group not in ("train", "val", "test", "seed"):  # a typed group: every value reaches the datamodule
            built = getattr(dm, group)
            assert {k: getattr(built, k) for k in values} == {
                k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}, group
    for split in ("train", "val", "test"):
        if raw.get(split) is not None:
            spec = dict(dm.splits[split])
            assert spec == raw[split]
            reader = FORMATS.get(spec.pop("format"))
            inspect.signature(reader).bind(**spec)  # the format's arguments are the reader's (no typos)
