"""STAN options of the released code (issue 14): conv time module, ``cls_residue``, drop-path schedule, lr."""

from __future__ import annotations

import pytest
import torch

from vidlang.errors import ConfigError
from vidlang.models.contract import HookContext, TowerSpec
from vidlang.models.factory import ModelConfig, build_model
from vidlang.models.temporal import build_block
from vidlang.models.temporal.stan import TIME_MODULES, ConvTemporalModule, TemporalModule, drop_path_rates

SPEC = TowerSpec(width=16, layers=4, heads=2, embed_dim=8, grid=(2, 3), text_width=12, text_layers=2, vocab_size=50)


def _stan_model(**block_args) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(image="vit_tiny", block="stan", block_args=block_args))


# -- drop path ------------------------------------------------------------------------------------------------
def test_drop_path_schedule_is_linspace_zero_to_rate():
    assert drop_path_rates(0.1, 4) == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1])  # np.linspace(0, 0.1, 4)
    assert drop_path_rates(0.1, 1) == [0.0]
    assert drop_path_rates(0.0, 4) == [0.0] * 4
    block = build_block("stan", SPEC, depth=4, drop_path=0.1)
    temporal = [m.drop.p for m in block.temporal]
    spatial = [d.p for d in block.spatial_drop]
    assert temporal == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1]) and spatial == temporal
    assert [d.p for d in build_block("stan", SPEC, depth=4).spatial_drop] == [0.0] * 4  # default: none
    conv = build_block("stan", SPEC, depth=3, drop_path=0.2, time_module="conv")
    assert [m.drop.p for m in conv.temporal] == pytest.approx([0.0, 0.1, 0.2])
    with pytest.raises(ValueError, match="drop_path"):
        build_block("stan", SPEC, drop_path=1.0)


def test_drop_path_only_while_training():
    model = _stan_model(depth=2, drop_path=0.5)
    with torch.no_grad():
        for m in model.block.temporal:
            m.fc.weight.normal_(std=0.1)  # a temporal output for the drop path to drop
    video = torch.randn(4, 3, 3, 32, 32)
    with torch.no_grad():
        model.eval()
        a, b = model.encode_video(video).embeds, model.encode_video(video).embeds
        torch.testing.assert_close(a, b)
        model.train()
        torch.manual_seed(1)
        c = model.encode_video(video).embeds
        torch.manual_seed(2)
        d = model.encode_video(video).embeds
    assert not torch.allclose(c, d)


# -- conv time module -------------------------------------------------------------------------------------------
def test_conv_time_module_parameters_and_identity_at_init():
    c = SPEC.width
    mod = ConvTemporalModule(c, drop_path=0.0)
    assert mod.conv.weight.shape == (c, c, 3, 3, 3)  # dense, not depthwise
    assert sum(p.numel() for p in mod.parameters()) == 27 * c * c + c + c * c + c  # Conv3d + Linear C->C
    seq = torch.randn(2, 1 + 4 * SPEC.num_patches, c)
    torch.testing.assert_close(mod(seq, 4, SPEC.grid), seq)  # zero-initialised projection: identity
    block = build_block("stan", SPEC, time_module="conv")
    attn = build_block("stan", SPEC)
    per_layer = 28 * c * c + 2 * c
    attn_per_layer = sum(p.numel() for p in attn.temporal[0].parameters())
    assert block.extra_param_count() - attn.extra_param_count() == SPEC.layers * (per_layer - attn_per_layer)
    assert set(TIME_MODULES.names()) == {"attn", "conv"}
    assert isinstance(attn.temporal[0], TemporalModule)
    with pytest.raises(ConfigError, match="attn, conv"):
        build_block("stan", SPEC, time_module="lstm")


@pytest.mark.parametrize("tap, shift", [((0, 1, 1), (1, 0, 0)), ((1, 1, 0), (0, 0, 1)), ((1, 0, 1), (0, 1, 0))])
def test_conv_time_module_token_layout(tap: tuple[int, int, int], shift: tuple[int, int, int]):
    """A kernel with a single identity tap adds the neighbour (t - dt, row - dr, col - dc) of each patch: the
    time-major token layout maps to conv axes (T, rows, cols), on a non-square grid."""
    c, t, (h, w) = SPEC.width, 3, SPEC.grid
    mod = ConvTemporalModule(c)
    with torch.no_grad():
        mod.conv.weight.zero_()
        mod.conv.bias.zero_()
        mod.conv.weight[(slice(None), slice(None), *tap)] = torch.eye(c)
        mod.fc.weight.copy_(torch.eye(c))
    seq = torch.randn(2, 1 + t * h * w, c)
    out = mod(seq, t, (h, w))
    torch.testing.assert_close(out[:, 0], seq[:, 0])  # CLS untouched
    p, o = seq[:, 1:].view(2, t, h, w, c), out[:, 1:].view(2, t, h, w, c)
    dt, dr, dc = shift
    expected = p.clone()
    expected[:, dt:, dr:, dc:] += p[:, : t - dt, : h - dr, : w - dc]
    torch.testing.assert_close(o, expected)


def test_conv_time_module_in_a_model_trains():
    model = _stan_model(depth=2, time_module="conv").train()
    mean = build_model(ModelConfig(image="vit_tiny", block="mean")).eval()
    video = torch.randn(2, 4, 3, 32, 32)
    out = model.encode_video(video)
    assert out.embeds.shape == (2, model.embed_dim) and torch.isfinite(out.embeds).all()
    out.embeds.square().sum().backward()
    for mod in model.block.temporal:
        assert mod.fc.weight.grad.abs().sum() > 0
        assert mod.conv.weight.grad is not None  # zero at init: the projection after it is zero
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for mod in model.block.temporal:
            mod.fc.weight.normal_(std=0.1)
    model.encode_video(video).embeds.square().sum().backward()
    assert all(mod.conv.weight.grad.abs().sum() > 0 for mod in model.block.temporal)
    mean.image_tower.load_state_dict(model.image_tower.state_dict())
    with torch.no_grad():  # as the attention module: not frame-mean CLIP (the branch CLS is added)
        assert not torch.allclose(model.eval().encode_video(video).embeds, mean.encode_video(video).embeds)


# -- cls_residue ------------------------------------------------------------------------------------------------
def test_cls_residue_branch_input_train_vs_eval():
    torch.manual_seed(0)
    block = build_block("stan", SPEC, depth=2, cls_residue=True)
    plain = build_block("stan", SPEC, depth=2)
    b, t, n = 2, 5, SPEC.num_patches
    x = torch.randn(b * t, 1 + n, SPEC.width)
    frames = x.view(b, t, 1 + n, -1)

    def branch_input(blk, training: bool) -> torch.Tensor:
        ctx = HookContext(batch=b, frames=t, grid=SPEC.grid, training=training)
        ctx.state["stan"] = {0: torch.zeros(b, 1 + t * n, SPEC.width)}
        return blk._branch_input(1, x, ctx)

    train, evaluation = branch_input(block, True), branch_input(block, False)
    torch.testing.assert_close(train[:, 0], frames[:, 0::2, 0].mean(1))  # frames 0, 2, 4
    torch.testing.assert_close(evaluation[:, 0], frames[:, :, 0].mean(1))  # every frame
    torch.testing.assert_close(train[:, 1:], evaluation[:, 1:])  # patches unchanged
    torch.testing.assert_close(branch_input(plain, True), evaluation)  # off: all frames also while training
    assert not torch.allclose(train[:, 0], evaluation[:, 0])


def test_cls_residue_in_a_model():
    res, plain = _stan_model(depth=2, cls_residue=True), _stan_model(depth=2)
    plain.load_state_dict(res.state_dict())
    video = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        e_res, e_plain = res.eval().encode_video(video).embeds, plain.eval().encode_video(video).embeds
        torch.testing.assert_close(e_res, e_plain)  # evaluation: identical
        t_res, t_plain = res.train().encode_video(video).embeds, plain.train().encode_video(video).embeds
        torch.testing.assert_close(t_plain, e_plain)  # no dropout anywhere: train == eval without the option
        assert not torch.allclose(t_res, t_plain)  # training: the even frames' CLS
        one = video[:, :1]  # one frame: the even frames are all frames
        torch.testing.assert_close(res.encode_video(one).embeds, plain.encode_video(one).embeds)


def test_stan_declares_the_branch_lr():
    model = _stan_model(depth=2, time_module="conv")
    groups = {g["name"]: g for g in model.param_groups(lr=2e-6, weight_decay=0.02)}
    assert groups["block_decay"]["lr"] == pytest.approx(2e-5)  # the released configs: branch x10
    assert groups["backbone_decay"]["lr"] == pytest.approx(2e-6)
    conv_weights = {id(m.conv.weight) for m in model.block.temporal}
    assert conv_weights <= {id(p) for p in groups["block_decay"]["params"]}
