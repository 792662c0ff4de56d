"""ILA options of the released code (issue 14): interaction block, MIT pooling, per-module lr / wd, align decay."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vidlang.errors import ConfigError
from vidlang.models.contract import HookContext, TowerSpec
from vidlang.models.factory import ModelConfig, build_model
from vidlang.models.optim import matches
from vidlang.models.temporal import build_block
from vidlang.models.temporal.ila import ILA_POOLS, INTERACTIONS, DepthwiseSeparable, ILALayer, MultiframeIntegration

SPEC = TowerSpec(width=16, layers=2, heads=2, embed_dim=8, grid=(3, 3), text_width=12, text_layers=2, vocab_size=50)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- interaction block --------------------------------------------------------------------------------------------
def test_dwsep_interaction_structure():
    c, hidden = 24, 32
    block = INTERACTIONS.get("dwsep")(2 * c, hidden)
    dws, conv, bn, relu = block
    assert isinstance(dws, DepthwiseSeparable) and isinstance(relu, nn.ReLU) and bn.num_features == hidden
    dw, dw_bn, _ = dws.depthwise
    assert (dw.in_channels, dw.out_channels, dw.groups) == (2 * c, 2 * c, 2 * c)  # depthwise
    assert (dw.kernel_size, dw.padding) == ((3, 3), (1, 1))
    assert dw_bn.num_features == 2 * c and isinstance(dws.depthwise[2], nn.ReLU)
    pw, pw_bn, _ = dws.pointwise
    assert (pw.in_channels, pw.out_channels, pw.groups, pw.kernel_size) == (2 * c, hidden, 1, (1, 1))
    assert pw_bn.num_features == hidden and isinstance(dws.pointwise[2], nn.ReLU)
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding) == (hidden, hidden, (3, 3), (1, 1))
    assert all(m.bias is not None for m in (dw, pw, conv))  # PyTorch's default conv bias, as the code
    x = torch.randn(3, 2 * c, 4, 5)
    assert block(x).shape == (3, hidden, 4, 5)
    assert set(INTERACTIONS.names()) == {"conv", "dwsep"}


def test_ila_layer_parameter_count_matches_a_hand_count_of_the_released_k400_module():
    c = 768  # ViT-B; hidden 256 as in the code
    # interactive_block: depthwise 3x3 (2C*9 + 2C) + BN(2C) | pointwise (2C*256 + 256) + BN(256) | 3x3 256->256 + BN
    dwsep = (2 * c * 9 + 2 * c) + 2 * 2 * c + (2 * c * 256 + 256) + 2 * 256 + (256 * 256 * 9 + 256) + 2 * 256
    assert dwsep == 536 * c + 591_360
    prediction = (256 * 128 * 9 + 128) + 256 + (128 * 128 * 9 + 128) + 256 + (64 * 64 + 64) + (4 * 32 + 4)
    conv3d, fc = 128 * 128 * 3 + 128, 128 * c + c  # message_attn.conv, message_attn.fc
    message, skips = (c * c + c) + 2 * c, 2 * (c * c + c)  # message_fc + message_ln; the two skip fcs
    layer = ILALayer(c)
    assert _count(layer.interact) == dwsep == 1_003_008
    assert _count(layer.point_conv) + _count(layer.point_fc) + _count(layer.point_out) == prediction == 447_428
    assert _count(layer) == dwsep + prediction + conv3d + fc + message + skips == 3_372_100
    plain = ILALayer(c, interaction="conv")  # the SSv2 code: 3x3 2C->256 + BN, 3x3 256->256 + BN
    assert _count(plain.interact) == (2 * c * 256 * 9 + 256) + 512 + (256 * 256 * 9 + 256) + 512 == 4_130_304


@pytest.mark.parametrize("interaction", ["dwsep", "conv"])
def test_interaction_identity_at_init_and_gradients(interaction: str):
    torch.manual_seed(0)
    block = build_block("ila", SPEC, hidden=32, interaction=interaction).train()
    assert block.layers[0].interaction == interaction
    x = torch.randn(2 * 4, 1 + SPEC.num_patches, SPEC.width, requires_grad=True)
    ctx = HookContext(batch=2, frames=4, grid=SPEC.grid, training=True)
    y = block.before_layer(0, x, ctx)
    torch.testing.assert_close(y, x)  # zero-initialised skip projections: frame-mean CLIP at init
    with torch.no_grad():
        block.layers[0].skip_fc.weight.normal_(std=0.1)
    y = block.before_layer(0, x, ctx)
    (y.square().sum() + ctx.aux_losses["ila_align"]).backward()
    grads = [p.grad for p in block.layers[0].interact.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)


def test_default_interaction_is_dwsep_and_unknown_names_fail():
    block = build_block("ila", SPEC, hidden=32)
    assert isinstance(block.layers[0].interact[0], DepthwiseSeparable)
    with pytest.raises(ConfigError, match="conv, dwsep"):
        build_block("ila", SPEC, hidden=32, interaction="dense")


def test_weights_of_the_other_interaction_are_refused_with_the_fix():
    old = build_block("ila", SPEC, hidden=32, interaction="conv").state_dict()
    with pytest.raises(ConfigError, match="block_args.interaction: conv"):
        build_block("ila", SPEC, hidden=32).load_state_dict(old)
    new = build_block("ila", SPEC, hidden=32).state_dict()
    with pytest.raises(ConfigError, match="block_args.interaction: dwsep"):
        build_block("ila", SPEC, hidden=32, interaction="conv").load_state_dict(new)
    same = build_block("ila", SPEC, hidden=32, interaction="conv")
    same.load_state_dict(old)
    assert all(torch.equal(v, old[k]) for k, v in same.state_dict().items())


# -- MIT pooling ----------------------------------------------------------------------------------------------------
def test_mit_is_a_residual_transformer_with_frame_positions():
    torch.manual_seed(0)
    e, t = 64, 5
    mit = MultiframeIntegration(e, max_frames=16, layers=1)
    assert mit.layers[0].attn.heads == 1 and len(mit.layers) == 1  # heads E // 64
    assert _count(mit) == 12 * e * e + 13 * e + 16 * e  # one layer (qkv, out, fc1, fc2, two LNs) + positions
    f = torch.randn(3, t, e)
    out = mit(f)
    x = f + mit.frame_position_embedding[:t]
    torch.testing.assert_close(out, mit.layers[0](x) + f)  # residual to the input frame embeddings
    with torch.no_grad():  # no attention / MLP output and no positions: input + input
        for lin in (mit.layers[0].attn.out_proj, mit.layers[0].mlp.fc2):
            lin.weight.zero_()
            lin.bias.zero_()
        mit.frame_position_embedding.zero_()
    torch.testing.assert_close(mit(f), 2 * f)
    with pytest.raises(ValueError, match="max_frames"):
        mit(torch.randn(1, 17, e))


def test_mit_initialisation_as_the_released_code():
    torch.manual_seed(0)
    e = 512
    mit = MultiframeIntegration(e, max_frames=64)
    layer = mit.layers[0]
    assert mit.frame_position_embedding.std().item() == pytest.approx(0.02, rel=0.05)
    assert mit.frame_position_embedding.abs().max() <= 2.0  # truncated at +-2 (absolute, as timm / torch)
    for lin in (layer.attn.out_proj, layer.mlp.fc1, layer.mlp.fc2):
        assert lin.weight.std().item() == pytest.approx(0.02, rel=0.05) and not lin.bias.any()
    bound = (6 / (e + 3 * e)) ** 0.5  # Xavier-uniform over the [3E, E] in-projection, as nn.MultiheadAttention
    qkv = layer.attn.qkv.weight
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.95 * bound and not layer.attn.qkv.bias.any()
    assert all(torch.equal(ln.weight, torch.ones(e)) and not ln.bias.any() for ln in (layer.ln_1, layer.ln_2))
    assert layer.attn.heads == 8 and layer.mlp.fc1.out_features == 4 * e


def test_ila_pool_options_in_a_model():
    torch.manual_seed(0)
    mean = build_model(ModelConfig(image="vit_tiny", block="ila", block_args={"hidden": 32})).eval()
    mit = build_model(ModelConfig(image="vit_tiny", block="ila", block_args={"hidden": 32, "pool": "mit"})).eval()
    assert isinstance(mean.block.pooler, nn.Identity) and isinstance(mit.block.pooler, MultiframeIntegration)
    assert set(ILA_POOLS.names()) == {"mean", "mit"}
    mit.load_state_dict(mean.state_dict(), strict=False)  # same towers and alignment modules
    video = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        a, b = mean.encode_video(video), mit.encode_video(video)
    frames = a.frame_embeds  # with "mean", the tower's frame embeddings
    torch.testing.assert_close(a.embeds, frames.mean(1))
    torch.testing.assert_close(b.frame_embeds, mit.block.pooler(frames))
    torch.testing.assert_close(b.embeds, b.frame_embeds.mean(1))
    assert not torch.allclose(a.embeds, b.embeds)  # MIT is not the identity at init
    with torch.no_grad():  # order-aware: the frame position embedding
        rev = mit.encode_video(video.flip(1)).embeds
    assert not torch.allclose(rev, b.embeds, atol=1e-5)
    mit.train()
    mit.encode_video(video).embeds.square().sum().backward()
    pooled = [(n, p.grad) for n, p in mit.block.pooler.named_parameters()]
    assert pooled and all(g is not None and g.abs().sum() > 0 for _, g in pooled), [n for n, g in pooled if g is None]
    with pytest.raises(ConfigError, match="mean, mit"):
        build_block("ila", SPEC, pool="max")


# -- learning rates / weight decays -------------------------------------------------------------------------------
def test_param_groups_reproduce_the_released_optimizer():
    model = build_model(ModelConfig(image="vit_tiny", block="ila", block_args={"hidden": 32, "pool": "mit"}))
    groups = model.param_groups(lr=8e-6, weight_decay=3e-3)
    by_param = {id(p): g for g in groups for p in g["params"]}
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen))  # each parameter once
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("block.") for n in trainable)  # CLIP (both towers) and logit scale frozen
    assert set(by_param) == {id(p) for p in trainable.values()}
    for name, p in trainable.items():
        g = by_param[id(p)]
        decays = p.ndim >= 2 and "embedding" not in name
        if ".skip_fc." in name or ".align_fc." in name:  # temporal_skip_fc / temporal_skip_align_fc
            lr, wd = 8e-5, 1e-3
        elif name.startswith("block.pooler."):  # the MIT
            lr, wd = 4e-4, 3e-3
        else:  # message_fc, message_ln and the whole alignment module (message_attn)
            assert name.startswith("block.layers.")
            lr, wd = 5e-4, 1e-2
        assert g["lr"] == pytest.approx(lr, rel=1e-9), name
        assert g["weight_decay"] == pytest.approx(wd if decays else 0.0), name
    names = {n for n, p in trainable.items() if by_param[id(p)]["weight_decay"] == 0}
    assert "block.pooler.frame_position_embedding" in names and "block.layers.0.interact.0.depthwise.1.weight" in names
    # the task's weight decay reaches the MIT only
    other = {id(p): g for g in model.param_groups(lr=8e-6, weight_decay=0.5) for p in g["params"]}
    assert other[id(model.block.pooler.layers[0].mlp.fc1.weight)]["weight_decay"] == 0.5
    assert other[id(model.block.layers[0].message_fc.weight)]["weight_decay"] == pytest.approx(1e-2)


def test_wildcard_prefixes():
    assert matches("block.layers.*.skip_fc", "block.layers.3.skip_fc.weight")
    assert matches("block.layers.*.skip_fc", "block.layers.11.skip_fc")
    assert not matches("block.layers.*.skip_fc", "block.layers.3.skip_fcx.weight")
    assert not matches("block.layers.*.skip_fc", "block.layers.skip_fc.weight")
    assert not matches("block.layers.*.skip_fc", "block.layers.3")
    assert matches("*.layers", "block.layers.0.weight") and not matches("*.layers", "block")
    cfg = ModelConfig(image="vit_tiny", block="ila", block_args={"hidden": 32}, lr_mults={"block.layers.*.skip_fc": 1})
    model = build_model(cfg)  # a config may override one declared prefix (and the prefix check accepts it)
    lrs = {id(p): g["lr"] for g in model.param_groups(lr=8e-6, weight_decay=0.0) for p in g["params"]}
    assert lrs[id(model.block.layers[1].skip_fc.weight)] == pytest.approx(8e-6)
    assert lrs[id(model.block.layers[1].align_fc.weight)] == pytest.approx(8e-5)
    with pytest.raises(ConfigError, match="name no parameter or module"):
        build_model(ModelConfig(image="vit_tiny", block="ila", lr_mults={"block.layers.*.nope": 1}))


def test_align_decay_is_cumulative_on_every_layer():
    block = build_block("ila", SPEC, hidden=32)
    start = block.layers[0].offsets.clone()
    for _ in range(20):  # epochs 30..49 of the released schedule
        block.align_decay()
    for layer in block.layers:
        torch.testing.assert_close(layer.offsets, start * 2.0**-20)
    assert block.layers[0].offsets.abs().max().item() == pytest.approx(0.2 * 2.0**-20)
    assert "layers.0.offsets" in block.state_dict()  # a buffer: a resumed run keeps the decayed offsets
