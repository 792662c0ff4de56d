"""The audio track of a video, decoded with PyAV for every backend (no torchaudio)."""

from __future__ import annotations

import io

import numpy as np
import torch

from vidlang.data.decoding.base import VideoDecodeError


def decode_audio(src: str | bytes, sample_rate: int, name: str, backend: str) -> torch.Tensor | None:
    """The first audio stream as float32 mono ``[S]`` resampled to ``sample_rate``; ``None`` without audio.

    Channels are averaged by FFmpeg's resampler (``av.AudioResampler``). An audio stream
    that yields no samples, or fails to decode, raises :class:`VideoDecodeError`.
    """
    import av

    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    try:
        with av.open(src if isinstance(src, str) else io.BytesIO(src), metadata_errors="ignore") as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            chunks = []
            for frame in container.decode(stream):
                frame.pts = None  # let the resampler count samples; input pts gaps are not ours to fill
                chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
            chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    except VideoDecodeError:
        raise
    except Exception as e:
        raise VideoDecodeError(name, backend, f"audio decoding failed: {getattr(e, 'strerror', None) or e}") from e
    if not chunks or sum(len(c) for c in chunks) == 0:
        raise VideoDecodeError(name, backend, "the audio stream has no decodable samples")
    return torch.from_numpy(np.concatenate(chunks).astype(np.float32, copy=False))
