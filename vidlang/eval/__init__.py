"""Evaluation: retrieval metrics (chunked, tie-safe, multi-caption, DSL kept apart) and plots."""

from vidlang.eval.retrieval import (
    RetrievalResult,
    chance_levels,
    chunked_similarity,
    evaluate_embeddings,
    evaluate_similarity,
    retrieval_metrics,
)

__all__ = [
    "RetrievalResult",
    "chance_levels",
    "chunked_similarity",
    "evaluate_embeddings",
    "evaluate_similarity",
    "retrieval_metrics",
]
