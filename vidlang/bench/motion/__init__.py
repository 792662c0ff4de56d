"""The synthetic motion benchmark's pieces, shared by ``vidlang bench temporal`` and
``tools/recognition_synthetic.py``: :mod:`~vidlang.bench.motion.data` (corpus, clip bank, frame indices,
augmentation) and :mod:`~vidlang.bench.motion.train` (the shared pre-training, the per-block recipe,
evaluation metrics)."""
