"""LightningModules (thin: model + loss + metrics), used by ``vidlang fit|validate|test``."""

from vidlang.tasks.recognition import RecognitionTask
from vidlang.tasks.retrieval import RetrievalTask

__all__ = ["RecognitionTask", "RetrievalTask"]
