"""Distinctive mechanics of the papers' blocks: prompt_switch, ila, stan, ted (issue 6)."""

from __future__ import annotations

import pytest
import torch

from vidlang.models.clip.layers import ResidualAttentionLayer
from vidlang.models.contract import HookContext, TowerSpec
from vidlang.models.factory import ModelConfig, build_model
from vidlang.models.temporal import build_block
from vidlang.models.temporal.ila import ILALayer, trapezoid, trapezoid_mask
from vidlang.models.temporal.prompt_switch import switch_index
from vidlang.models.temporal.stan import TemporalModule
from vidlang.models.temporal.ted import TEDAdapter, temporal_difference

SPEC = TowerSpec(width=16, layers=2, heads=2, embed_dim=8, grid=(3, 3), text_width=12, text_layers=2, vocab_size=50)


def _ctx(b: int, t: int, training: bool = False) -> HookContext:
    return HookContext(batch=b, frames=t, grid=SPEC.grid, training=training)


# -- prompt_switch ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("frames", [6, 8, 3])
def test_prompt_switch_exchanges_slots_across_frames(frames: int):
    block = build_block("prompt_switch", SPEC)
    npr, b, length = block.num_prompts, 2, 1 + SPEC.num_patches
    h = torch.randn(b * frames, length + npr, SPEC.width)
    out = block.attn_input(0, h, _ctx(b, frames))
    torch.testing.assert_close(out[:, :length], h[:, :length])  # CLS + patches untouched
    hp, op = h[:, length:].view(b, frames, npr, -1), out[:, length:].view(b, frames, npr, -1)
    for t in range(frames):
        start = t - t % npr
        n = min(npr, frames - start)  # the last chunk may be partial
        for s in range(npr):
            src = (start + s, t - start) if s < n else (t, s)  # frame f slot s <- frame s slot f
            torch.testing.assert_close(op[:, t, s], hp[:, src[0], src[1]])
    assert not torch.equal(out, h)
    # an involution: switching twice restores the input
    torch.testing.assert_close(block.attn_input(0, out, _ctx(b, frames)), h)
    assert switch_index(frames, npr).sort().values.tolist() == list(range(frames * npr))


def test_prompt_switch_leaves_the_residual_stream_alone():
    torch.manual_seed(0)
    block = build_block("prompt_switch", SPEC)
    layer = ResidualAttentionLayer(SPEC.width, SPEC.heads)
    b, t = 1, 6
    ctx = _ctx(b, t)
    x = block.before_layer(0, torch.randn(b * t, 1 + SPEC.num_patches, SPEC.width), ctx)  # prompts appended
    assert x.shape[1] == 1 + SPEC.num_patches + block.num_prompts
    switch = lambda h: block.attn_input(0, h, ctx)  # noqa: E731
    assert not torch.allclose(layer(x, attn_input=switch), layer(x))  # the switch changes attention
    with torch.no_grad():  # without an attention contribution only the residual stream remains
        layer.attn.out_proj.weight.zero_()
        layer.attn.out_proj.bias.zero_()
    torch.testing.assert_close(layer(x, attn_input=switch), layer(x))


def test_prompt_switch_prompts_rows_and_aggregation_start():
    block = build_block("prompt_switch", SPEC)
    b, t, length = 2, 8, 1 + SPEC.num_patches
    x = block.before_layer(0, torch.zeros(b * t, length, SPEC.width), _ctx(b, t))
    prompts = x[:, length:].view(b, t, block.num_prompts, -1)
    for frame in range(t):  # frame f of a chunk gets row P[f]; the partial chunk uses the first rows
        torch.testing.assert_close(prompts[1, frame], block.prompts[frame % block.num_prompts].detach())
    std = block.prompts.std().item()
    assert 0.5 * 0.02 * SPEC.width**-0.5 < std < 2 * 0.02 * SPEC.width**-0.5
    y = torch.randn(b * t, length + block.num_prompts, SPEC.width)
    out = block.after_layer(SPEC.layers - 1, y, _ctx(b, t))
    torch.testing.assert_close(out, y[:, :length])  # zero-init aggregation; prompts removed


def test_prompt_switch_caption_head_trains_from_token_embedding():
    torch.manual_seed(0)
    cfg = ModelConfig(image="vit_tiny", text_overrides={"width": 32}, block="prompt_switch")
    cfg.block_args = {"caption": True}
    model = build_model(cfg).train()
    head = model.block.caption_head
    torch.testing.assert_close(head.head.weight, model.text_tower.token_embedding.weight)
    ids = torch.randint(1, 400, (3, 8))
    ids[:, 5] = 511  # EOT (largest id); later positions are padding
    state = model.caption_state(ids, None, torch.tensor([1, 0, 1]), num_videos=2)
    assert torch.equal(state["caption_ids"], ids[torch.tensor([1, 0])])  # first caption of each video
    out = model.encode_video(torch.randn(2, 4, 3, 32, 32), state=state)
    loss = out.aux_losses["caption"]
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert head.head.weight.grad.abs().sum() > 0
    assert model.text_tower.token_embedding.weight.grad is None  # decoder inputs carry no gradient
    assert model.block.default_aux_weights == {"caption": 0.5}
    model.eval()
    with torch.no_grad():
        assert "caption" not in model.encode_video(torch.randn(2, 4, 3, 32, 32)).aux_losses


# -- ila ----------------------------------------------------------------------------------------------------
def test_ila_trapezoid_values():
    d = torch.tensor([0.0, 0.1, 0.25, -0.25, 0.5, -0.75, 0.9, 1.5])
    expected = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.625, 0.25, 0.025, 0.0])
    torch.testing.assert_close(trapezoid(d), expected)
    grid = torch.tensor([0.0, 0.625, 1.0, 0.625, 0.0])  # phi(g) for g = -1, -0.5, 0, 0.5, 1
    torch.testing.assert_close(trapezoid_mask(torch.zeros(2), (5, 5)), grid[:, None] * grid[None, :])
    shifted = trapezoid_mask(torch.tensor([0.5, 0.0]), (5, 5))  # x = 0.5 moves the mask along columns
    torch.testing.assert_close(shifted, grid[:, None] * torch.tensor([0.0, 0.0, 0.625, 1.0, 0.625])[None, :])


def test_ila_points_start_at_the_centre_and_masks():
    torch.manual_seed(0)
    layer = ILALayer(SPEC.width, hidden=32)
    g = torch.randn(6, 32, 3, 3)  # [B*(T-1), hidden, h, w], B = 2, T = 4
    pts = layer.points(g, 2)
    assert pts.shape == (2, 3, 4) and torch.equal(pts, torch.zeros_like(pts))
    centre = trapezoid_mask(torch.zeros(2), SPEC.grid)
    torch.testing.assert_close(layer.masks(pts[..., :2], SPEC.grid, training=False)[0, 0], centre)
    jittered = layer.masks(pts[..., :2], SPEC.grid, training=True)[0, 0]  # mean over 9 shifted points
    manual = torch.stack([trapezoid_mask(o, SPEC.grid) for o in layer.offsets]).mean(0)
    torch.testing.assert_close(jittered, manual)
    assert not torch.allclose(jittered, centre)
    block = build_block("ila", SPEC, hidden=32)
    block.align_decay()
    torch.testing.assert_close(block.layers[0].offsets, layer.offsets / 2)


def test_ila_identity_at_init_and_loss():
    torch.manual_seed(0)
    block = build_block("ila", SPEC, hidden=32).train()
    x = torch.randn(2 * 4, 1 + SPEC.num_patches, SPEC.width)
    ctx = _ctx(2, 4, training=True)
    torch.testing.assert_close(block.before_layer(0, x, ctx), x)
    torch.testing.assert_close(block.before_layer(1, x, ctx), x)
    loss = ctx.aux_losses["ila_align"]
    assert 0 < loss.item() < 2 * SPEC.layers  # mean(1 - cos) per layer, summed over layers
    ctx1 = _ctx(2, 1, training=True)  # one frame: no pairs, identity, zero loss
    x1 = torch.randn(2, 1 + SPEC.num_patches, SPEC.width)
    torch.testing.assert_close(block.before_layer(0, x1, ctx1), x1)
    assert ctx1.aux_losses["ila_align"].item() == 0.0
    variant = build_block("ila", SPEC, hidden=32, pooled_token_in_attention=True)
    y = variant.before_layer(0, x, _ctx(2, 4))
    assert y.shape[1] == x.shape[1] + 1 and variant.before_mlp(0, y, _ctx(2, 4)).shape == x.shape


# -- stan ---------------------------------------------------------------------------------------------------
def test_stan_spatial_layers_copy_the_clip_layers_after_loading():
    torch.manual_seed(0)
    model = build_model(ModelConfig(image="vit_tiny", block="stan", block_args={"depth": 2}))
    tower, block = model.image_tower, model.block
    new = {k: torch.randn_like(v) for k, v in tower.state_dict().items()}  # "pretrained" weights
    tower.load_state_dict(new)
    block.init_from_tower(tower, model.text_tower)
    assert block.start == tower.cfg.layers - 2
    for j in range(2):
        own, clip = block.spatial[j].state_dict(), tower.layers[block.start + j].state_dict()
        assert own.keys() == clip.keys()
        for k in own:
            torch.testing.assert_close(own[k], clip[k])
            assert own[k].data_ptr() != clip[k].data_ptr()  # a copy, not shared
    with torch.no_grad():
        block.spatial[0].mlp.fc1.weight.add_(1.0)
    assert not torch.equal(block.spatial[0].mlp.fc1.weight, tower.layers[block.start].mlp.fc1.weight)


def test_stan_temporal_module_and_branch_output():
    torch.manual_seed(0)
    mod = TemporalModule(SPEC.width, SPEC.heads)
    seq = torch.randn(2, 1 + 4 * SPEC.num_patches, SPEC.width)
    torch.testing.assert_close(mod(seq, 4), seq)  # zero-init projection: identity at init
    with torch.no_grad():
        mod.fc.weight.normal_()
    out = mod(seq, 4)
    torch.testing.assert_close(out[:, 0], seq[:, 0])  # the video CLS is untouched
    assert not torch.allclose(out[:, 1:], seq[:, 1:])
    # not the identity at init: the branch CLS is added to every frame CLS
    stan = build_model(ModelConfig(image="vit_tiny", block="stan")).eval()
    mean = build_model(ModelConfig(image="vit_tiny", block="mean")).eval()
    mean.image_tower.load_state_dict(stan.image_tower.state_dict())
    video = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(stan.encode_video(video).embeds, mean.encode_video(video).embeds)


# -- ted ----------------------------------------------------------------------------------------------------
def test_ted_difference_is_zero_on_a_static_video():
    torch.manual_seed(0)
    adapter = TEDAdapter(SPEC.width, 8)
    for p in adapter.parameters():  # any weights: the difference of identical frames is zero
        torch.nn.init.normal_(p)
    b, t = 2, 5
    frame = torch.randn(b, 1, 1 + SPEC.num_patches, SPEC.width)
    static = frame.expand(b, t, -1, -1).reshape(b * t, 1 + SPEC.num_patches, SPEC.width)
    assert torch.equal(adapter.difference(static, b, t, SPEC.grid), torch.zeros_like(static))
    moving = torch.randn(b * t, 1 + SPEC.num_patches, SPEC.width)
    diff = adapter.difference(moving, b, t, SPEC.grid).view(b, t, -1, SPEC.width)
    assert diff[:, 1:, 1:].abs().sum() > 0 and torch.equal(diff[:, :, 0], torch.zeros_like(diff[:, :, 0]))
    seq = torch.arange(6.0).view(1, 3, 2)
    torch.testing.assert_close(temporal_difference(seq, 3), torch.tensor([[[0.0, 0.0], [2.0, 2.0], [2.0, 2.0]]]))


@pytest.mark.parametrize("variant", ["12x", "24x"])
def test_ted_identity_at_init(variant: str):
    torch.manual_seed(0)
    block = build_block("ted", SPEC, variant=variant)
    assert block.adapters[VARIANT_POS[variant][-1]][0].enh_down.out_features == SPEC.width  # min(384, C)
    x = torch.randn(3 * 4, 1 + SPEC.num_patches, SPEC.width)
    ctx = _ctx(3, 4)
    for i in range(SPEC.layers):
        torch.testing.assert_close(block.before_layer(i, x, ctx), x)
        torch.testing.assert_close(block.before_mlp(i, x, ctx), x)
    w = torch.randn(3, 7, SPEC.text_width)
    torch.testing.assert_close(block.text_after_layer(0, w, HookContext(batch=3, frames=1)), w)
    assert set(block.adapters) == set(VARIANT_POS[variant])
    with pytest.raises(ValueError, match="variant"):
        build_block("ted", SPEC, variant="36x")


VARIANT_POS = {"12x": ("mlp",), "24x": ("attn", "mlp")}
