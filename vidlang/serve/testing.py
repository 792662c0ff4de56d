"""Tiny fixtures for the index/serve/CLI tests and ``tools/load_test_serve.py``: random tiny retrieval and
recognition checkpoints saved by a real ``pl.Trainer`` (one optimisation step) and a folder of synthetic videos.
No downloads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

WORDS = "a the red green blue yellow square circle triangle moves left right up down grows shrinks ball box"


def fit_one_step(task: Any, batches: list[dict], path: Path) -> Path:
    """Train ``task`` one step on ``batches`` (already collated) with a real ``pl.Trainer``; save it to ``path``."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=path.parent)
    trainer.fit(task, DataLoader(batches, batch_size=None))
    trainer.save_checkpoint(path)
    return path


def tiny_retrieval_checkpoint(out_dir: str | Path, num_frames: int = 4, block: str = "mean",
                              block_args: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """Train a ``vit_tiny`` :class:`RetrievalTask` for one step on random clips; returns ``out_dir/tiny.ckpt``."""
    import pytorch_lightning as pl

    from vidlang.models.clip.tokenizer import train_tokenizer
    from vidlang.models.factory import ModelConfig
    from vidlang.tasks.retrieval import RetrievalTask

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(seed, verbose=False)
    tok = train_tokenizer([WORDS] * 4, out / "tokenizer", vocab_size=300, min_frequency=1, context_length=24)
    cfg = ModelConfig(image="vit_tiny", num_frames=num_frames, block=block, block_args=dict(block_args or {}),
                      freeze="full")
    task = RetrievalTask(cfg, optim={"lr": 1e-3, "warmup_steps": 0, "warmup_ratio": None},
                         evaluation={"write_plots": False})
    task.set_tokenizer(tok)
    g = torch.Generator().manual_seed(seed)
    words = WORDS.split()
    batches = [{
        "video": torch.randint(0, 256, (4, num_frames, 3, 32, 32), generator=g, dtype=torch.uint8),
        "captions": [" ".join(words[3 * i: 3 * i + 4]) for i in range(4)],
        "caption_index": torch.arange(4),
    }]
    return fit_one_step(task, batches, out / "tiny.ckpt")


def tiny_recognition_checkpoint(out_dir: str | Path, num_frames: int = 4,
                                class_names: tuple[str, ...] = ("moving left", "moving right", "growing"),
                                seed: int = 0) -> Path:
    """Train a ``vit_tiny`` :class:`RecognitionTask` with a linear head for one step on random clips; returns
    ``out_dir/tiny_recognition.ckpt``."""
    import pytorch_lightning as pl

    from vidlang.models.clip.tokenizer import train_tokenizer
    from vidlang.models.factory import ModelConfig
    from vidlang.tasks.recognition import RecognitionTask

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(seed, verbose=False)
    tok = train_tokenizer([WORDS + " moving growing"] * 4, out / "tokenizer", vocab_size=300, min_frequency=1,
                          context_length=24)
    cfg = ModelConfig(image="vit_tiny", num_frames=num_frames, block="mean", freeze="full")
    task = RecognitionTask(cfg, class_names=list(class_names), head={"enabled": True},
                           optim={"lr": 1e-3, "warmup_steps": 0, "warmup_ratio": None},
                           mix={"mixup": 0.0, "cutmix": 0.0}, evaluation={"write_plots": False})
    task.set_tokenizer(tok)
    g = torch.Generator().manual_seed(seed)
    batches = [{"video": torch.randint(0, 256, (4, num_frames, 3, 32, 32), generator=g, dtype=torch.uint8),
                "label": torch.arange(4) % len(class_names)}]
    return fit_one_step(task, batches, out / "tiny_recognition.ckpt")


def synthetic_videos(out_dir: str | Path, n: int = 8, seed: int = 0, size: int = 32, frames: int = 8) -> Path:
    """``n`` synthetic corpus videos; returns the folder holding them (``out_dir/videos``)."""
    from vidlang.data.synthetic import generate_corpus

    generate_corpus(out_dir, n, seed=seed, size=size, frames=frames, workers=1, progress=False)
    return Path(out_dir) / "videos"
