"""Frozen in Time (``frozen`` block): the released divided space-time attention, its zero init, T = 1, and the
joint image + video training with a frame curriculum (``docs/recipes.md``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vidlang.errors import ConfigError
from vidlang.models.factory import ModelConfig, build_model
from vidlang.models.temporal.frozen import FrozenInTime, time_attention
from vidlang.models.video_clip import VideoTextModel


def tiny(seed: int = 0, **block_args) -> VideoTextModel:
    torch.manual_seed(seed)
    return build_model(ModelConfig(block="frozen", image="vit_tiny", block_args=block_args))


def clip_video(model: VideoTextModel, b: int, t: int, seed: int = 1) -> torch.Tensor:
    size = model.image_tower.cfg.image_size
    return torch.randn(b, t, 3, size, size, generator=torch.Generator().manual_seed(seed))  # [B, T, 3, H, W]


# -- a re-statement of the released SpaceTimeTransformer (m-bain/frozen-in-time, model/video_transformer.py) ------
def released_attention(qkv: torch.nn.Linear, proj: torch.nn.Linear, heads: int, y: torch.Tensor,
                       groups: list[list[int]]) -> torch.Tensor:
    """VarAttention on ``y [B, L, C]``: the CLS (index 0) attends to every token; the queries of each group of
    token indices attend to [CLS] + that group. Written with explicit index lists, one group at a time."""
    b, length, c = y.shape
    d = c // heads
    q, k, v = (z.view(b, length, heads, d).transpose(1, 2) for z in qkv(y).chunk(3, dim=-1))  # [B, H, L, D]
    q = q * d**-0.5
    out = torch.zeros_like(q)
    out[:, :, :1] = (q[:, :, :1] @ k.transpose(-1, -2)).softmax(-1) @ v
    for group in groups:
        keys = [0, *group]
        a = (q[:, :, group] @ k[:, :, keys].transpose(-1, -2)).softmax(-1)
        out[:, :, group] = a @ v[:, :, keys]
    return proj(out.transpose(1, 2).reshape(b, length, c))


def released_video_embedding(model: VideoTextModel, video: torch.Tensor) -> torch.Tensor:
    """One sequence ``[CLS, frame 0 patches, ..., frame T-1 patches]`` per video through SpaceTimeBlocks."""
    tower, blk = model.image_tower, model.block
    b, t = video.shape[:2]
    x = tower.conv1(video.flatten(0, 1)).flatten(2).transpose(1, 2)  # [B*T, N, C]
    n, c = x.shape[1:]
    pe = tower.positional_embedding
    patches = x.view(b, t, n, c) + pe[1:] + blk.temporal_embedding[:t, None]
    cls = (tower.class_embedding + pe[0]).expand(b, 1, c)
    seq = tower.ln_pre(torch.cat([cls, patches.flatten(1, 2)], dim=1))  # [B, 1+T*N, C]
    time_groups = [[1 + f * n + p for f in range(t)] for p in range(n)]
    space_groups = [[1 + f * n + p for p in range(n)] for f in range(t)]
    heads = tower.cfg.heads
    for i, layer in enumerate(tower.layers):
        ta = blk.time_attn[i]
        time_out = released_attention(ta.qkv, ta.out_proj, heads, blk.time_norm[i](seq), time_groups)
        space_in = layer.ln_1(seq + time_out)
        seq = seq + released_attention(layer.attn.qkv, layer.attn.out_proj, heads, space_in, space_groups)
        seq = seq + layer.mlp(layer.ln_2(seq))
    return tower.ln_post(seq[:, 0]) @ tower.proj  # [B, E]


@pytest.mark.parametrize("t", [1, 2, 3])
def test_matches_the_released_divided_attention(t: int):
    model = tiny().eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # trained-looking temporal weights (not the zero init) and temporal embedding
        for name, p in model.block.named_parameters():
            if "time_norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        video = clip_video(model, 2, t)
        ours = model.encode_video(video)
        ref = released_video_embedding(model, video)
    torch.testing.assert_close(ours.embeds, ref, atol=2e-5, rtol=1e-4)
    assert ours.frame_embeds.shape == (2, t, ref.shape[-1])  # T copies of the video CLS
    # the gradients too (the CLS copies carry the released single CLS's gradient)
    params = [p for n, p in model.named_parameters() if n.startswith(("block.", "image_tower.layers.0."))]
    ours_grads = torch.autograd.grad(model.encode_video(video).embeds.square().sum(), params)
    ref_grads = torch.autograd.grad(released_video_embedding(model, video).square().sum(), params)
    for a, b in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_zero_init_is_the_released_init_and_one_frame_is_the_image_model():
    model = tiny().eval()
    for attn in model.block.time_attn:  # released initialize='zeros'
        assert attn.qkv.weight.abs().sum() == 0 and attn.qkv.bias.abs().sum() == 0
        assert (attn.out_proj.weight == 1).all() and attn.out_proj.bias.abs().sum() == 0
    assert model.block.temporal_embedding.abs().sum() == 0
    video = clip_video(model, 3, 1)
    with torch.no_grad():
        ours = model.encode_video(video).embeds
        image = model.image_tower(video).frame_embeds[:, 0]  # the tower without any block: the image model
    torch.testing.assert_close(ours, image, atol=0, rtol=0)  # bit-identical
    # T > 1 at init: the temporal attention adds nothing, but the CLS attends across frames (the released model)
    video = clip_video(model, 2, 3)
    with torch.no_grad():
        ours = model.encode_video(video).embeds
        frame_mean = model.image_tower(video).frame_embeds.mean(1)
    torch.testing.assert_close(ours, released_video_embedding(model, video), atol=2e-5, rtol=1e-4)
    assert not torch.allclose(ours, frame_mean, atol=1e-3)
    assert FrozenInTime.zero_init_identity is False and FrozenInTime.freeze_backbone is False


def test_one_frame_runs_the_temporal_attention_once_trained():
    model = tiny().eval()
    video = clip_video(model, 2, 1)
    with torch.no_grad():
        before = model.encode_video(video).embeds
        model.block.time_attn[0].qkv.weight.normal_(0, 0.2)
        after = model.encode_video(video).embeds
    assert after.shape == before.shape and torch.isfinite(after).all()
    assert not torch.allclose(after, before)  # released: a patch attends to {CLS, itself} also for images


def test_temporal_attention_mixes_frames_after_one_step():
    model = tiny().train()
    blk = model.block
    probe = torch.randn(1, 1 + 3 * 4, model.image_tower.width, generator=torch.Generator().manual_seed(7))

    def frame0_depends_on_frame1() -> bool:
        other = probe.clone()
        other[:, 1 + 4 : 1 + 8] = torch.randn(1, 4, probe.shape[-1])  # change frame 1 only
        with torch.no_grad():
            a = time_attention(blk.time_attn[0], blk.time_norm[0](probe), 3)[1][:, 0]
            b = time_attention(blk.time_attn[0], blk.time_norm[0](other), 3)[1][:, 0]
        return not torch.allclose(a, b, atol=1e-7)

    assert not frame0_depends_on_frame1()  # zero init: the temporal attention outputs 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    video = clip_video(model, 4, 3)
    ids = torch.randint(1, model.text_tower.cfg.vocab_size, (4, 7), generator=torch.Generator().manual_seed(2))
    out = model(video, ids, torch.ones_like(ids))
    v, tx = F.normalize(out.video.embeds, dim=-1), F.normalize(out.text.embeds, dim=-1)
    loss = F.cross_entropy(20 * v @ tx.T, torch.arange(4))
    loss.backward()
    assert blk.time_attn[0].qkv.weight.grad.abs().sum() > 0  # the value part moves first (released: proj = 1)
    opt.step()
    assert frame0_depends_on_frame1()


def test_refuses_too_many_frames_and_timm_towers():
    model = tiny(max_frames=2).eval()
    with pytest.raises(ValueError, match="3 frames exceed"):
        model.encode_video(clip_video(model, 1, 3))
    with pytest.raises(ConfigError, match="clip"):
        build_model(ModelConfig(block="frozen", image="timm:vit_tiny_patch16_224", image_size=32, text="text_tiny",
                                image_overrides={"depth": 2, "embed_dim": 48, "num_heads": 3}))
    with pytest.raises(ConfigError, match="frozen time-attention init"):
        tiny(time_init="ones")
