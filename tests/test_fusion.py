"""Audio-visual fusion: identity at init, masked audio ignored exactly, and the AudioVisualModel wrapper."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vidlang.models.audio import AudioConfig, LogMelFrontend, build_audio_branch
from vidlang.models.factory import ModelConfig, build_model
from vidlang.models.fusion import FUSIONS, AudioVisualModel, build_fusion

E, D = 32, 16


def inputs(b: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(b, E, generator=g)
    audio = torch.randn(b, 8, D, generator=g)
    mask = torch.tensor([True, False] * (b // 2))
    return video, audio, mask


def perturb_(module: torch.nn.Module) -> None:
    """Move every parameter away from its (zero) init so the fusion really mixes audio in."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))


@pytest.mark.parametrize("name", [n for n in FUSIONS.names() if n != "symile"])  # symile: the test below
def test_identity_at_init_and_masked_rows_exact(name: str):
    torch.manual_seed(0)
    fusion = build_fusion(name, E, D)
    video, audio, mask = inputs()
    torch.testing.assert_close(fusion(video, audio, mask), video, atol=0, rtol=0)
    perturb_(fusion)
    audio_nan = audio.clone()
    audio_nan[~mask] = float("nan")  # the rows without audio are never read
    out = fusion(video, audio_nan, mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[~mask], video[~mask])
    if name != "none":
        assert not torch.allclose(out[mask], video[mask])


def test_symile_masked_rows_are_the_normalised_video_and_never_read_the_audio():
    """``symile`` is not the identity (it gives Symile's video-side vector ``sqrt(E) v * u``); a row without audio
    is the normalised video embedding, whatever its audio tokens hold."""
    torch.manual_seed(0)
    fusion = build_fusion("symile", E, D)
    video, audio, mask = inputs()
    audio_nan = audio.clone()
    audio_nan[~mask] = float("nan")
    out = fusion(video, audio_nan, mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[~mask], torch.nn.functional.normalize(video[~mask], dim=-1))
    assert not torch.allclose(out[mask], torch.nn.functional.normalize(video[mask], dim=-1), atol=1e-3)


@pytest.mark.parametrize("name", [n for n in FUSIONS.names() if n != "none"])
def test_fusion_parameters_learn(name: str):
    torch.manual_seed(0)
    fusion = build_fusion(name, E, D)
    video, audio, mask = inputs()
    opt = torch.optim.AdamW(fusion.parameters(), lr=1e-2)
    for _ in range(2):  # zero-initialised gates / outputs get gradients first, the rest on the next step
        opt.zero_grad()
        fusion(video, audio, torch.ones(4, dtype=torch.bool)).square().sum().backward()
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fusion.parameters())


def tiny_av(fusion: str, freeze_video: bool = True) -> AudioVisualModel:
    torch.manual_seed(0)
    video_model = build_model(ModelConfig(image="vit_tiny", block="mean"))
    audio = build_audio_branch(
        AudioConfig(backbone_args={"width": 16, "layers": 1, "heads": 2, "num_mel_bins": 32, "frames": 40},
                    num_queries=4, qformer_layers=1, qformer_heads=2)
    )  # fmt: skip
    return AudioVisualModel(video_model, audio, fusion=fusion, freeze_video=freeze_video)


def test_no_audio_path_end_to_end_equals_video_only():
    model = tiny_av("cross_attention").eval()
    perturb_(model.fusion)
    frontend = LogMelFrontend(num_mel_bins=32, target_frames=40)
    mel, mask = frontend([None, torch.randn(16000) * 0.1, None])
    video = torch.randn(3, 4, 3, 32, 32)
    with torch.no_grad():
        fused = model.encode_video(video, mel, mask).embeds
        video_only = model.video_model.encode_video(video).embeds
        no_audio_at_all = model.encode_video(video).embeds
    assert torch.isfinite(fused).all()
    assert torch.equal(fused[[0, 2]], video_only[[0, 2]])
    assert not torch.allclose(fused[1], video_only[1])
    assert torch.equal(no_audio_at_all, video_only)
    ids = torch.randint(1, 100, (3, 6))
    out = model(video, ids, torch.ones(3, 6, dtype=torch.long), mel, mask)
    assert out.video.embeds.shape == (3, model.embed_dim) and out.text.embeds.shape == (3, model.embed_dim)
    with pytest.raises(ValueError, match="audio batch 2 != video batch 3"):
        model.encode_video(video, mel[:2], mask[:2])


@pytest.mark.parametrize("name", ["gated_sum", "cross_attention"])
def test_fusion_learns_to_separate_videos_that_only_differ_in_sound(name: str):
    """Four identical videos, four different sounds, four captions: video-only retrieval is at chance
    (all similarities tie), the trained fusion retrieves every caption's video."""
    model = tiny_av(name).train()
    assert all(not p.requires_grad for p in model.video_model.parameters())
    g = torch.Generator().manual_seed(3)
    video = torch.randn(1, 2, 3, 32, 32, generator=g).expand(4, -1, -1, -1, -1)
    mel = torch.randn(4, 8, 1, 32, 40, generator=g)
    mask = torch.ones(4, dtype=torch.bool)
    text = F.normalize(torch.randn(4, model.embed_dim, generator=g), dim=-1)  # fixed caption embeddings
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(25):
        v = F.normalize(model.encode_video(video, mel, mask).embeds, dim=-1)
        loss = F.cross_entropy(20 * text @ v.T, torch.arange(4))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        v = F.normalize(model.encode_video(video, mel, mask).embeds, dim=-1)
        base = F.normalize(model.video_model.encode_video(video).embeds, dim=-1)
    assert torch.equal((text @ v.T).argmax(dim=1), torch.arange(4))
    sims = text @ base.T
    assert torch.allclose(sims, sims[:, :1].expand(-1, 4), atol=1e-5)  # without audio: all four tie
