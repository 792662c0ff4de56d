"""Model factory: presets, freezing policies, learning-rate multipliers, parameter groups, pretrained loading."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from vidlang.models.factory import FREEZE_POLICIES, ModelConfig, build_model, resolve_configs
from vidlang.models.optim import param_groups


def tiny(**kw) -> ModelConfig:
    return ModelConfig(image="vit_tiny", **kw)


def test_presets_and_overrides():
    v, t = resolve_configs(ModelConfig())
    assert (v.width, v.layers, v.patch_size, v.embed_dim, t.width, t.context_length) == (768, 12, 32, 512, 512, 77)
    v, t = resolve_configs(ModelConfig(image="vit_l14"))
    assert (v.width, v.layers, v.patch_size, v.embed_dim, t.width) == (1024, 24, 14, 768, 768)
    v, t = resolve_configs(tiny(image_size=48, vocab_size=300, context_length=12, image_overrides={"layers": 2}))
    assert (v.image_size, v.grid, v.layers, t.vocab_size, t.context_length) == (48, (6, 6), 2, 300, 12)
    with pytest.raises(ValueError, match="embeds to"):
        resolve_configs(ModelConfig(image="vit_b32", text="text_l"))
    with pytest.raises(KeyError, match="unknown image tower config"):
        resolve_configs(ModelConfig(image="vit_nope"))


def test_build_model_parts_and_constants():
    model = build_model(tiny(block="seq_transformer", block_args={"layers": 1}))
    assert len(model.block.layers) == 1
    assert math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    assert model.image_mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert model.image_std == pytest.approx((0.26862954, 0.26130258, 0.27577711))
    assert model.lr_mults == {"backbone": 1.0, "block": 1.0}
    assert model.freeze_policy == "full"
    with pytest.raises(KeyError, match="unknown temporal block"):
        build_model(tiny(block="nope"))


def test_seq_transformer_initialised_from_text_tower_when_shapes_match():
    # text width == E (as in OpenAI CLIP) -> CLIP4Clip copies the text layers and position embedding
    cfg = tiny(block="seq_transformer", block_args={"heads": 4}, text_overrides={"width": 32, "heads": 4})
    model = build_model(cfg)
    src, dst = model.text_tower.layers[0], model.block.layers[0]
    assert torch.equal(src.attn.qkv.weight, dst.attn.qkv.weight)
    assert torch.equal(model.block.frame_position_embedding[:24], model.text_tower.positional_embedding[:24])


def _trainable(model) -> set[str]:
    return {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}


def test_freeze_policies():
    assert set(FREEZE_POLICIES.names()) >= {"full", "frozen_backbone", "block_only", "prompts_only"}
    assert _trainable(build_model(tiny(block="mean"))) == {"image_tower", "text_tower", "logit_scale"}
    vpt = build_model(tiny(block="vpt"))  # auto -> the block's default (frozen backbone)
    assert vpt.freeze_policy == "block_only" and _trainable(vpt) == {"block"}
    frozen = build_model(tiny(block="seq_transformer", freeze="frozen_backbone"))
    assert _trainable(frozen) == {"text_tower", "block", "logit_scale"}
    full_vpt = build_model(tiny(block="vpt", freeze="full", lr_mult_block=10.0, lr_mult_backbone=0.1))
    assert _trainable(full_vpt) == {"image_tower", "text_tower", "block", "logit_scale"}
    assert full_vpt.lr_mults == {"backbone": 0.1, "block": 10.0}
    with pytest.raises(KeyError, match="unknown freeze policy"):
        build_model(tiny(freeze="sometimes"))


def test_param_groups_decay_and_lr():
    model = build_model(tiny(block="vpt", freeze="full"))
    raw = param_groups(model, lr=1e-3, weight_decay=0.2, lr_mult_backbone=0.5, lr_mult_block=4)
    groups = {g["name"]: g for g in raw}
    assert set(groups) == {"backbone_decay", "backbone_no_decay", "block_no_decay", "logit_scale"}
    names = {id(p): n for n, p in model.named_parameters()}

    def members(key):
        return {names[id(p)] for p in groups[key]["params"]}

    assert groups["backbone_decay"]["lr"] == pytest.approx(5e-4) and groups["backbone_decay"]["weight_decay"] == 0.2
    assert groups["block_no_decay"]["lr"] == pytest.approx(4e-3) and groups["block_no_decay"]["weight_decay"] == 0.0
    assert groups["logit_scale"]["weight_decay"] == 0.0 and members("logit_scale") == {"logit_scale"}
    no_decay = members("backbone_no_decay")
    for n in ("image_tower.ln_pre.weight", "image_tower.layers.0.attn.qkv.bias", "image_tower.class_embedding",
              "image_tower.positional_embedding", "text_tower.token_embedding.weight"):
        assert n in no_decay, n
    assert "image_tower.layers.0.mlp.fc1.weight" in members("backbone_decay")
    assert members("block_no_decay") == {"block.vision_prompts", "block.text_prompts"}
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(model.parameters()))


def test_param_groups_only_trainable():
    model = build_model(tiny(block="seq_transformer", freeze="block_only"))
    groups = param_groups(model, lr=1.0, weight_decay=0.1, lr_mult_block=2.0)
    assert {g["name"] for g in groups} == {"block_decay", "block_no_decay"}
    assert all(g["lr"] == 2.0 for g in groups)
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.block.parameters())


def test_model_config_is_jsonargparse_friendly():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(ModelConfig, "model")
    cfg = parser.parse_args(["--model.image=vit_tiny", "--model.block=vpt", "--model.block_args={\"n_vision\": 4}"])
    built = parser.instantiate(cfg).model
    assert isinstance(built, ModelConfig) and built.block_args == {"n_vision": 4}
    assert build_model(built).block.vision_prompts.shape[1] == 4


def _fake_loader(monkeypatch, sd, info=None):
    module = types.ModuleType("vidlang.models.clip.pretrained")
    module.load_pretrained = lambda path, **_: (sd, info or {"source": path})
    monkeypatch.setitem(sys.modules, "vidlang.models.clip.pretrained", module)


def test_pretrained_weights_load_and_resample(monkeypatch):
    torch.manual_seed(0)
    src = build_model(tiny(block="mean"))
    sd = {k: v for k, v in src.state_dict().items()}
    _fake_loader(monkeypatch, sd)
    torch.manual_seed(1)
    model = build_model(tiny(block="seq_transformer", pretrained="/ckpt", image_size=48, context_length=16))
    assert model.pretrained_info["source"] == "/ckpt" and not model.pretrained_info["loaded_block"]
    assert torch.equal(model.image_tower.conv1.weight, src.image_tower.conv1.weight)
    assert torch.equal(model.text_tower.positional_embedding, src.text_tower.positional_embedding[:16])
    assert model.image_tower.positional_embedding.shape == (1 + 36, 64)
    assert torch.equal(model.image_tower.positional_embedding[0], src.image_tower.positional_embedding[0])


def test_pretrained_mismatch_is_a_clear_error(monkeypatch):
    sd = build_model(tiny(block="mean")).state_dict()
    del sd["image_tower.ln_post.weight"]
    sd["image_tower.extra"] = torch.zeros(1)
    _fake_loader(monkeypatch, sd)
    with pytest.raises(ValueError, match=r"/ckpt: checkpoint does not match.*ln_post.weight.*extra"):
        build_model(tiny(pretrained="/ckpt"))


def test_checkpoint_with_block_weights_keeps_them_and_binds_the_block(monkeypatch):
    # STAN copies CLIP layers in init_from_tower; a checkpoint with block weights must still bind the
    # block to the loaded towers and then restore the block's own trained weights over the copies.
    torch.manual_seed(0)
    trained = build_model(tiny(block="stan"))
    with torch.no_grad():
        for p in trained.block.parameters():
            p.add_(0.5)
    sd = dict(trained.state_dict())
    _fake_loader(monkeypatch, sd)
    torch.manual_seed(1)
    model = build_model(tiny(block="stan", pretrained="/ckpt"))
    assert model.pretrained_info["loaded_block"]
    for (name, p), (_, q) in zip(model.block.state_dict().items(), trained.block.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    video = torch.randn(2, 4, 3, 32, 32)
    model.eval(), trained.eval()
    with torch.no_grad():
        assert torch.allclose(model.encode_video(video).embeds, trained.encode_video(video).embeds, atol=1e-6)


def test_checkpoint_activation_mismatch_is_refused(monkeypatch):
    sd = build_model(tiny(block="mean")).state_dict()
    info = {"source": "/ckpt", "act_source": "config", "vision": {"act": "gelu"}, "text": {"act": "gelu"}}
    _fake_loader(monkeypatch, sd, info)
    with pytest.raises(ValueError, match=r"/ckpt: the checkpoint's image tower has act='gelu'"):
        build_model(tiny(pretrained="/ckpt"))
    # what the file does not tell is absent from info and listed as unknown: the model config's is used, loudly
    info.update(vision={}, text={}, unknown=["vision.act", "text.act"])
    with pytest.warns(UserWarning, match=r"/ckpt does not record vision.act, text.act"):
        build_model(tiny(pretrained="/ckpt"))


def test_encode_video_state_reaches_the_hooks():
    model = build_model(tiny(block="mean"))
    seen = {}

    def after_layer(i, x, ctx):
        seen.update(ctx.state)
        return x

    model.block.after_layer = after_layer
    model._hooks = frozenset({"after_layer"})
    model.encode_video(torch.randn(1, 2, 3, 32, 32), state={"caption_ids": 7})
    assert seen == {"caption_ids": 7}
