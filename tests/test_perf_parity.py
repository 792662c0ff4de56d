"""Issue 19: the restructured hot spots compute what they computed before (old code kept here as reference)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from vidlang.models.clip.layers import QuickGELU, ResidualAttentionLayer
from vidlang.models.factory import ModelConfig, build_model
from vidlang.models.temporal.frozen import FrozenInTime, time_attention, video_cls_attention
from vidlang.models.temporal.ila import ILALayer, roles_to_frames


def reference_ila_forward(layer: ILALayer, x, b, t, grid, training):
    """ILALayer.forward before issue 19 ([B, T, C, h, w] maps, transposed copies)."""
    h, w = grid
    c = x.shape[-1]
    m = layer.message_ln(layer.message_fc(x)).view(b, t, 1 + h * w, c)
    cls, maps = m[:, :, :1], m[:, :, 1:].transpose(-1, -2).reshape(b, t, c, h, w)
    pairs = torch.cat([maps[:, :-1], maps[:, 1:]], dim=2).flatten(0, 1)
    g = layer.interact(pairs)
    pts = layer.points(g, b)
    mask_prev = layer.masks(pts[..., :2], grid, training).unsqueeze(2)
    mask_cur = layer.masks(pts[..., 2:], grid, training).unsqueeze(2)
    al_prev, al_cur = mask_prev * maps[:, :-1], mask_cur * maps[:, 1:]
    z_prev, z_cur = al_prev.sum((-2, -1)), al_cur.sum((-2, -1))
    loss = (1 - F.cosine_similarity(z_prev, z_cur, dim=-1)).mean()
    aligned = roles_to_frames(al_prev, al_cur).flatten(3).transpose(-1, -2)
    aligned = torch.cat([cls, aligned], dim=2)
    half = g.shape[1] // 2
    g = g.view(b, t - 1, *g.shape[1:])
    feats = roles_to_frames(g[:, :, :half], g[:, :, half:])
    feats = layer.time_conv(feats.transpose(1, 2)).transpose(1, 2)
    feats = layer.feature_fc(feats.flatten(3).transpose(-1, -2))
    feats = torch.cat([cls, feats], dim=2)
    update = layer.align_fc(aligned) + layer.skip_fc(feats)
    pooled = roles_to_frames(z_prev, z_cur)
    return update.reshape(b * t, 1 + h * w, c), loss, pooled


def _randomise(module: torch.nn.Module) -> None:
    """Non-zero weights everywhere (the zero-initialised projections and point head would hide differences)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("interaction", ["dwsep", "conv"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("grid", [(3, 3), (2, 5)])
def test_ila_layer_matches_reference(interaction, training, grid):
    torch.manual_seed(0)
    b, t, c = 2, 4, 16
    layer = ILALayer(c, hidden=8, interaction=interaction)
    _randomise(layer)
    layer.train(training)
    ref = ILALayer(c, hidden=8, interaction=interaction)
    ref.load_state_dict(layer.state_dict())
    ref.train(training)
    x = torch.randn(b * t, 1 + grid[0] * grid[1], c)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    new = layer(x1, b, t, grid, training)
    old = reference_ila_forward(ref, x2, b, t, grid, training)
    for a, e in zip(new, old, strict=True):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
    weights = [torch.randn_like(o) for o in old]
    sum((o * wt).sum() for o, wt in zip(new, weights, strict=True)).backward()
    sum((o * wt).sum() for o, wt in zip(old, weights, strict=True)).backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-4)
    for (name, p), q in zip(layer.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)
    if training:  # BatchNorm running statistics updated alike
        for a, e in zip(layer.buffers(), ref.buffers(), strict=True):
            torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-5)


def test_quick_gelu_inference_path_is_the_autograd_path():
    x = torch.randn(4, 7, 33)
    with torch.no_grad():
        fast = QuickGELU()(x)
    slow = QuickGELU()(x.clone().requires_grad_())
    assert torch.equal(fast, slow.detach())
    assert torch.equal(fast, x * torch.sigmoid(1.702 * x))


@pytest.mark.parametrize("grad", [True, False])
def test_residual_layer_in_place_adds_are_exact(grad):
    """The layer writes its residual sums into the fresh Linear outputs: same bits as ``x + f(x)``, same grads."""
    torch.manual_seed(0)
    layer = ResidualAttentionLayer(32, 4)
    x = torch.randn(3, 5, 32, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        out = layer(x)
        h = x + layer.attn(layer.ln_1(x))
        ref = h + layer.mlp(layer.ln_2(h))
    assert torch.equal(out, ref)
    if grad:
        (gx,) = torch.autograd.grad(out.square().sum(), x)
        (rx,) = torch.autograd.grad(ref.square().sum(), x)
        torch.testing.assert_close(gx, rx, atol=1e-6, rtol=1e-6)


def test_model_config_compile_compiles_layers_in_place():
    """``compile: true`` wraps the towers' layers and the block's modules (nn.Module.compile); names unchanged.
    Nothing is run here (compilation takes minutes on a CPU); ``vidlang bench model --compile`` measures it."""
    from vidlang.models.factory import ModelConfig, build_model

    plain = build_model(ModelConfig(image="vit_tiny", block="ila"))
    compiled = build_model(ModelConfig(image="vit_tiny", block="ila", compile=True))
    assert list(plain.state_dict()) == list(compiled.state_dict())
    assert all(layer._compiled_call_impl is not None for layer in compiled.image_tower.layers)
    assert all(layer._compiled_call_impl is not None for layer in compiled.text_tower.layers)
    assert all(m._compiled_call_impl is not None for m in compiled.block.layers)
    assert all(layer._compiled_call_impl is None for layer in plain.image_tower.layers)


@pytest.mark.gpu
def test_tower_bf16_autocast_and_fused_attention_on_gpu():
    """On a CUDA device: the B/16 tower under bf16 autocast stays within bf16 tolerance of fp32, and attention runs
    through a fused SDPA kernel (flash or memory-efficient) with the same result as the math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vidlang.models.clip.configs import image_config
    from vidlang.models.clip.image import ClipImageTower

    torch.manual_seed(0)
    tower = ClipImageTower(image_config("vit_b16")).cuda().eval()
    video = torch.randn(2, 4, 3, 224, 224, device="cuda")
    with torch.inference_mode():
        ref = F.normalize(tower(video).frame_embeds, dim=-1)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                fused = F.normalize(tower(video).frame_embeds.float(), dim=-1)
            with sdpa_kernel([SDPBackend.MATH]):
                math = F.normalize(tower(video).frame_embeds.float(), dim=-1)
    assert (fused - ref).abs().max().item() < 5e-2
    assert (fused - math).abs().max().item() < 2e-2


# -- frozen (Frozen in Time): the per-frame-layout hooks against the video-sequence hooks before issue 19 ----------
class _ReferenceFrozen(FrozenInTime):
    """``FrozenInTime`` with its hooks as they were before issue 19 (the video sequence built twice per layer)."""

    def attn_input(self, i, h, ctx):
        b, t = ctx.batch, ctx.frames
        x = self._state(ctx)[i]
        c = x.shape[-1]
        frames = x.view(b, t, -1, c)
        cls = frames[:, :, 0].mean(1)
        seq = torch.cat([cls[:, None], frames[:, :, 1:].flatten(1, 2)], dim=1)
        t_cls, t_patches = time_attention(self.time_attn[i], self.time_norm[i](seq), t)
        cls_in = (cls + t_cls)[:, None, None].expand(b, t, 1, c)
        mixed = torch.cat([cls_in, frames[:, :, 1:] + t_patches], dim=2).flatten(0, 1)
        h = ctx.image_tower.layer_list()[i].ln_1(mixed)
        self._state(ctx)[("h", i)] = h
        return h

    def before_mlp(self, i, x, ctx):
        b, t = ctx.batch, ctx.frames
        state = self._state(ctx)
        x_in, h = state.pop(i), state.pop(("h", i))
        if t == 1:
            return x
        c = x.shape[-1]
        h = h.view(b, t, -1, c)
        cls_h = h[:, :, 0].mean(1)
        seq = torch.cat([cls_h[:, None], h[:, :, 1:].flatten(1, 2)], dim=1)
        attn = ctx.image_tower.layer_list()[i].attn
        cls = x_in.view(b, t, -1, c)[:, :, 0].mean(1) + video_cls_attention(attn, cls_h, seq)
        cls = cls.repeat_interleave(t, dim=0)[:, None]
        return torch.cat([cls, x[:, 1:]], dim=1)


def _frozen_pair(time_init: str):
    torch.manual_seed(0)
    model = build_model(ModelConfig(block="frozen", image="vit_tiny", block_args={"max_frames": 8,
                                                                                  "time_init": time_init}))
    with torch.no_grad():  # a trained-looking temporal embedding (released init: zeros)
        model.block.temporal_embedding.normal_(0, 0.1)
    ref = copy.deepcopy(model)
    ref.block.__class__ = _ReferenceFrozen
    return model, ref


@pytest.mark.parametrize("time_init", ["rand", "zeros"])
@pytest.mark.parametrize("t", [1, 3, 4])
def test_frozen_per_frame_hooks_match_the_video_sequence_hooks(t, time_init):
    model, ref = _frozen_pair(time_init)
    size = model.image_tower.cfg.image_size
    video = torch.randn(2, t, 3, size, size, generator=torch.Generator().manual_seed(1))
    grads = []
    for m in (model, ref):
        v = video.clone().requires_grad_(True)
        out = m.encode_video(v)
        (out.embeds.square().sum() + out.frame_embeds.sin().sum()).backward()
        grads.append((out.embeds.detach(), v.grad, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (e_new, v_new, p_new), (e_ref, v_ref, p_ref) = grads
    assert p_new.keys() == p_ref.keys() and any(n.startswith("block.time_attn") for n in p_new)
    # fp32 rounding (sums in another order), relative to each tensor's scale (at least 1: at the zero init some
    # gradients are 0 up to rounding, ~1e-7): ~3e-7 measured
    for name, new, ref in [("embeds", e_new, e_ref), ("video grad", v_new, v_ref)] + [
        (n, p_new[n], p_ref[n]) for n in p_ref
    ]:
        err = (new - ref).abs().max().item() / max(ref.abs().max().item(), 1.0)
        assert err < 2e-6, f"{name}: relative error {err:.2e}"


def test_frozen_copies_log_weights_count_the_cls_once():
    from vidlang.models.temporal.frozen import copies_log_weights

    w = copies_log_weights(4, 3, torch.zeros(()))
    assert torch.allclose(w.view(4, 3)[:, 0].exp().sum(), torch.tensor(1.0)) and (w.view(4, 3)[:, 1:] == 0).all()
