"""LightningModules (thin: model + loss + metrics), used by ``vidlang fit|validate|test``."""

from vidlang.tasks.retrieval import RetrievalTask

__all__ = ["RetrievalTask"]
