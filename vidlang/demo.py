"""``vidlang demo``: the front door. Synthetic corpus -> tiny text-video retrieval model trained from scratch
on the CPU -> held-out evaluation -> results table, plots, checkpoint and one example query.

Everything here goes through the same pieces as real training: the synthetic corpus is real H.264 files
decoded by :mod:`vidlang.data.decoding`, read by the ``manifest`` format through :class:`VideoDataModule`,
trained by :class:`RetrievalTask` under a Lightning ``Trainer``, and queried through the inference bundle
that ``vidlang search`` uses.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULT_KEYS = ("R@1", "R@5", "R@10")
MIN_VIDEOS = 20  # the smallest corpus with two validation and two test videos


@dataclass
class DemoConfig:
    """Embedded defaults: small enough for a laptop-class CPU in a few minutes, large enough to learn."""

    corpus: str = "data/synth"
    out: str = "runs/demo"
    videos: int = 512
    seed: int = 0
    block: str = "seq_transformer"
    epochs: int = 30
    batch_size: int = 32
    num_frames: int = 8
    image_size: int = 32
    lr: float = 2e-3
    workers: int = 2
    query: str = "a red square moves to the left"

    def __post_init__(self) -> None:
        from vidlang.errors import ConfigError

        for name, low in (("videos", MIN_VIDEOS), ("epochs", 1), ("batch_size", 1), ("num_frames", 1),
                          ("image_size", 8), ("workers", 0)):  # fmt: skip
            value = getattr(self, name)
            if value < low:
                raise ConfigError(f"demo --{name.replace('_', '-')} must be >= {low}, got {value}")
        if not self.lr > 0:
            raise ConfigError(f"demo --lr must be > 0, got {self.lr}")


def ensure_corpus(cfg: DemoConfig) -> Path:
    """Generate the synthetic corpus unless a complete one is already there."""
    from vidlang.data.synthetic import generate_corpus

    root = Path(cfg.corpus)
    if (root / "manifest.csv").is_file() and (root / "tokenizer" / "tokenizer.json").is_file():
        print(f"[1/4] synthetic corpus: reusing {root}")
        return root
    print(f"[1/4] synthetic corpus: generating {cfg.videos} videos in {root}")
    info = generate_corpus(root, cfg.videos, seed=cfg.seed, workers=cfg.workers)
    print(f"      {info.num_videos} videos in {info.seconds:.1f} s, splits {info.split_counts}")
    return root


def build(cfg: DemoConfig, corpus: Path) -> tuple[Any, Any, Any]:
    """The data module, the task (tiny CLIP + temporal block, from scratch) and the trainer."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar

    from vidlang.cli.progress_bar import default_progress_bar
    from vidlang.data.config import LoaderConfig, SamplingConfig, TransformConfig
    from vidlang.data.datamodule import VideoDataModule
    from vidlang.io import with_atomic_checkpoint_io
    from vidlang.models.factory import ModelConfig
    from vidlang.tasks.retrieval import RetrievalTask
    from vidlang.threads import LoaderThreads

    manifest = str(corpus / "manifest.csv")
    data = VideoDataModule(
        train={"format": "manifest", "path": manifest, "split": "train"},
        val={"format": "manifest", "path": manifest, "split": "val"},
        test={"format": "manifest", "path": manifest, "split": "test"},
        sampling=SamplingConfig(num_frames=cfg.num_frames),
        transform=TransformConfig(image_size=cfg.image_size, crop_scale=(0.8, 1.0)),
        loader=LoaderConfig(batch_size=cfg.batch_size, num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
                            pin_memory=False),
        seed=cfg.seed,
    )  # fmt: skip
    model = ModelConfig(image="vit_tiny", block=cfg.block, num_frames=cfg.num_frames)
    task = RetrievalTask(model, tokenizer=str(corpus / "tokenizer"),
                         optim={"lr": cfg.lr, "weight_decay": 0.05, "warmup_ratio": 0.05})
    ckpt = ModelCheckpoint(dirpath=Path(cfg.out) / "checkpoints", filename="best", save_top_k=1, save_last=True,
                           monitor="val/t2v_R@1", mode="max", enable_version_counter=False)  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=cfg.epochs, default_root_dir=cfg.out,
        callbacks=[ckpt, default_progress_bar() or TQDMProgressBar(), LoaderThreads()],
        check_val_every_n_epoch=max(1, min(5, cfg.epochs)), log_every_n_steps=10, enable_model_summary=False,
        logger=pl.loggers.CSVLogger(cfg.out, name="logs"), plugins=with_atomic_checkpoint_io(),
    )  # fmt: skip
    return data, task, trainer


def results_table(metrics: dict[str, float], chance: dict[str, float]) -> str:
    """Held-out R@K for both directions next to chance (percent)."""
    lines = [f"{'direction':<14}" + "".join(f"{k:>9}" for k in RESULT_KEYS) + "   (chance" +
             "".join(f"{k:>7}" for k in RESULT_KEYS) + ")"]  # fmt: skip
    for name, prefix in (("text->video", "t2v"), ("video->text", "v2t")):
        row = "".join(f"{metrics[f'{prefix}_{k}']:9.1f}" for k in RESULT_KEYS)
        base = "".join(f"{chance[f'{prefix}_{k}']:7.1f}" for k in RESULT_KEYS)
        lines.append(f"{name:<14}{row}   (      {base})")
    lines.append(f"{'median rank':<14}{metrics['t2v_MdR']:9.1f} (text->video), {metrics['v2t_MdR']:.1f} (video->text)")
    return "\n".join(lines)


def example_query(ckpt: Path, corpus: Path, query: str, k: int = 5) -> str:
    """Rank the held-out test videos for ``query`` with the trained checkpoint (as ``vidlang search`` does)."""
    import csv

    from vidlang.serve.inference import load_bundle

    with open(corpus / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    bundle = load_bundle(ckpt)
    videos = bundle.embed_videos([str(corpus / r["path"]) for r in rows])  # [N, E]
    scores = (bundle.embed_texts([query]) @ videos.T)[0]  # [N]
    top = scores.topk(min(k, len(rows)))
    out = [f'query: "{query}"  (top {len(top.indices)} of {len(rows)} held-out videos)']
    for rank, (score, i) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True), 1):
        caption = json.loads(rows[i]["captions"])[0]
        out.append(f"  {rank}. {score:6.3f}  {rows[i]['path']}  -- {caption}")
    return "\n".join(out)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the whole demo; returns the test metrics and the paths it wrote."""
    import torch

    from vidlang.eval.retrieval import chance_levels
    from vidlang.io import atomic_write_text

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    corpus = ensure_corpus(cfg)
    data, task, trainer = build(cfg, corpus)
    print(f"[2/4] training a tiny CLIP + {cfg.block} from scratch: {cfg.epochs} epochs on the CPU")
    trainer.fit(task, datamodule=data)
    best = Path(trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path)
    if not best.is_file():
        raise RuntimeError(f"training wrote no checkpoint in {cfg.out}/checkpoints")
    print(f"[3/4] evaluating {best.name} on the held-out test split")
    metrics = trainer.test(task, datamodule=data, ckpt_path=str(best), verbose=False)[0]
    metrics = {k.split("/", 1)[1]: float(v) for k, v in metrics.items() if k.startswith("test/")}
    n_videos = int(metrics["num_videos"])
    idx = torch.arange(n_videos).repeat_interleave(int(metrics["num_texts"]) // n_videos)
    chance = chance_levels(idx, n_videos)
    print(results_table(metrics, chance))
    print("[4/4] example query")
    print(example_query(best, corpus, cfg.query))
    report = Path(cfg.out) / "demo_results.json"
    atomic_write_text(report, json.dumps({"metrics": metrics, "chance": chance, "checkpoint": str(best),
                                          "seconds": time.perf_counter() - t0, "config": cfg.__dict__}, indent=2))
    plots = sorted(str(p) for p in best.parent.glob("*.png"))
    print(f"checkpoint: {best}\nmetrics:    {best.parent}/test_metrics.json, {report}\nplots:      {', '.join(plots)}")
    print(f"try:        vidlang search --ckpt {best} --videos {corpus}/videos \"a blue circle grows\"")
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return {"metrics": metrics, "chance": chance, "checkpoint": best, "report": report}
