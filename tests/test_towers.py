"""CLIP towers: hook order and shapes, attn_input semantics, padding, position-embedding resampling."""

from __future__ import annotations

import pytest
import torch

from vidlang.models.clip.configs import image_config, text_config
from vidlang.models.clip.image import ClipImageTower
from vidlang.models.clip.layers import resample_pos_embed
from vidlang.models.clip.text import TextTower
from vidlang.models.contract import HookContext, TemporalBlock, TowerSpec, VideoOutput

SPEC = TowerSpec(width=64, layers=3, heads=4, embed_dim=32, grid=(4, 4), text_width=48, text_layers=2)


class Recorder(TemporalBlock):
    """Implements every hook and records (hook, layer, shape, B, T)."""

    def __init__(self) -> None:
        super().__init__(SPEC)
        self.calls: list[tuple] = []

    def _rec(self, name: str, i: int | None, x: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        self.calls.append((name, i, tuple(x.shape), ctx.batch, ctx.frames))
        return x

    def embed(self, x, ctx):
        return self._rec("embed", None, x, ctx)

    def before_layer(self, i, x, ctx):
        return self._rec("before_layer", i, x, ctx)

    def attn_input(self, i, h, ctx):
        return self._rec("attn_input", i, h, ctx)

    def before_mlp(self, i, x, ctx):
        return self._rec("before_mlp", i, x, ctx)

    def after_layer(self, i, x, ctx):
        return self._rec("after_layer", i, x, ctx)

    def text_embed(self, x, ctx):
        return self._rec("text_embed", None, x, ctx)

    def text_before_layer(self, i, x, ctx):
        return self._rec("text_before_layer", i, x, ctx)

    def text_before_mlp(self, i, x, ctx):
        return self._rec("text_before_mlp", i, x, ctx)

    def text_after_layer(self, i, x, ctx):
        return self._rec("text_after_layer", i, x, ctx)

    def pool(self, frame_tokens, frame_embeds, ctx):
        self.calls.append(("pool", None, tuple(frame_tokens.shape), ctx.batch, ctx.frames))
        return VideoOutput(embeds=frame_embeds.mean(1))


@pytest.fixture(scope="module")
def towers():
    torch.manual_seed(0)
    return ClipImageTower(image_config("vit_tiny")).eval(), TextTower(text_config("text_tiny")).eval()


def test_vision_hooks_called_in_order_with_shapes(towers):
    vision, _ = towers
    rec = Recorder()
    assert rec.implemented_hooks() == frozenset(TemporalBlock.IMAGE_HOOKS + TemporalBlock.TEXT_HOOKS)
    out = vision(torch.randn(2, 3, 3, 32, 32), rec)
    shape = (6, 17, 64)
    expected = [("embed", None, shape, 2, 3)]
    for i in range(3):
        expected += [(name, i, shape, 2, 3) for name in ("before_layer", "attn_input", "before_mlp", "after_layer")]
    assert rec.calls == expected
    assert out.frame_tokens.shape == (2, 3, 17, 64)
    assert out.frame_embeds.shape == (2, 3, 32)
    assert out.ctx.grid == (4, 4)
    # frame_embeds = ln_post(CLS) @ proj and frame_tokens carry ln_post on every token
    torch.testing.assert_close(out.frame_embeds, out.frame_tokens[:, :, 0] @ vision.proj)


def test_text_hooks_called_in_order_with_shapes(towers):
    _, text = towers
    rec = Recorder()
    ids = torch.randint(0, 512, (3, 7))
    out = text(ids, torch.ones(3, 7), rec)
    shape = (3, 7, 48)
    expected = [("text_embed", None, shape, 3, 1)]
    for i in range(2):
        expected += [(name, i, shape, 3, 1) for name in ("text_before_layer", "text_before_mlp", "text_after_layer")]
    assert rec.calls == expected
    assert out.embeds.shape == (3, 32) and out.tokens.shape == (3, 7, 32) and out.mask.shape == (3, 7)


def test_only_implemented_hooks_are_called(towers):
    vision, _ = towers

    class OnlyMlp(TemporalBlock):
        def before_mlp(self, i, x, ctx):
            seen.append(i)
            return x

    seen: list[int] = []
    blk = OnlyMlp(SPEC)
    assert blk.implemented_hooks() == frozenset({"before_mlp"})
    ref = vision(torch.ones(1, 1, 3, 32, 32)).frame_embeds
    out = vision(torch.ones(1, 1, 3, 32, 32), blk).frame_embeds
    assert seen == [0, 1, 2]
    torch.testing.assert_close(out, ref)


def _reference_vision(vision: ClipImageTower, frames: torch.Tensor, attn_fn) -> torch.Tensor:
    """Hand-written forward where attention reads ``attn_fn(ln_1(x))`` and the residual stays ``x``."""
    x, _ = vision.patch_embed(frames)
    x = vision.ln_pre(x)
    for blk in vision.layers:
        x = x + blk.attn(attn_fn(blk.ln_1(x)))
        x = x + blk.mlp(blk.ln_2(x))
    return vision.ln_post(x[:, 0]) @ vision.proj


def test_attn_input_changes_only_attention_input(towers):
    vision, _ = towers

    class Scale(TemporalBlock):
        def attn_input(self, i, h, ctx):
            return h * 1.7 + 0.3

    frames = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = vision(frames[None], Scale(SPEC)).frame_embeds[0]
        ref = _reference_vision(vision, frames, lambda h: h * 1.7 + 0.3)
        plain = _reference_vision(vision, frames, lambda h: h)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (out - plain).abs().max() > 1e-3  # the transform really did something


def test_vision_other_image_size_resamples_pos_embed(towers):
    vision, _ = towers
    out = vision(torch.randn(3, 2, 3, 40, 48))  # grid 5x6 instead of 4x4
    assert out.frame_tokens.shape == (3, 2, 31, 64)
    assert torch.isfinite(out.frame_embeds).all()


def test_vision_rejects_bad_shape(towers):
    vision, _ = towers
    with pytest.raises(ValueError, match=r"\[B, T, 3, H, W\]"):
        vision(torch.randn(2, 3, 32, 32))


def test_text_padding_does_not_change_embedding(towers):
    _, text = towers
    torch.manual_seed(1)
    ids = torch.randint(1, 512, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, 6:] = 0
    with torch.no_grad():
        full = text(ids, mask)
        short = text(ids[:1, :6])
        ids2 = ids.clone()
        ids2[0, 6:] = 7  # different padding tokens
        repadded = text(ids2, mask)
    torch.testing.assert_close(full.embeds[:1], short.embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.embeds, repadded.embeds, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(full.tokens[0, :6], short.tokens[0], atol=1e-5, rtol=1e-5)


def test_text_is_causal(towers):
    _, text = towers
    ids = torch.randint(1, 512, (1, 8))
    ids2 = ids.clone()
    ids2[0, 5] = (ids[0, 5] + 1) % 512
    with torch.no_grad():
        a, b = text(ids).tokens, text(ids2).tokens
    torch.testing.assert_close(a[0, :5], b[0, :5], atol=1e-6, rtol=1e-6)
    assert (a[0, 5:] - b[0, 5:]).abs().max() > 1e-4


def test_text_rejects_long_captions(towers):
    _, text = towers
    with pytest.raises(ValueError, match="context length 24"):
        text(torch.zeros(1, 30, dtype=torch.long))


def test_gradient_checkpointing_same_output_and_grads():
    torch.manual_seed(0)
    vision = ClipImageTower(image_config("vit_tiny")).train()
    video = torch.randn(2, 2, 3, 32, 32)
    out = vision(video).frame_embeds
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in vision.named_parameters()}
    vision.zero_grad()
    vision.set_gradient_checkpointing(True)
    out2 = vision(video).frame_embeds
    out2.square().sum().backward()
    torch.testing.assert_close(out2, out, atol=0, rtol=0)
    for n, p in vision.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-5, msg=n)


def _field(h: int, w: int, c: int, fn) -> torch.Tensor:
    ys = (torch.arange(h) + 0.5) / h
    xs = (torch.arange(w) + 0.5) / w
    grid = fn(ys[:, None].expand(h, w), xs[None, :].expand(h, w))  # [h, w]
    pe = grid.reshape(h * w, 1) * torch.linspace(1, 2, c)[None]  # [h*w, c]
    return torch.cat([torch.full((1, c), 5.0), pe])


def test_resample_pos_embed_constant_field_exact():
    pe = torch.cat([torch.randn(1, 8), torch.full((16, 8), 0.7)])
    out = resample_pos_embed(pe, (7, 5))
    assert out.shape == (36, 8)
    torch.testing.assert_close(out[0], pe[0])
    torch.testing.assert_close(out[1:], torch.full((35, 8), 0.7))


def test_resample_pos_embed_linear_field_interior():
    """Bicubic (a = -0.75) reproduces constants exactly and linear fields to well under 1 % inside."""

    def lin(y, x):
        return 2 * y - 3 * x + 1

    pe = _field(8, 8, 4, lin)
    out = resample_pos_embed(pe, (12, 12))
    ref = _field(12, 12, 4, lin)
    inner = out[1:].reshape(12, 12, 4)[3:-3, 3:-3]
    span = float(ref[1:].max() - ref[1:].min())
    torch.testing.assert_close(inner, ref[1:].reshape(12, 12, 4)[3:-3, 3:-3], atol=0.01 * span, rtol=0)
    torch.testing.assert_close(out[0], pe[0])
    assert resample_pos_embed(pe, (8, 8)) is pe  # same grid: untouched


def test_resample_pos_embed_keeps_coinciding_samples():
    """4 -> 12 (align_corners=False): new cell 3k+1 has the same centre as old cell k; values are kept."""
    pe = torch.randn(1 + 16, 6)
    out = resample_pos_embed(pe, (12, 12))[1:].reshape(12, 12, 6)
    torch.testing.assert_close(out[1::3, 1::3], pe[1:].reshape(4, 4, 6), atol=1e-5, rtol=1e-5)


def test_resample_pos_embed_rejects_non_square():
    with pytest.raises(ValueError, match="not a square grid"):
        resample_pos_embed(torch.randn(1 + 15, 4), (4, 4))
