"""Audio path: log-mel against hand computations, segmenting, the no-audio path, encoders, AST loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vidlang.models.audio import AUDIO_BACKBONES, AudioBranch, AudioConfig, LogMelFrontend, build_audio_branch
from vidlang.models.audio.frontend import KALDI_EPS, kaldi_mel, mel_filterbank

SR = 16000


def sine(freq: float, seconds: float, amp: float = 0.5) -> torch.Tensor:
    t = torch.arange(int(seconds * SR), dtype=torch.float64) / SR
    return (amp * torch.sin(2 * np.pi * freq * t)).float()


def noise(seconds: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(int(seconds * SR), generator=g) + 0.05  # with a DC offset


def test_filterbank_matches_transformers_kaldi_filters():
    from transformers.audio_utils import mel_filter_bank

    ref = mel_filter_bank(257, 128, 20.0, 8000.0, SR, norm=None, mel_scale="kaldi", triangularize_in_mel_space=True)
    ours = mel_filterbank(128, 512, SR, 20.0)
    assert ours.shape == (257, 128)
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-6)


def test_sine_peaks_in_the_mel_bin_of_its_frequency():
    fe = LogMelFrontend(num_segments=1, mean=0.0, std=1.0)
    edges = torch.linspace(float(kaldi_mel(20.0)), float(kaldi_mel(8000.0)), 130, dtype=torch.float64)
    for freq in (312.5, 1000.0, 2500.0, 5000.0):  # on FFT bins (31.25 Hz apart; low filters are narrower)
        peaks = fe.log_mel(sine(freq, 1.0)).argmax(dim=0)  # [frames]
        assert peaks.unique().numel() == 1, freq
        peak, m = int(peaks[0]), float(kaldi_mel(freq))
        assert edges[peak] < m < edges[peak + 2], (freq, peak)  # the peak filter's support contains f
        if freq >= 1000:  # filters wider than the FFT bin spacing: the filter centred nearest to f wins
            assert peak == int(torch.argmin((edges[1:-1] - m).abs())), (freq, peak)


def test_one_frame_equals_direct_dft_power_times_filterbank():
    from transformers.audio_utils import mel_filter_bank

    x = noise(0.5).double().numpy()
    k = 7  # frame index
    frame = x[160 * k : 160 * k + 400].copy()
    frame -= frame.mean()  # Kaldi: remove DC per frame
    frame = np.concatenate([[frame[0] * 0.03], frame[1:] - 0.97 * frame[:-1]])  # pre-emphasis
    frame *= 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 399)  # symmetric Hann
    padded = np.concatenate([frame, np.zeros(112)])
    n = np.arange(512)
    dft = np.exp(-2j * np.pi * np.outer(np.arange(257), n) / 512) @ padded  # direct DFT, bins 0..256
    fb = mel_filter_bank(257, 128, 20.0, 8000.0, SR, norm=None, mel_scale="kaldi", triangularize_in_mel_space=True)
    expected = np.log(np.maximum(np.abs(dft) ** 2 @ fb, KALDI_EPS))
    ours = LogMelFrontend(mean=0.0, std=1.0).log_mel(torch.from_numpy(x).float())[:, k]
    np.testing.assert_allclose(ours.numpy(), expected, atol=2e-3, rtol=1e-4)


def test_matches_ast_feature_extractor_kaldi_fbank():
    from transformers import ASTFeatureExtractor

    x = (sine(440.0, 2.0) + noise(2.0)).numpy()
    ref = ASTFeatureExtractor(num_mel_bins=128, max_length=198, do_normalize=False)._extract_fbank_features(x, 198)
    ours = LogMelFrontend(mean=0.0, std=1.0).log_mel(torch.from_numpy(x))  # [128, 198]
    assert ours.shape == (128, 198)
    assert np.abs(ours.T.numpy() - ref).max() < 1e-3


def test_batch_shapes_segments_padding_and_no_audio():
    fe = LogMelFrontend()
    assert fe.frames_per_segment == 198
    waves = [noise(5.0), None, noise(0.5, seed=1), torch.zeros(0)]
    mel, mask = fe(waves)
    assert mel.shape == (4, 8, 1, 128, 204) and mel.dtype == torch.float32
    assert mask.tolist() == [True, False, True, False]
    assert torch.isfinite(mel).all()
    assert mel[1].eq(0).all() and mel[3].eq(0).all()  # defined "no audio" input, masked
    pad = (0.0 - fe.mean) / fe.std  # a log-mel of 0 after normalising
    assert torch.allclose(mel[0, :, :, :, 198:], torch.full_like(mel[0, :, :, :, 198:], pad))
    assert fe.segment_starts(5 * SR) == [round(s) for s in np.linspace(0, 3 * SR, 8)]
    seg3 = fe.log_mel(waves[0][fe.segment_starts(5 * SR)[3] :][: 2 * SR])
    torch.testing.assert_close(mel[0, 3, 0, :, :198], (seg3 - fe.mean) / fe.std)
    # a clip shorter than one segment: every segment is the whole clip, padded after its 48 frames
    assert fe.segment_starts(SR // 2) == [0] * 8
    assert torch.equal(mel[2, 0], mel[2, 7])
    assert torch.allclose(mel[2, 0, 0, :, 48:], torch.full((128, 156), pad))
    assert not torch.allclose(mel[2, 0, 0, :, 47], torch.full((128,), pad))


def test_normalisation_is_configurable_and_input_checked():
    x = noise(2.0)
    raw, _ = LogMelFrontend(mean=0.0, std=1.0)([x])
    norm, _ = LogMelFrontend(mean=-4.0, std=2.0)([x])
    torch.testing.assert_close(norm, (raw + 4.0) / 2.0)
    stereo, _ = LogMelFrontend()([torch.stack([x, x])])
    mono, _ = LogMelFrontend()([x])
    torch.testing.assert_close(stereo, mono)
    fe = LogMelFrontend()
    with pytest.raises(TypeError, match="audio 0: expected a float waveform"):
        fe([torch.zeros(100, dtype=torch.int16)])
    with pytest.raises(ValueError, match="audio 1: .*NaN"):
        fe([x, torch.full((100,), float("nan"))])
    with pytest.raises(ValueError, match="shape"):
        fe([torch.zeros(1, 2, 100)])


def test_from_collated_batch_matches_list_call():
    fe = LogMelFrontend(num_segments=2)
    a, b = noise(3.0), noise(1.0, seed=2)
    audio = torch.zeros(3, a.numel())
    audio[0], audio[2, : b.numel()] = a, b
    mel, mask = fe.from_batch(audio, torch.tensor([a.numel(), 0, b.numel()]), torch.tensor([True, False, True]))
    ref, ref_mask = fe([a, None, b])
    torch.testing.assert_close(mel, ref)
    assert torch.equal(mask, ref_mask)


def tiny_branch(seed: int = 0) -> AudioBranch:
    torch.manual_seed(seed)
    cfg = AudioConfig(
        backbone_args={"width": 32, "layers": 1, "heads": 4, "num_mel_bins": 32, "frames": 40},
        num_queries=8,
        qformer_layers=2,
        qformer_heads=4,
    )
    return build_audio_branch(cfg)


def test_audio_branch_shapes_mask_and_gradients():
    branch = tiny_branch().train()
    mel = torch.randn(3, 8, 1, 32, 40)
    mask = torch.tensor([True, False, True])
    out = branch(mel, mask)
    assert out.tokens.shape == (3, 8, 32) and out.segment_embeds.shape == (3, 8, 32)
    assert out.tokens[1].eq(0).all() and torch.isfinite(out.tokens).all()
    out.tokens.square().mean().backward()
    missing = [n for n, p in branch.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    branch.eval()
    with torch.no_grad():  # rows are independent of the masked row's content and of batch mates
        alone = branch(mel[2:3]).tokens
        other = branch(mel.index_fill(0, torch.tensor([1]), 7.0), mask).tokens
    torch.testing.assert_close(other[2:3], alone, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        none = branch(mel, torch.zeros(3, dtype=torch.bool))
    assert none.tokens.eq(0).all() and not none.mask.any()
    with pytest.raises(ValueError, match="S<=8"):
        branch(torch.randn(1, 9, 1, 32, 40))


def test_spectrogram_vit_rejects_wrong_size():
    vit = AUDIO_BACKBONES.build("vit", width=16, layers=1, heads=2, num_mel_bins=32, frames=40)
    assert vit(torch.randn(2, 1, 32, 40)).shape == (2, 16)
    with pytest.raises(ValueError, match="expects mel"):
        vit(torch.randn(2, 1, 32, 50))


def test_ast_backbone_loads_from_a_local_directory(tmp_path):
    from transformers import ASTConfig, ASTModel

    torch.manual_seed(0)
    cfg = ASTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, max_length=100,
        num_mel_bins=128,
    )  # fmt: skip
    ASTModel(cfg).save_pretrained(tmp_path)
    backbone = AUDIO_BACKBONES.build("ast", path=str(tmp_path)).eval()
    assert backbone.width == 32
    ref = ASTModel.from_pretrained(tmp_path, local_files_only=True).eval()
    mel = torch.randn(2, 1, 128, 204)  # longer than max_length: cropped to 100 frames
    with torch.no_grad():
        torch.testing.assert_close(backbone(mel), ref(input_values=mel[:, 0].transpose(1, 2)[:, :100]).pooler_output)
        short = backbone(mel[..., :60])  # shorter: padded with the normalised zero log-mel
        padded = torch.cat([mel[:, 0, :, :60].transpose(1, 2), torch.full((2, 40, 128), backbone.pad_value)], 1)
        torch.testing.assert_close(short, ref(input_values=padded).pooler_output)
    branch = build_audio_branch(AudioConfig(backbone="ast", backbone_args={"path": str(tmp_path)},
                                            qformer_heads=4, freeze_backbone=True))  # fmt: skip
    out = branch(torch.randn(2, 8, 1, 128, 204), torch.tensor([True, True]))
    assert out.tokens.shape == (2, 8, 32)
    assert not any(p.requires_grad for p in branch.backbone.parameters())
    with pytest.raises(FileNotFoundError, match="local directory"):
        AUDIO_BACKBONES.build("ast", path=str(tmp_path / "missing"))
