"""Audio-visual fusion modules (registry ``FUSIONS``) and the ``AudioVisualModel`` wrapper."""

from vidlang.models.fusion.fusion import FUSIONS, AudioVisualModel, build_fusion

__all__ = ["FUSIONS", "AudioVisualModel", "build_fusion"]
