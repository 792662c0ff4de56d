"""The temporal-block contract (docs/architecture.md), checked for EVERY registered block and tiny tower.

Blocks added later are picked up automatically from ``BLOCKS.names()``; they must work with their
default arguments on the tiny towers: vidlang's CLIP ViT and a timm ViT (``ModelConfig.image = "timm:..."``),
or refuse a tower kind they do not declare in ``supported_towers`` with a ConfigError naming the reason.
:data:`VARIANTS` adds block options that change what the contract sees (e.g. ``conditions_text``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vidlang.errors import ConfigError
from vidlang.models.contract import TemporalBlock, TowerSpec
from vidlang.models.factory import ModelConfig, build_model
from vidlang.models.temporal import BLOCKS
from vidlang.models.video_clip import VideoTextModel, VideoTextOutput

# name -> (registered block, block_args): options that change the block's contract surface, checked as blocks too
VARIANTS = {"ila+video_prompts": ("ila", {"video_prompts": True})}
BLOCK_NAMES = BLOCKS.names() + sorted(VARIANTS)
TINY_TIMM = {"depth": 2, "embed_dim": 48, "num_heads": 3}
TOWERS = {
    "tiny32": {"image": "vit_tiny"},
    "tiny40": {"image": "vit_tiny", "image_size": 40},
    "timm": {"image": "timm:vit_tiny_patch16_224", "image_size": 32, "image_overrides": TINY_TIMM, "text": "text_tiny"},
}
KIND = {"tiny32": "clip", "tiny40": "clip", "timm": "timm"}


def block_config(block: str) -> dict:
    """``ModelConfig`` fields of a block name or variant."""
    name, args = VARIANTS.get(block, (block, {}))
    return {"block": name, "block_args": args}


def block_class(block: str) -> type[TemporalBlock]:
    return BLOCKS.get(block_config(block)["block"])


def runs_on(block: str, tower: str) -> bool:
    return KIND[tower] in block_class(block).supported_towers


# every block on both kinds of tower (the blocks that refuse a kind: test_blocks_refuse_what_they_cannot_run_on)
PAIRS = [(b, t) for t in ("tiny32", "timm") for b in BLOCK_NAMES if runs_on(b, t)]


def make(block: str, tower: str = "tiny32", seed: int = 0, **kw) -> VideoTextModel:
    torch.manual_seed(seed)
    return build_model(ModelConfig(**block_config(block), **TOWERS[tower], **kw))


def inputs(model: VideoTextModel, b: int, t: int, a: int | None = None, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    size = model.image_tower.cfg.image_size
    video = torch.randn(b, t, 3, size, size, generator=g)  # [B, T, 3, H, W]
    a = b if a is None else a
    vocab, length = model.text_tower.cfg.vocab_size, 9
    ids = torch.randint(1, vocab, (a, length), generator=g)  # [A, Lt]
    mask = torch.ones(a, length, dtype=torch.long)
    for row in range(1, a, 2):  # every other caption is padded
        mask[row, 4 + row % 4 :] = 0
    return video, ids, mask


def loss_of(out: VideoTextOutput, block: TemporalBlock) -> torch.Tensor:
    v = F.normalize(out.video.embeds, dim=-1)
    if block.conditions_text:  # video-specific text embeddings (X-CLIP): each video against its own [A, E]
        t = F.normalize(block.condition_text(out.text.embeds, out.video), dim=-1)  # [B, A, E]
        logits = out.logit_scale * torch.einsum("be,bae->ba", v, t)  # [B, A] with A == B
    else:
        t = F.normalize(out.text.embeds, dim=-1)
        logits = out.logit_scale * v @ t.T  # [B, A] with A == B
    target = torch.arange(logits.shape[0])
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    for value in out.aux_losses.values():
        loss = loss + value
    for extra in (out.video.tokens, out.video.frame_embeds, out.text.tokens):
        if extra is not None:
            loss = loss + 1e-3 * extra.float().square().mean()
    return loss


@pytest.mark.parametrize("block, tower", [(b, t) for t in sorted(TOWERS) for b in BLOCK_NAMES if runs_on(b, t)])
def test_shapes_and_finite(block: str, tower: str):
    model = make(block, tower).eval()
    e = model.embed_dim
    for t in (1, 4, 8):
        video, ids, mask = inputs(model, b=3, t=t, a=5)
        with torch.no_grad():
            out = model(video, ids, mask)
        assert out.video.embeds.shape == (3, e), (block, t)
        assert torch.isfinite(out.video.embeds).all(), (block, t)
        if out.video.frame_embeds is not None:
            assert out.video.frame_embeds.shape == (3, t, e)
        if out.video.tokens is not None:
            assert out.video.tokens.shape[0] == 3 and out.video.tokens.ndim == 3
            assert torch.isfinite(out.video.tokens).all()
        assert out.text.embeds.shape == (5, e)
        assert out.text.tokens.shape == (5, 9, e)
        assert torch.isfinite(out.text.embeds).all()
        for name, value in out.aux_losses.items():
            assert value.ndim == 0 and torch.isfinite(value), (block, name)


@pytest.mark.parametrize("block, tower", PAIRS)
def test_every_trainable_parameter_gets_a_gradient(block: str, tower: str):
    model = make(block, tower).train()
    video, ids, mask = inputs(model, b=2, t=3)
    loss_of(model(video, ids, mask), model.block).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, f"{block}: nothing trainable under its default freezing policy"
    missing = [n for n, p in trainable.items() if p.grad is None]
    assert not missing, f"{block}: no gradient for {missing}"
    bad = [n for n, p in trainable.items() if not torch.isfinite(p.grad).all()]
    assert not bad, f"{block}: non-finite gradient for {bad}"
    block_grads = [p.grad for n, p in trainable.items() if n.startswith("block.")]
    if block_grads:
        assert any(g.abs().sum() > 0 for g in block_grads), f"{block}: all block gradients are zero"


@pytest.mark.parametrize("block, tower", PAIRS)
def test_gradient_checkpointing_identical(block: str, tower: str):
    model = make(block, tower, freeze="full").train()
    video, ids, mask = inputs(model, b=2, t=3)
    out = model(video, ids, mask)
    loss_of(out, model.block).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.set_gradient_checkpointing(True)
    out2 = model(video, ids, mask)
    loss_of(out2, model.block).backward()
    torch.testing.assert_close(out2.video.embeds, out.video.embeds, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out2.text.embeds, out.text.embeds, atol=1e-6, rtol=1e-6)
    assert set(grads) == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4, msg=f"{block}: {n}")


@pytest.mark.parametrize("policy", ["frozen_backbone", "frozen_text", "block_only"])
@pytest.mark.parametrize("block, tower", PAIRS)
def test_frozen_parts_unchanged_after_step(block: str, tower: str, policy: str):
    model = make(block, tower, freeze=policy).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = model.param_groups(lr=1e-2, weight_decay=0.1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if not groups:
        assert not trainable and sum(p.numel() for p in model.block.parameters()) == 0
        return
    opt = torch.optim.AdamW(groups)
    video, ids, mask = inputs(model, b=2, t=3)
    loss_of(model(video, ids, mask), model.block).backward()
    opt.step()
    frozen_prefixes = {"frozen_backbone": ("image_tower.",), "frozen_text": ("text_tower.", "logit_scale"),
                       "block_only": ("image_tower.", "text_tower.", "logit_scale")}[policy]
    for n, p in model.named_parameters():
        if n.startswith(frozen_prefixes):
            assert not p.requires_grad and torch.equal(p, before[n]), f"{block}/{policy}: {n} changed"
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in trainable)


class _ZeroAdapter(TemporalBlock):
    """Test-only block: a zero-initialised residual adapter before every MLP (starts as the identity)."""

    zero_init_identity = True

    def __init__(self, spec: TowerSpec) -> None:
        super().__init__(spec)
        self.down = nn.Linear(spec.width, 8)
        self.up = nn.Linear(8, spec.width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def before_mlp(self, i, x, ctx):
        return x + self.up(torch.relu(self.down(x)))


ZERO_INIT = [n for n in BLOCK_NAMES if block_class(n).zero_init_identity] + ["_zero_adapter_test"]


@pytest.mark.parametrize("tower", ["tiny32", "timm"])
@pytest.mark.parametrize("block", ZERO_INIT)
def test_zero_init_blocks_reproduce_frame_mean_clip(block: str, tower: str, monkeypatch):
    if block == "_zero_adapter_test":  # proves the check itself on a known identity block
        monkeypatch.setitem(BLOCKS._items, block, _ZeroAdapter)
    model = make(block, tower, freeze="full").eval()
    ref = make("mean", tower, freeze="full").eval()
    ref.image_tower.load_state_dict(model.image_tower.state_dict())
    ref.text_tower.load_state_dict(model.text_tower.state_dict())
    video, ids, mask = inputs(model, b=3, t=4)
    with torch.no_grad():
        out, expected = model(video, ids, mask), ref(video, ids, mask)
    torch.testing.assert_close(out.video.embeds, expected.video.embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.text.embeds, expected.text.embeds, atol=1e-5, rtol=1e-5)


def test_mean_identical_frames_equal_image_embedding():
    model = make("mean").eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        video_emb = model.encode_video(images[:, None].expand(3, 5, 3, 32, 32)).embeds
        image_emb = model.encode_image(images)
    torch.testing.assert_close(video_emb, image_emb, atol=1e-5, rtol=1e-5)


def test_block_must_remove_appended_tokens():
    class Leaky(TemporalBlock):
        def embed(self, x, ctx):
            return torch.cat([x, x[:, :1]], dim=1)

    model = make("mean")
    with pytest.raises(RuntimeError, match="must remove the tokens"):
        model.image_tower(torch.randn(1, 2, 3, 32, 32), Leaky(model.block.spec))


EVA02 = {"image": "timm:eva02_tiny_patch14_224", "image_size": 28, "image_overrides": TINY_TIMM, "text": "text_tiny"}


@pytest.mark.parametrize("block", BLOCK_NAMES)
def test_blocks_refuse_what_they_cannot_run_on(block: str):
    """A block refuses a tower kind it does not support, and a rotary tower (EVA02) if it appends image tokens,
    with a ConfigError naming the block and the reason; every other block runs on the rotary tower."""
    cls, name = block_class(block), block_config(block)["block"]
    if not runs_on(block, "timm"):
        with pytest.raises(ConfigError, match=rf"temporal block '{name}' does not work on a timm image tower.*: \w"):
            make(block, "timm")
        return
    torch.manual_seed(0)
    cfg = ModelConfig(**block_config(block), **EVA02)
    spec = build_model(ModelConfig(block="mean", **EVA02)).block.spec
    if cls(spec, **block_config(block)["block_args"]).appends_image_tokens:
        with pytest.raises(ConfigError, match=rf"temporal block '{name}' appends tokens .* rotary"):
            build_model(cfg)
        return
    model = build_model(cfg).eval()
    video, ids, mask = inputs(model, b=2, t=3)
    with torch.no_grad():
        assert torch.isfinite(model(video, ids, mask).video.embeds).all()


def test_appending_is_refused_only_where_it_breaks():
    """ILA appends a token only with ``pooled_token_in_attention``; vpt without vision prompts appends nothing."""
    with pytest.raises(ConfigError, match="'ila' appends tokens"):
        build_model(ModelConfig(block="ila", block_args={"pooled_token_in_attention": True}, **EVA02))
    model = build_model(ModelConfig(block="vpt", block_args={"n_vision": 0}, **EVA02)).eval()
    video, ids, mask = inputs(model, b=1, t=2)
    with torch.no_grad():
        assert torch.isfinite(model(video, ids, mask).video.embeds).all()


def test_blocks_keep_no_tower_references():
    """Towers reach blocks at call time (``ctx.image_tower`` / ``ctx.text_tower``), never as hidden attributes."""
    for tower in ("tiny32", "timm"):
        for block in BLOCK_NAMES:
            if not runs_on(block, tower):
                continue
            model = make(block, tower)
            towers = (model.image_tower, model.text_tower)
            for obj in (model.block, *model.block.modules()):
                for name, value in vars(obj).items():
                    held = value if isinstance(value, (list, tuple)) else [value]
                    assert not any(v is t for v in held for t in towers), f"{block}.{name} holds a tower"
