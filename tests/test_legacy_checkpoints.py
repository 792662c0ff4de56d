"""Checkpoints written before issue 13's renames still load, with the same outputs.

Before: ``ModelConfig.vision`` / ``vision_overrides`` / ``lr_mult_backbone`` / ``lr_mult_block`` in the
hyper-parameters, the task's own ``lr_mult_block``, the task's settings as flat arguments (``lr``, ``mixup``,
``head``, ``view_layout``, ... before the groups of :mod:`vidlang.tasks.config`), and transformer layers saved as
``blocks.*`` (towers and the ``seq_transformer`` block). The old-style checkpoint is written exactly as that code
wrote it (key for key), from a model trained one step by the current code.
"""

from __future__ import annotations

import dataclasses

import pytorch_lightning as pl
import torch
from test_chat_encoder import llm_dir  # noqa: F401  (a fixture)
from test_retrieval_task import ColorVideos, tokenizer_dir  # noqa: F401  (a fixture)
from torch.utils.data import DataLoader

from vidlang.data.collate import collate_samples
from vidlang.models.clip.pretrained import load_pretrained, save_vidlang
from vidlang.models.factory import ModelConfig
from vidlang.serve.inference import load_bundle
from vidlang.tasks import RetrievalTask

CFG = ModelConfig(image="vit_tiny", num_frames=4, block="seq_transformer", block_args={"layers": 1},
                  image_overrides={"layers": 2}, lr_mults={"block": 3.0})
LAYER_PREFIXES = ("model.image_tower.", "model.text_tower.", "model.block.")
# how the tasks stored their settings before the groups: group -> {field: the flat argument it was}
FLAT_ARGUMENTS = {
    "optim": {k: k for k in ("lr", "weight_decay", "betas", "eps", "warmup_steps", "warmup_ratio", "min_lr_ratio")},
    "contrastive": {"gather": "gather", "local_loss": "local_loss"},
    "evaluation": {k: k for k in ("dsl", "dsl_temperature", "ties", "text_chunk", "write_plots", "view_layout",
                                  "base_to_novel", "base_ratio", "split_seed")},
    "mix": {k: k for k in ("mixup", "cutmix", "mix_prob", "switch_prob", "label_smoothing")},
    "head": {"enabled": "head", "init": "head_init", "lr_mult": "lr_mult_head"},
    "m2clip": {"enabled": "m2clip", "weights": "m2clip_weights", "mlm_prob": "mlm_prob"},
}


def flat_task_arguments(hp: dict) -> dict:
    """A task's hyper-parameters as the code before the groups stored them (flat arguments)."""
    out = {k: v for k, v in hp.items() if k not in FLAT_ARGUMENTS}
    for group, fields in FLAT_ARGUMENTS.items():
        for field, value in (hp.get(group) or {}).items():
            if field in fields:  # fields added after the groups (e.g. optim.base_batch_size) did not exist then
                out[fields[field]] = value
    if out.get("m2clip_weights") == {}:
        out["m2clip_weights"] = None  # the old default
    return out


def old_style(ckpt: dict) -> dict:
    """``ckpt`` as the code before the renames wrote it."""
    old = dict(ckpt)
    old["state_dict"] = {}
    for key, value in ckpt["state_dict"].items():
        for prefix in LAYER_PREFIXES:
            if key.startswith(prefix + "layers."):
                key = prefix + "blocks." + key[len(prefix + "layers.") :]
        old["state_dict"][key] = value
    hp = dict(ckpt["hyper_parameters"])
    model = dict(hp["model"])
    model["vision"], model["vision_overrides"] = model.pop("image"), model.pop("image_overrides")
    mults = model.pop("lr_mults")
    assert not model.pop("weight_decays") and set(mults) <= {"", "block"}, "not expressible before the renames"
    model.update(lr_mult_backbone=mults.get("", 1.0), lr_mult_block=mults.get("block"))
    hp["model"], hp["lr_mult_block"] = model, None
    old["hyper_parameters"] = flat_task_arguments(hp)
    return old


def test_old_checkpoint_loads_with_identical_outputs(tmp_path, tokenizer_dir):  # noqa: F811
    pl.seed_everything(0)
    task = RetrievalTask(CFG, tokenizer=str(tokenizer_dir), evaluation={"write_plots": False})
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(task, DataLoader(ColorVideos(), batch_size=4, collate_fn=collate_samples))
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    ckpt = torch.load(tmp_path / "new.ckpt", map_location="cpu", weights_only=True)
    old = old_style(ckpt)
    assert any(".blocks.0." in k for k in old["state_dict"]) and not any(".layers." in k for k in old["state_dict"])
    torch.save(old, tmp_path / "old.ckpt")

    task.eval()
    video = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ids, mask = task.tokenize(["a red square moving right", "the blue box slides"])
    with torch.no_grad():
        want_v, want_t = task.model.encode_video(video).embeds, task.model.encode_text(ids, mask).embeds

    bundle = load_bundle(tmp_path / "old.ckpt")  # the safe reader (search / serve)
    loaded = RetrievalTask.load_from_checkpoint(tmp_path / "old.ckpt").eval()  # Lightning
    assert dataclasses.asdict(CFG) == loaded.hparams.model and "lr_mult_block" not in loaded.hparams
    assert "lr" in old["hyper_parameters"] and "optim" not in old["hyper_parameters"]  # really the flat layout
    for group in ("optim", "contrastive", "evaluation"):  # the flat arguments are back in their groups
        assert loaded.hparams[group] == task.hparams[group], group
    assert "lr" not in loaded.hparams and loaded.optim == task.optim and loaded.evaluation == task.evaluation
    for model in (bundle.model, loaded.model):
        with torch.no_grad():
            assert torch.equal(model.encode_video(video).embeds, want_v)
            assert torch.equal(model.encode_text(ids, mask).embeds, want_t)
        assert model.lr_mult("block.layers.0.attn.qkv.weight") == 3.0


def test_old_converted_directory_loads(tmp_path):
    """``vidlang convert`` output written before the rename (``image_tower.blocks.*``) loads as pretrained."""
    from vidlang.models.factory import build_model

    torch.manual_seed(0)
    src = build_model(ModelConfig(image="vit_tiny", block="mean"))
    sd = {k.replace("_tower.layers.", "_tower.blocks."): v for k, v in src.state_dict().items()}
    info = {"format": "vidlang", "source": "old", "unknown": [],
            "vision": {**dataclasses.asdict(src.image_tower.cfg)}, "text": dataclasses.asdict(src.text_tower.cfg)}
    save_vidlang(sd, info, tmp_path / "old")
    native, _ = load_pretrained(tmp_path / "old")
    assert "image_tower.layers.0.attn.qkv.weight" in native and not any(".blocks." in k for k in native)
    model = build_model(ModelConfig(image="vit_tiny", block="mean", pretrained=str(tmp_path / "old")))
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items())


def test_old_recognition_checkpoint_loads_and_classifies_the_same(tmp_path):
    """A RecognitionTask checkpoint with the flat arguments of before the groups (``head``, ``head_init``, ``lr``,
    ``mixup``, ``view_layout``, ...): Lightning-style loading and ``vidlang classify``'s loader rebuild the same
    task."""
    from vidlang.serve.inference import load_classifier
    from vidlang.serve.testing import synthetic_videos, tiny_recognition_checkpoint
    from vidlang.tasks.recognition import RecognitionTask

    path = tiny_recognition_checkpoint(tmp_path / "new")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    old = dict(ckpt, hyper_parameters=flat_task_arguments(ckpt["hyper_parameters"]))
    hp = old["hyper_parameters"]
    assert hp["head"] is True and hp["lr"] == 1e-3 and hp["mixup"] == 0.0 and "optim" not in hp
    torch.save(old, tmp_path / "old.ckpt")

    new_task = RecognitionTask.load_from_checkpoint(path).eval()
    old_task = RecognitionTask.load_from_checkpoint(tmp_path / "old.ckpt").eval()
    for group in ("head", "optim", "mix", "m2clip", "evaluation"):
        assert old_task.hparams[group] == new_task.hparams[group] == ckpt["hyper_parameters"][group], group
    assert old_task.head is not None and old_task.optim.lr == 1e-3 and old_task.head_config.enabled
    video = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(old_task.classify(video), new_task.classify(video))

    clip = load_classifier(path).decode_clip(str(sorted(synthetic_videos(tmp_path / "v", n=1).rglob("*.mp4"))[0]))
    names = list(new_task.class_names_by_split["train"])
    probs = [load_classifier(p).classify_clips(clip[None], names) for p in (path, tmp_path / "old.ckpt")]
    assert torch.equal(probs[0], probs[1])


def test_old_chat_checkpoint_loads(tmp_path, llm_dir):  # noqa: F811
    """A ChatEncoderTask checkpoint with the flat ``lr`` / ``weight_decay`` / ``betas`` / ``warmup_*`` of before."""
    from test_chat_encoder import VISUAL

    from vidlang.tasks.chat_encoder import ChatEncoderTask

    torch.manual_seed(0)
    task = ChatEncoderTask(model=VISUAL, llm=llm_dir, optim={"lr": 3e-4, "warmup_ratio": None})
    state = {k: v for k, v in task.state_dict().items() if not k.startswith("encoder.llm.")}
    hp = flat_task_arguments(dict(task.hparams))
    assert hp["lr"] == 3e-4 and hp["betas"] == (0.9, 0.999) and "optim" not in hp
    torch.save({"state_dict": state, "hyper_parameters": hp, "pytorch-lightning_version": pl.__version__},
               tmp_path / "old_chat.ckpt")
    loaded = ChatEncoderTask.load_from_checkpoint(tmp_path / "old_chat.ckpt")
    assert loaded.optim == task.optim and loaded.hparams["optim"] == task.hparams["optim"]
    torch.testing.assert_close(loaded.encoder.video_proj.weight, task.encoder.video_proj.weight)
