"""Waveform -> normalised log-mel segments (ImageBind / Video-LLaMA audio input), without torchaudio.

Pipeline per clip (16 kHz mono float waveform ``[S]`` in [-1, 1]):

1. ``num_segments`` (8) evenly spread windows of ``segment_seconds`` (2 s): starts at
   ``linspace(0, S - L, num_segments)`` samples (L = segment length), so for clips shorter than
   ``num_segments * 2 s`` the segments overlap. A clip shorter than one segment gives the whole clip
   as every segment (its log-mel then has fewer frames and is padded, step 4).
2. Kaldi-style filterbank features (what AST / ImageBind compute with ``torchaudio.compliance.kaldi.fbank``
   with ``window_type="hanning"``, ``htk_compat=True``, ``dither=0``): 25 ms frames (400 samples), 10 ms hop
   (160), frames taken without centre padding (``snip_edges``: ``1 + (L - 400) // 160`` frames, 198 for 2 s),
   per-frame DC removal, pre-emphasis 0.97, symmetric Hann window, zero-padded FFT of 512, power spectrum,
   128 triangular mel filters on the Kaldi/HTK mel scale ``1127 ln(1 + f / 700)`` with triangles linear in
   mel (20 Hz .. Nyquist), natural log with a floor of float32 epsilon.
   The power spectrum comes from ``torch.stft`` over the pre-emphasised signal with the 400-sample Hann
   window zero-padded to 512; per-frame DC removal is folded in exactly by subtracting
   ``(1 - preemph) * frame_mean * FFT(window)`` (the Hann window is 0 at its first sample, so the
   per-frame pre-emphasis of Kaldi and a signal-level one agree). Differences from Kaldi: no dither
   (ImageBind uses 0 too), no energy term, no ``round_to_power_of_two`` option other than the fixed 512.
3. Normalise ``(x - mean) / std`` with ImageBind's constants (mean -4.268, std 9.138; AST uses the same
   numbers as ``std / 2``). Configurable.
4. Pad with 0 (log domain, before normalising, as AST / ImageBind do) or crop to ``target_frames`` (204).

Output layout ``[S_seg, 1, num_mel_bins, target_frames]`` (mel bins as image rows, time as columns).
No audio (``None`` or an empty waveform) gives an all-zero input and ``mask = False``; downstream modules
must ignore such samples through the mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

KALDI_EPS = float(np.finfo(np.float32).eps)  # 1.1920929e-07, Kaldi's log floor


def kaldi_mel(freq: Tensor | float) -> Tensor:
    """Kaldi / HTK mel scale: ``1127 ln(1 + f / 700)``."""
    return 1127.0 * torch.log1p(torch.as_tensor(freq, dtype=torch.float64, device="cpu") / 700.0)


def mel_filterbank(
    num_bins: int, n_fft: int, sample_rate: int, low_freq: float = 20.0, high_freq: float | None = None
) -> Tensor:
    """Triangular filters linear on the Kaldi mel scale -> ``[n_fft // 2 + 1, num_bins]`` (float32).

    Filter ``k`` rises from mel edge ``k`` to ``k + 1`` and falls to ``k + 2``; edges are ``num_bins + 2``
    points evenly spaced in mel between ``low_freq`` and ``high_freq`` (default Nyquist). No area
    normalisation (as Kaldi / HTK).
    """
    nyquist = sample_rate / 2
    high_freq = nyquist if high_freq is None else high_freq
    if not 0 <= low_freq < high_freq <= nyquist:
        raise ValueError(f"mel filterbank needs 0 <= low_freq < high_freq <= {nyquist}, got {low_freq}, {high_freq}")
    # a constant table: always computed on the CPU (also when modules are built under a meta/cuda device context)
    lo, hi = float(kaldi_mel(low_freq)), float(kaldi_mel(high_freq))
    edges = torch.linspace(lo, hi, num_bins + 2, dtype=torch.float64, device="cpu")
    left, center, right = edges[:-2], edges[1:-1], edges[2:]  # [M] each
    mel = kaldi_mel(torch.arange(n_fft // 2 + 1, dtype=torch.float64, device="cpu") * sample_rate / n_fft)[:, None]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    return torch.clamp(torch.minimum(up, down), min=0.0).to(torch.float32)  # [F, M]


class LogMelFrontend(nn.Module):
    """Batched waveform -> ``(mel [B, S_seg, 1, num_mel_bins, target_frames], mask [B] bool)``.

    Call with a list of mono float waveforms at ``sample_rate`` (``[S]`` tensors or numpy arrays;
    ``[channels, S]`` is down-mixed) or ``None`` for clips without audio.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        num_segments: int = 8,
        segment_seconds: float = 2.0,
        num_mel_bins: int = 128,
        win_length: int = 400,
        hop_length: int = 160,
        n_fft: int = 512,
        target_frames: int = 204,
        mean: float = -4.268,
        std: float = 9.138,
        preemphasis: float = 0.97,
        low_freq: float = 20.0,
        high_freq: float | None = None,
    ) -> None:
        super().__init__()
        if win_length > n_fft:
            raise ValueError(f"win_length {win_length} exceeds n_fft {n_fft}")
        if std <= 0:
            raise ValueError(f"std must be positive, got {std}")
        self.sample_rate = sample_rate
        self.num_segments = num_segments
        self.segment_samples = int(round(segment_seconds * sample_rate))
        self.num_mel_bins = num_mel_bins
        self.win_length, self.hop_length, self.n_fft = win_length, hop_length, n_fft
        self.target_frames = target_frames
        self.mean, self.std, self.preemphasis = mean, std, preemphasis
        window = torch.zeros(n_fft, dtype=torch.float64)
        window[:win_length] = torch.hann_window(win_length, periodic=False, dtype=torch.float64)
        self.register_buffer("window", window.float(), persistent=False)  # [n_fft], zero past win_length
        self.register_buffer("window_fft", torch.fft.rfft(window).to(torch.complex64), persistent=False)  # [F]
        fb = mel_filterbank(num_mel_bins, n_fft, sample_rate, low_freq, high_freq)
        self.register_buffer("filterbank", fb, persistent=False)  # [n_fft // 2 + 1, M]

    def segment_starts(self, num_samples: int) -> list[int]:
        """Start sample of each segment, evenly spread over the clip (all 0 for a short clip)."""
        last = max(num_samples - self.segment_samples, 0)
        return [int(round(s)) for s in np.linspace(0, last, self.num_segments)]

    def power_spectrum(self, x: Tensor) -> Tensor:
        """Kaldi-style framed power spectrum of one waveform ``[L]`` (L >= win_length) -> ``[frames, F]``."""
        frames = 1 + (x.shape[-1] - self.win_length) // self.hop_length
        x = x.to(torch.float64)
        emph = torch.cat([x[:1] * (1 - self.preemphasis), x[1:] - self.preemphasis * x[:-1]])  # [L]
        emph = torch.nn.functional.pad(emph, (0, self.n_fft - self.win_length))
        spec = torch.stft(
            emph,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            window=self.window.to(torch.float64),
            center=False,
            return_complex=True,
        ).T[:frames]  # [frames, F]
        frame_mean = x.unfold(0, self.win_length, self.hop_length)[:frames].mean(dim=-1)  # [frames]
        spec = spec - (1 - self.preemphasis) * frame_mean[:, None] * self.window_fft.to(spec.dtype)[None, :]
        return spec.abs().pow(2).to(torch.float32)

    def log_mel(self, x: Tensor) -> Tensor:
        """Waveform ``[L]`` -> un-normalised log-mel ``[num_mel_bins, frames]`` (clips < 25 ms are zero-padded)."""
        if x.shape[-1] < self.win_length:
            x = torch.nn.functional.pad(x, (0, self.win_length - x.shape[-1]))
        mel = self.power_spectrum(x) @ self.filterbank  # [frames, M]
        return torch.log(torch.clamp(mel, min=KALDI_EPS)).T  # [M, frames]

    def _fit_frames(self, mel: Tensor) -> Tensor:
        """Pad with 0 (log domain) or crop ``[M, frames]`` to ``[M, target_frames]``."""
        extra = self.target_frames - mel.shape[-1]
        if extra >= 0:
            return torch.nn.functional.pad(mel, (0, extra))
        return mel[:, : self.target_frames]

    def clip(self, waveform: Tensor) -> Tensor:
        """One clip ``[S]`` -> normalised ``[num_segments, 1, num_mel_bins, target_frames]``."""
        starts = self.segment_starts(waveform.shape[-1])
        cache: dict[int, Tensor] = {}
        segments = []
        for s in starts:
            if s not in cache:
                mel = self.log_mel(waveform[s : s + self.segment_samples])
                cache[s] = (self._fit_frames(mel) - self.mean) / self.std
            segments.append(cache[s])
        return torch.stack(segments)[:, None]  # [S_seg, 1, M, target_frames]

    def _check(self, index: int, wave: Tensor | np.ndarray) -> Tensor:
        w = torch.as_tensor(wave)
        if not torch.is_floating_point(w):
            raise TypeError(f"audio {index}: expected a float waveform in [-1, 1], got dtype {w.dtype}")
        if w.dim() == 2:  # [channels, S] -> mono
            w = w.mean(dim=0)
        if w.dim() != 1:
            raise ValueError(f"audio {index}: expected a waveform [S] or [channels, S], got shape {tuple(w.shape)}")
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"audio {index}: waveform contains NaN or inf")
        return w.to(self.filterbank.device, torch.float32)

    def forward(self, waveforms: Sequence[Tensor | np.ndarray | None]) -> tuple[Tensor, Tensor]:
        """List of B waveforms (or None) -> ``mel [B, S_seg, 1, M, target_frames]``, ``mask [B]`` bool."""
        shape = (self.num_segments, 1, self.num_mel_bins, self.target_frames)
        mels, mask = [], []
        for i, wave in enumerate(waveforms):
            w = None if wave is None else self._check(i, wave)
            if w is None or w.numel() == 0:
                mels.append(torch.zeros(shape, device=self.filterbank.device))
                mask.append(False)
            else:
                mels.append(self.clip(w))
                mask.append(True)
        if not mels:
            raise ValueError("LogMelFrontend got an empty batch")
        return torch.stack(mels), torch.tensor(mask, dtype=torch.bool, device=self.filterbank.device)

    def from_batch(self, audio: Tensor, audio_lengths: Tensor, audio_mask: Tensor) -> tuple[Tensor, Tensor]:
        """The collated batch fields (``audio [B, S]`` zero-padded, ``audio_lengths [B]``, ``audio_mask [B]``)
        -> ``(mel [B, S_seg, 1, M, F], mask [B])``."""
        waves = [
            audio[b, : int(n)] if bool(m) else None
            for b, (n, m) in enumerate(zip(audio_lengths, audio_mask, strict=True))
        ]
        return self(waves)

    @property
    def frames_per_segment(self) -> int:
        """Mel frames a full segment produces before padding (198 for 2 s at 16 kHz)."""
        return 1 + (self.segment_samples - self.win_length) // self.hop_length

    def extra_repr(self) -> str:
        return (
            f"sample_rate={self.sample_rate}, segments={self.num_segments}x"
            f"{self.segment_samples / self.sample_rate:g}s, "
            f"mel_bins={self.num_mel_bins}, target_frames={self.target_frames}, mean={self.mean}, std={self.std}"
        )
