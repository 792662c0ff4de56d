"""Audio branch: waveform -> log-mel segments (frontend) -> spectrogram encoder -> audio Q-former."""

from vidlang.models.audio.encoder import (
    AUDIO_BACKBONES,
    ASTBackbone,
    AudioBranch,
    AudioConfig,
    AudioOutput,
    SpectrogramViT,
    build_audio_branch,
)
from vidlang.models.audio.frontend import LogMelFrontend, mel_filterbank

__all__ = [
    "AUDIO_BACKBONES",
    "ASTBackbone",
    "AudioBranch",
    "AudioConfig",
    "AudioOutput",
    "LogMelFrontend",
    "SpectrogramViT",
    "build_audio_branch",
    "mel_filterbank",
]
