"""Issue 19: the restructured hot spots compute what they computed before (old code kept here as reference)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vidlang.models.clip.layers import QuickGELU, ResidualAttentionLayer
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
