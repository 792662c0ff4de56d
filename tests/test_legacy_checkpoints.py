"""Checkpoints written before issue 13's renames still load, with the same outputs.

Before: ``ModelConfig.vision`` / ``vision_overrides`` / ``lr_mult_backbone`` / ``lr_mult_block`` in the
hyper-parameters, the task's own ``lr_mult_block``, and transformer layers saved as ``blocks.*`` (towers and the
``seq_transformer`` block). The old-style checkpoint is written exactly as that code wrote it (key for key), from
a model trained one step by the current code.
"""

from __future__ import annotations

import dataclasses

import pytorch_lightning as pl
import torch
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
    old["hyper_parameters"] = hp
    return old


def test_old_checkpoint_loads_with_identical_outputs(tmp_path, tokenizer_dir):  # noqa: F811
    pl.seed_everything(0)
    task = RetrievalTask(CFG, tokenizer=str(tokenizer_dir), write_plots=False)
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
