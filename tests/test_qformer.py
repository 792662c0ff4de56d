"""The reusable Q-former and the ``qformer`` temporal block (Video-LLaMA's video Q-former)."""

from __future__ import annotations

import pytest
import torch

from vidlang.models.contract import HookContext, TowerSpec
from vidlang.models.factory import ModelConfig, build_model
from vidlang.models.qformer import QFormer
from vidlang.models.temporal import BLOCKS

SPEC = TowerSpec(width=64, layers=2, heads=4, embed_dim=32, grid=(4, 4))


def frames(b: int, t: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, 17, 64, generator=g), torch.randn(b, t, 32, generator=g)  # tokens, embeds


def ctx(b: int, t: int) -> HookContext:
    return HookContext(batch=b, frames=t, grid=(4, 4))


@pytest.mark.parametrize("norm_first", [False, True])
def test_qformer_shapes_mask_and_checkpointing(norm_first: bool):
    torch.manual_seed(0)
    qf = QFormer(dim=32, num_queries=5, num_layers=2, heads=4, context_dim=48, norm_first=norm_first).train()
    context = torch.randn(3, 7, 48)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    out = qf(context, mask)
    assert out.shape == (3, 5, 32) and torch.isfinite(out).all()
    changed = context.clone()
    changed[1, 4:] = 100.0  # masked context tokens are never read
    torch.testing.assert_close(qf(changed, mask), out)
    assert not torch.allclose(qf(changed), qf(context))
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in qf.named_parameters()}
    assert all(g.abs().sum() > 0 for g in grads.values())
    qf.zero_grad()
    qf.set_grad_checkpointing(True)
    out2 = qf(context, mask)
    out2.square().mean().backward()
    torch.testing.assert_close(out2, out)
    for n, p in qf.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-5)


def test_qformer_rejects_bad_context():
    qf = QFormer(dim=32, num_queries=4, heads=4, context_dim=48)
    with pytest.raises(ValueError, match=r"context \[B, L, 48\]"):
        qf(torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="hides every token"):
        qf(torch.randn(2, 5, 48), torch.tensor([[True] * 5, [False] * 5]))
    with pytest.raises(ValueError, match="not divisible"):
        QFormer(dim=30, heads=4)


@pytest.mark.parametrize("t", [1, 4, 8, 32])
def test_block_outputs_q_tokens_whatever_t(t: int):
    torch.manual_seed(0)
    block = BLOCKS.build("qformer", SPEC).eval()
    tok, emb = frames(2, t)
    with torch.no_grad():
        out = block.pool(tok, emb, ctx(2, t))
    assert out.tokens.shape == (2, 32, 64)  # defaults: 32 queries, width of the image tower
    assert out.embeds.shape == (2, 32) and out.frame_embeds is emb
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.embeds).all()


def test_block_sources_widths_and_frame_order():
    torch.manual_seed(0)
    tok, emb = frames(2, 6)
    for source, width in (("tokens", 64), ("cls", 64), ("embeds", 32)):
        block = BLOCKS.build("qformer", SPEC, source=source, num_queries=3, dim=48, heads=4).eval()
        assert block.frame_position_embedding.shape == (32, width)
        with torch.no_grad():
            out = block.pool(tok, emb, ctx(2, 6))
            rev = block.pool(tok.flip(1), emb.flip(1), ctx(2, 6))
        assert out.tokens.shape == (2, 3, 48)
        assert not torch.allclose(out.embeds, rev.embeds, atol=1e-4)  # frame positions make it order-aware
    # the cls source reads only the CLS token of each frame
    block = BLOCKS.build("qformer", SPEC, source="cls", num_queries=3).eval()
    other = tok.clone()
    other[:, :, 1:] = 0.0
    with torch.no_grad():
        torch.testing.assert_close(block.pool(other, emb, ctx(2, 6)).tokens, block.pool(tok, emb, ctx(2, 6)).tokens)


def test_more_frames_than_positions_interpolate_or_error():
    torch.manual_seed(0)
    block = BLOCKS.build("qformer", SPEC, max_frames=4, num_queries=2).eval()
    pos = block.frame_positions(7)
    assert pos.shape == (7, 64)
    torch.testing.assert_close(pos[[0, -1]], block.frame_position_embedding[[0, -1]])  # ends kept
    tok, emb = frames(1, 7)
    with torch.no_grad():
        assert block.pool(tok, emb, ctx(1, 7)).tokens.shape == (1, 2, 64)
    strict = BLOCKS.build("qformer", SPEC, max_frames=4, frame_overflow="error")
    with pytest.raises(ValueError, match="7 frames but max_frames=4"):
        strict.pool(tok, emb, ctx(1, 7))
    with pytest.raises(ValueError, match="source"):
        BLOCKS.build("qformer", SPEC, source="patches")


def test_residual_pool_starts_as_frame_mean():
    torch.manual_seed(0)
    block = BLOCKS.build("qformer", SPEC, pool="residual").eval()
    tok, emb = frames(3, 4)
    with torch.no_grad():
        out = block.pool(tok, emb, ctx(3, 4))
    torch.testing.assert_close(out.embeds, emb.mean(dim=1))
    assert out.tokens.shape == (3, 32, 64)


def test_video_llama_recipe_freezes_the_image_tower():
    torch.manual_seed(0)
    model = build_model(ModelConfig(image="vit_tiny", block="qformer", block_args={"num_queries": 4}))
    assert model.freeze_policy == "block_only"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("block.") for n in trainable)
    assert model.block.qformer.layers[0].self_attn.heads == 1  # width 64 -> 64 // 64 heads by default
    out = model.encode_video(torch.randn(2, 3, 3, 32, 32))
    assert out.tokens.shape == (2, 4, 64) and out.embeds.shape == (2, model.embed_dim)


def test_frame_position_init_follows_video_llama_embedding_default():
    torch.manual_seed(0)
    block = BLOCKS.build("qformer", SPEC)  # Video-LLaMA: nn.Embedding(max_frame_pos, D), PyTorch's N(0, 1)
    std = float(block.frame_position_embedding.std())
    assert 0.9 < std < 1.1
    small = BLOCKS.build("qformer", SPEC, position_init_std=0.02)
    assert float(small.frame_position_embedding.std()) < 0.03
