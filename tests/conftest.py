"""Shared pytest configuration: CPU-friendly defaults and the GPU marker."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on GPU machines only)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def make_fit_trainer(tmp_path):
    """``make_fit_trainer(*extra_args)``: the trainer ``vidlang fit`` builds for a tiny retrieval config on the CPU
    (classes instantiated on the meta device, nothing run)."""
    import sys
    from pathlib import Path
    from unittest import mock

    import torch

    from vidlang.cli.lightning import VidlangCLI

    root = Path(__file__).resolve().parents[1]

    def make(*extra: str):
        args = ["--config", str(root / "configs/retrieval/mean.yaml"),
                "--config", str(root / "configs/data/synthetic.yaml"), "--model.init_args.model.image", "vit_tiny",
                "--trainer.accelerator", "cpu", "--trainer.logger", "false",
                f"--trainer.default_root_dir={tmp_path}", *extra]
        with mock.patch.object(sys, "argv", ["vidlang"]), torch.device("meta"):
            return VidlangCLI(args=args, run=False).trainer

    return make


@pytest.fixture
def fit_and_demo_trainers(tmp_path, make_fit_trainer):
    """The trainers ``vidlang fit`` (:func:`make_fit_trainer`) and ``vidlang demo`` build, on the CPU."""
    from unittest import mock

    from vidlang.demo import DemoConfig, build

    corpus = tmp_path / "corpus"
    (corpus / "tokenizer").mkdir(parents=True)
    with mock.patch("vidlang.tasks.retrieval.RetrievalTask", lambda *a, **k: None):
        _, _, demo = build(DemoConfig(corpus=str(corpus), out=str(tmp_path / "run")), corpus)
    return make_fit_trainer(), demo
