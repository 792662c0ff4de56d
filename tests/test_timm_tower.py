"""timm ViTs as image towers: same outputs as timm with no-op hooks, hooks in order, weights from local files."""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

from vidlang.models.clip.configs import TextConfig  # noqa: E402
from vidlang.models.clip.text import TextTower  # noqa: E402
from vidlang.models.clip.timm_tower import TimmImageTower  # noqa: E402
from vidlang.models.contract import TemporalBlock, TowerSpec  # noqa: E402
from vidlang.models.factory import tower_spec  # noqa: E402
from vidlang.models.temporal import build_block  # noqa: E402
from vidlang.models.video_clip import VideoTextModel  # noqa: E402

# Tiny shapes of real timm architectures: plain ViT, CLIP (norm_pre), DINOv2 (LayerScale), EVA02 (RoPE, avg pool).
MODELS = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, depth=2, embed_dim=48, num_heads=3)),
    "clip": ("vit_base_patch16_clip_224", dict(img_size=32, depth=2, embed_dim=64, num_heads=4)),
    "dinov2": ("vit_small_patch14_dinov2", dict(img_size=28, depth=2, embed_dim=48, num_heads=3, init_values=0.5)),
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=28, depth=2, embed_dim=48, num_heads=3)),
}
SPEC = TowerSpec(width=48, layers=2, heads=3, embed_dim=16, grid=(2, 2))


class IdentityAllHooks(TemporalBlock):
    """Implements every image hook as the identity, so the tower takes its hooked code path."""

    def embed(self, x, ctx):
        return x

    def before_layer(self, i, x, ctx):
        return x

    def attn_input(self, i, h, ctx):
        return h

    def before_mlp(self, i, x, ctx):
        return x

    def after_layer(self, i, x, ctx):
        return x


class Recorder(IdentityAllHooks):
    def __init__(self, spec):
        super().__init__(spec)
        self.calls: list[tuple] = []

    def embed(self, x, ctx):
        self.calls.append(("embed", None, tuple(x.shape), ctx.batch, ctx.frames, ctx.grid))
        return x

    def before_layer(self, i, x, ctx):
        self.calls.append(("before_layer", i, tuple(x.shape)))
        return x

    def attn_input(self, i, h, ctx):
        self.calls.append(("attn_input", i, tuple(h.shape)))
        return h

    def before_mlp(self, i, x, ctx):
        self.calls.append(("before_mlp", i, tuple(x.shape)))
        return x

    def after_layer(self, i, x, ctx):
        self.calls.append(("after_layer", i, tuple(x.shape)))
        return x


class AppendTokens(TemporalBlock):
    """Appends 3 learnable tokens at embed and removes them after the last layer (prompt-style)."""

    def __init__(self, spec, width, layers):
        super().__init__(spec)
        self.tokens = torch.nn.Parameter(torch.randn(3, width))
        self.layers = layers

    def embed(self, x, ctx):
        return torch.cat([x, self.tokens.expand(x.shape[0], -1, -1)], dim=1)

    def after_layer(self, i, x, ctx):
        return x[:, :-3] if i == self.layers - 1 else x


def _tower(key: str, **extra) -> TimmImageTower:
    name, kwargs = MODELS[key]
    torch.manual_seed(0)
    return TimmImageTower(name, proj_dim=16, **kwargs, **extra).eval()


def _video(tower: TimmImageTower, b: int = 2, t: int = 3) -> torch.Tensor:
    s = tower.cfg.image_size
    return torch.randn(b, t, 3, s, s, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("key", list(MODELS))
@pytest.mark.parametrize("block_cls", [None, IdentityAllHooks])
def test_noop_hooks_equal_timm_forward_features(key, block_cls):
    tower = _tower(key)
    video = _video(tower)
    block = block_cls(SPEC) if block_cls else None
    with torch.no_grad():
        out = tower(video, block)
        ref = tower.trunk.forward_features(video.flatten(0, 1))  # [B*T, 1+N, C]
        ref_embeds = tower.trunk.forward_head(ref, pre_logits=True) @ tower.proj
    n = 1 + tower.grid[0] * tower.grid[1]
    assert out.frame_tokens.shape == (2, 3, n, tower.width) and out.frame_embeds.shape == (2, 3, 16)
    assert torch.allclose(out.frame_tokens.flatten(0, 1), ref, atol=1e-6)
    assert torch.allclose(out.frame_embeds.flatten(0, 1), ref_embeds, atol=1e-6)


def test_hooks_called_in_order_with_context():
    tower = _tower("dinov2")
    rec = Recorder(SPEC)
    with torch.no_grad():
        tower(_video(tower, b=2, t=4), rec)
    shape = (8, 5, 48)
    assert rec.calls[0] == ("embed", None, shape, 2, 4, (2, 2))
    per_layer = [(h, i, shape) for i in range(2) for h in ("before_layer", "attn_input", "before_mlp", "after_layer")]
    assert rec.calls[1:] == per_layer


@pytest.mark.parametrize("key", ["vit", "dinov2"])
def test_hooks_change_the_output(key):
    """``attn_input`` and ``before_mlp`` are really applied inside the layer (not no-ops of the runner)."""

    class Scale(TemporalBlock):
        def __init__(self, spec, hook):
            super().__init__(spec)
            self.hook = hook

        def attn_input(self, i, h, ctx):
            return 2 * h if self.hook == "attn_input" else h

        def before_mlp(self, i, x, ctx):
            return 2 * x if self.hook == "before_mlp" else x

    tower = _tower(key)
    video = _video(tower)
    with torch.no_grad():
        base = tower(video).frame_embeds
        a = tower(video, Scale(SPEC, "attn_input")).frame_embeds
        m = tower(video, Scale(SPEC, "before_mlp")).frame_embeds
    assert not torch.allclose(a, base) and not torch.allclose(m, base) and not torch.allclose(a, m)


def test_appended_tokens_train_and_checkpointing_matches():
    tower = _tower("clip").train()
    block = AppendTokens(SPEC, width=64, layers=2)
    video = _video(tower)
    out = tower(video, block)
    out.frame_embeds.square().sum().backward()
    assert block.tokens.grad is not None and block.tokens.grad.abs().sum() > 0
    assert tower.proj.grad is not None and tower.trunk.patch_embed.proj.weight.grad is not None
    grads = {n: p.grad.clone() for n, p in tower.named_parameters()}
    tower.zero_grad()
    tower.set_gradient_checkpointing(True)
    out2 = tower(video, block)
    out2.frame_embeds.square().sum().backward()
    assert torch.allclose(out.frame_embeds, out2.frame_embeds, atol=1e-6)
    for n, p in tower.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-5), n


def test_block_that_leaves_extra_tokens_is_an_error():
    class Leaky(AppendTokens):
        def after_layer(self, i, x, ctx):
            return x

    tower = _tower("vit")
    with pytest.raises(RuntimeError, match="must remove the tokens"):
        tower(_video(tower), Leaky(SPEC, width=48, layers=2))


def test_weights_from_local_file(tmp_path):
    from safetensors.torch import save_file

    src = _tower("vit")
    save_file({k: v.contiguous() for k, v in src.trunk.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    torch.manual_seed(123)  # a different random init, then overwritten by the file
    name, kwargs = MODELS["vit"]
    dst = TimmImageTower(name, proj_dim=16, weights=tmp_path / "vit.safetensors", **kwargs).eval()
    video = _video(src)
    with torch.no_grad():
        assert torch.equal(dst(video).frame_tokens, src(video).frame_tokens)
    bad = {k: v for k, v in src.trunk.state_dict().items() if "blocks.1." not in k}
    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        TimmImageTower(name, proj_dim=16, weights=tmp_path / "bad.safetensors", **kwargs)


def test_timm_head_as_projection():
    name, kwargs = MODELS["clip"]
    tower = TimmImageTower(name, num_classes=16, **kwargs).eval()
    assert tower.proj is None and tower.embed_dim == 16
    video = _video(tower)
    with torch.no_grad():
        assert torch.allclose(tower(video).frame_embeds.flatten(0, 1), tower.trunk(video.flatten(0, 1)), atol=1e-6)


def test_register_tokens_rejected():
    with pytest.raises(ValueError, match="register tokens"):
        TimmImageTower("vit_small_patch14_reg4_dinov2", proj_dim=16, img_size=28, depth=1)


def test_in_video_text_model_with_mean_block():
    tower = _tower("vit")
    tcfg = TextConfig(width=32, layers=1, heads=2, context_length=8, vocab_size=40, embed_dim=16)
    block = build_block("mean", tower_spec(tower.cfg, tcfg))
    model = VideoTextModel(tower, TextTower(tcfg), block).eval()
    frames = _video(tower, b=2, t=1)
    video = frames.expand(-1, 4, -1, -1, -1)  # identical frames
    with torch.no_grad():
        v = model.encode_video(video).embeds
        img = model.encode_image(frames[:, 0])
    assert v.shape == (2, 16) and torch.allclose(v, img, atol=1e-6)


def test_model_config_builds_timm_towers(tmp_path):
    """``ModelConfig.image = "timm:<name>"`` builds the tower (issue 13 item 4); weights come from a local file."""
    from safetensors.torch import save_file

    from vidlang.errors import ConfigError
    from vidlang.models.factory import ModelConfig, build_model

    name, kwargs = MODELS["vit"]
    src = _tower("vit")
    save_file({k: v.contiguous() for k, v in src.trunk.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    overrides = {k: v for k, v in kwargs.items() if k != "img_size"} | {"weights": str(tmp_path / "vit.safetensors")}
    cfg = ModelConfig(image=f"timm:{name}", image_size=32, image_overrides=overrides, text="text_tiny", block="ted")
    model = build_model(cfg).eval()
    assert isinstance(model.image_tower, TimmImageTower) and model.image_tower.kind == "timm"
    assert model.embed_dim == 32 and model.block.spec.image_kind == "timm" and model.freeze_policy == "block_only"
    assert torch.equal(model.image_tower.trunk.blocks[1].mlp.fc1.weight, src.trunk.blocks[1].mlp.fc1.weight)
    video = _video(src)
    with torch.no_grad():
        assert model.encode_video(video).embeds.shape == (2, 32)
    with pytest.raises(ValueError, match="no default text tower for image 'timm:"):
        build_model(ModelConfig(image=f"timm:{name}", image_overrides=overrides))
    with pytest.raises(ConfigError, match="image_overrides: {weights: FILE}"):
        build_model(ModelConfig(image=f"timm:{name}", text="text_tiny", pretrained=str(tmp_path / "vit.safetensors")))
