"""Synthetic motion recognition: train several temporal blocks for the same budget from the same init, on CPU.

Generates a synthetic corpus (``vidlang.data.synthetic``: 9 motion classes, 8 of them forming time-reversed
pairs such as moving left / moving right), trains a tiny randomly initialised video CLIP (``vit_tiny``)
with each block for the same number of steps and the same seed -- so the image and text towers start
from identical weights -- and evaluates on the test split with 1 view and with K temporal views (softmax
per view, averaged). Prints a table (top-1 / mean-class accuracy, %) and writes it as JSON.

Notes: the towers are random, not pretrained, so every block trains the whole model (``freeze=full``;
the blocks' "auto" recipes would freeze random towers) and classifies with the linear head (a text
classifier from a random text tower first has to learn to tell prompts apart that differ in one word).
Mixup/cutmix are off for such a short budget (label smoothing 0.1 stays). The corpus is square, so
three spatial crops would be identical: only temporal views are used. ``mean`` cannot tell a motion
from its time reversal (frame order is lost), so its ceiling is 1/9 + 8/9 * 1/2 = 56%.

    python tools/recognition_synthetic.py --videos 600 --steps 400
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

BLOCK_ARGS = {
    "seq_transformer": {"layers": 2},
    "ted": {"bottleneck": 32, "text_bottleneck": 32},
    "stan": {"depth": 2},
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/vidlang_recognition_synthetic", help="work directory")
    p.add_argument("--videos", type=int, default=600)
    p.add_argument("--blocks", default="mean,seq_transformer,ted,stan")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--views", type=int, default=3, help="temporal views of the multi-view test")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--workers", type=int, default=1, help="data-loader workers")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def prepare(args: argparse.Namespace) -> tuple[Path, list[str]]:
    from vidlang.data.synthetic import generate_corpus
    from vidlang.models.clip.tokenizer import train_tokenizer
    from vidlang.tasks.recognition import VIFI_TEMPLATES, prompts_for

    out = Path(args.out)
    corpus = out / "corpus"
    if not (corpus / "manifest.csv").is_file() or sum(1 for _ in open(corpus / "manifest.csv")) != args.videos + 1:
        generate_corpus(corpus, args.videos, seed=args.seed, size=32, frames=16, workers=2)
    classes = [ln.strip() for ln in (corpus / "classes.txt").read_text().splitlines() if ln.strip()]
    train_tokenizer(prompts_for(classes, VIFI_TEMPLATES) * 8, out / "tok", vocab_size=300, min_frequency=1,
                    context_length=16)
    return corpus, classes


def datamodule(corpus: Path, args: argparse.Namespace, views: int):
    from vidlang.data.datamodule import VideoDataModule

    src = {"format": "manifest", "path": str(corpus / "manifest.csv")}
    eval_sampler = ("multiview", {"sampler": "segment", "num_views": views}) if views > 1 else (None, None)
    return VideoDataModule(train={**src, "split": "train"}, test={**src, "split": "test"}, num_frames=args.frames,
                           image_size=32, batch_size=args.batch, eval_batch_size=32, num_workers=args.workers,
                           persistent_workers=args.workers > 0, pin_memory=False, seed=args.seed,
                           eval_sampler=eval_sampler[0], eval_sampler_args=eval_sampler[1])


def run_block(block: str, corpus: Path, args: argparse.Namespace) -> dict:
    import hashlib

    import pytorch_lightning as pl

    from vidlang.models.factory import ModelConfig
    from vidlang.tasks.recognition import RecognitionTask

    pl.seed_everything(args.seed, verbose=False)
    cfg = ModelConfig(vision="vit_tiny", num_frames=args.frames, block=block, block_args=BLOCK_ARGS.get(block, {}),
                      freeze="full")
    task = RecognitionTask(cfg, tokenizer=str(Path(args.out) / "tok"), lr=args.lr, weight_decay=0.05, head=True,
                           head_init="random", warmup_ratio=0.1, mixup=0.0, cutmix=0.0, label_smoothing=0.1,
                           write_plots=False)
    towers = hashlib.sha1(b"".join(p.detach().numpy().tobytes() for p in task.model.image_tower.parameters()))
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         default_root_dir=Path(args.out) / "runs" / block)
    t0 = time.perf_counter()
    trainer.fit(task, datamodule(corpus, args, 1))
    train_s = time.perf_counter() - t0
    row = {"block": block, "params": sum(p.numel() for p in task.model.block.parameters()),
           "init": towers.hexdigest()[:10], "train_s": train_s}
    for views in (1, args.views):
        trainer.test(task, datamodule(corpus, args, views), verbose=False)
        m = task.last_metrics["test"]
        row[f"top1_{views}v"], row[f"mca_{views}v"], row["n_test"] = m["top1"], m["mean_class_acc"], m["num_samples"]
    row["total_s"] = time.perf_counter() - t0
    return row


def main() -> None:
    args = parse_args()
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    corpus, classes = prepare(args)
    rows = []
    for block in args.blocks.split(","):
        rows.append(run_block(block.strip(), corpus, args))
        print(json.dumps(rows[-1]), flush=True)
    v = args.views
    print(f"\n{len(classes)} classes, {rows[0]['n_test']} test videos, {args.steps} steps x batch {args.batch}, "
          f"{args.frames} frames; chance 11.1%")
    print(f"| block | block params | top-1 1 view | top-1 {v} views | mean-class 1 view | mean-class {v} views "
          "| train s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['block']} | {r['params']:,} | {r['top1_1v']:.1f} | {r[f'top1_{v}v']:.1f} | {r['mca_1v']:.1f} "
              f"| {r[f'mca_{v}v']:.1f} | {r['train_s']:.0f} |")
    (Path(args.out) / "results.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
