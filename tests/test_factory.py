"""Model factory: presets, freezing policies, learning-rate multipliers, parameter groups, pretrained loading."""

from __future__ import annotations

import dataclasses
import math
import sys
import types

import pytest
import torch
from torch import nn

from vidlang.errors import ConfigError
from vidlang.models.contract import TemporalBlock, TowerSpec
from vidlang.models.factory import FREEZE_POLICIES, ModelConfig, build_model, removed_key_hint, resolve_configs
from vidlang.models.video_clip import VideoTextModel


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
    assert model.lr_mults == {"block": 1.0} and model.lr_mult("image_tower.conv1.weight") == 1.0
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
    full_vpt = build_model(tiny(block="vpt", freeze="full", lr_mults={"block": 10.0, "": 0.1}))
    assert _trainable(full_vpt) == {"image_tower", "text_tower", "block", "logit_scale"}
    assert full_vpt.lr_mults == {"": 0.1, "block": 10.0}
    assert (full_vpt.lr_mult("block.vision_prompts"), full_vpt.lr_mult("text_tower.ln_final.bias")) == (10.0, 0.1)
    with pytest.raises(KeyError, match="unknown freeze policy"):
        build_model(tiny(freeze="sometimes"))


def test_param_groups_decay_and_lr():
    model = build_model(tiny(block="vpt", freeze="full", lr_mults={"": 0.5, "block": 4}))
    raw = model.param_groups(lr=1e-3, weight_decay=0.2)
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
    model = build_model(tiny(block="seq_transformer", freeze="block_only", lr_mults={"block": 2.0}))
    groups = model.param_groups(lr=1.0, weight_decay=0.1)
    assert {g["name"] for g in groups} == {"block_decay", "block_no_decay"}
    assert all(g["lr"] == 2.0 for g in groups)
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.block.parameters())


def _groups(model, lr=1.0, wd=0.1) -> dict[str, dict]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: {**g, "members": {names[id(p)] for p in g["params"]}} for g in model.param_groups(lr, wd)}


def test_per_module_learning_rates_and_weight_decays():
    """Different lrs for different parts of one block (issue 13 item 7): longest prefix wins, prefixes end at dots."""
    mults, decays = {"block.aggregate": 1.0, "image_tower": 0.1}, {"image_tower": 0.05, "block.caption_head.head": 0.3}
    model = build_model(tiny(block="prompt_switch", freeze="full", lr_mults=mults, weight_decays=decays))
    assert model.lr_mults == {"block": 10.0, "block.aggregate": 1.0, "image_tower": 0.1}  # the block declares x10
    g = _groups(model, lr=1e-3, wd=0.2)
    aggregate = {"block.aggregate.in_proj_weight", "block.aggregate.out_proj.weight"}
    assert g["block.aggregate_decay"]["members"] == aggregate
    assert g["block.aggregate_decay"]["lr"] == pytest.approx(1e-3) and g["block_no_decay"]["lr"] == pytest.approx(1e-2)
    assert "block.prompts" in g["block_no_decay"]["members"]
    assert g["block.caption_head.head_decay"]["members"] == {"block.caption_head.head.weight"}
    head = g["block.caption_head.head_decay"]
    assert head["weight_decay"] == 0.3 and head["lr_mult"] == 10
    assert g["block_decay"]["weight_decay"] == 0.2 and g["block_no_decay"]["weight_decay"] == 0.0
    assert g["image_tower_decay"]["weight_decay"] == 0.05 and g["image_tower_decay"]["lr"] == pytest.approx(1e-4)
    assert g["image_tower_no_decay"]["weight_decay"] == 0.0
    assert g["backbone_decay"]["members"] and all(n.startswith("text_tower.") for n in g["backbone_decay"]["members"])
    assert g["logit_scale"]["members"] == {"logit_scale"} and g["logit_scale"]["weight_decay"] == 0.0
    total = sum(len(x["params"]) for x in g.values())
    assert total == len(list(model.parameters()))  # each parameter in exactly one group


def test_block_declared_prefixes_and_dotted_matching():
    from vidlang.models.optim import longest_prefix, matches

    assert matches("block", "block.prompts") and not matches("block", "blocks.0.w") and matches("", "anything")
    assert not matches("image_tower.layers.1", "image_tower.layers.10.ln_1.weight")
    table = {"": 1, "block": 10, "block.aggregate": 1}
    assert longest_prefix("block.aggregate.out_proj.weight", table) == "block.aggregate"

    class TwoRates(TemporalBlock):  # a block whose paper trains its parts at different rates
        lr_mults = {"": 10.0, "slow": 0.5}
        weight_decays = {"slow": 0.0}

        def __init__(self, spec):
            super().__init__(spec)
            self.fast, self.slow = nn.Linear(4, 4), nn.Linear(4, 4)

    model = VideoTextModel(*_towers(), TwoRates(TowerSpec(64, 3, 4, 32, (4, 4))), lr_mults={"": 0.5})
    g = _groups(model, wd=0.2)
    assert g["block_decay"]["members"] == {"block.fast.weight"} and g["block_decay"]["lr"] == 10.0
    assert g["block.slow_decay"]["members"] == {"block.slow.weight"} and g["block.slow_decay"]["lr"] == 0.5
    assert g["block.slow_decay"]["weight_decay"] == 0.0 and g["backbone_decay"]["lr"] == 0.5


def _towers():
    from vidlang.models.clip.configs import image_config, text_config
    from vidlang.models.clip.image import ClipImageTower
    from vidlang.models.clip.text import TextTower

    return ClipImageTower(image_config("vit_tiny")), TextTower(text_config("text_tiny"))


def test_recipe_prefix_typos_and_removed_keys_are_config_errors():
    with pytest.raises(ConfigError, match=r"model.lr_mults: \['blok'\] name no parameter or module"):
        build_model(tiny(lr_mults={"blok": 10.0}))
    with pytest.raises(ConfigError, match=r"model.weight_decays: \['block.aggregate'\]"):
        build_model(tiny(block="stan", weight_decays={"block.aggregate": 0.0}))  # prompt_switch has one, stan not
    build_model(tiny(block="mean", lr_mults={"block": 10.0}))  # a block without parameters: swapping blocks is one line
    with pytest.raises(ConfigError, match="numbers >= 0"):
        tiny(weight_decays={"block": -1.0})
    with pytest.raises(TypeError, match="lr_mult_block"):
        tiny(lr_mult_block=10.0)
    hint = removed_key_hint("Problem with given class_path: Group 'model' does not accept option 'lr_mult_block'")
    assert hint == "model.lr_mult_block is gone: use model.lr_mults: {block: X}"
    assert "model.image" in removed_key_hint("unrecognized arguments: --model.vision=vit_tiny")
    assert removed_key_hint("unrecognized arguments: --model.vision_overridez={}") is None


def test_from_dict_maps_the_keys_of_older_checkpoints():
    old = {**dataclasses.asdict(tiny(block="stan")), "lr_mult_backbone": 0.5, "lr_mult_block": 3.0}
    old["vision"], old["vision_overrides"] = old.pop("image"), old.pop("image_overrides")
    cfg = ModelConfig.from_dict(old)
    assert cfg == tiny(block="stan", lr_mults={"": 0.5, "block": 3.0})
    as_saved = {**old, "lr_mult_backbone": 1.0, "lr_mult_block": None}  # the defaults every old checkpoint carries
    assert ModelConfig.from_dict(as_saved) == tiny(block="stan")
    with pytest.raises(ConfigError, match="both 'vision' and 'image'"):
        ModelConfig.from_dict({"vision": "vit_tiny", "image": "vit_tiny"})
    with pytest.raises(ConfigError, match=r"unknown model config keys \['imgae'\]"):
        ModelConfig.from_dict({"imgae": "vit_tiny"})
    assert ModelConfig.from_dict({"imgae": "x", "block": "ila"}, strict=False) == ModelConfig(block="ila")


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
    with pytest.warns(UserWarning, match=r"/ckpt does not record image.act, text.act"):
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
