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
def fit_and_demo_trainers(tmp_path):
    """The trainers ``vidlang fit`` (a retrieval config, not run) and ``vidlang demo`` build, on the CPU."""
    import sys
    from pathlib import Path
    from unittest import mock

    import torch

    from vidlang.cli.lightning import VidlangCLI
    from vidlang.demo import DemoConfig, build

    root = Path(__file__).resolve().parents[1]
    args = ["--config", str(root / "configs/retrieval/mean.yaml"),
            "--config", str(root / "configs/data/synthetic.yaml"), "--model.init_args.model.image", "vit_tiny",
            "--trainer.accelerator", "cpu", "--trainer.logger", "false", f"--trainer.default_root_dir={tmp_path}"]
    with mock.patch.object(sys, "argv", ["vidlang"]), torch.device("meta"):
        cli = VidlangCLI(args=args, run=False)
    corpus = tmp_path / "corpus"
    (corpus / "tokenizer").mkdir(parents=True)
    with mock.patch("vidlang.tasks.retrieval.RetrievalTask", lambda *a, **k: None):
        _, _, demo = build(DemoConfig(corpus=str(corpus), out=str(tmp_path / "run")), corpus)
    return cli.trainer, demo
