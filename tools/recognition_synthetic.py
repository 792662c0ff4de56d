"""Synthetic motion recognition through ``RecognitionTask``: every block from one pre-trained tiny tower, same budget.

1. Corpus: ``vidlang.data.synthetic`` (9 motion classes, 8 of them time-reversed pairs such as moving
   left / moving right), 64 px, 24 frames at 8 fps, reused if ``--corpus`` already holds one.
2. Shared start: the ``vit_tiny`` image tower is pre-trained on single frames (order-free) with the
   temporal benchmark's pre-training (:func:`vidlang.bench.motion.train.pretrain`), saved as a
   safetensors file and loaded by every block through ``ModelConfig(pretrained=FILE)`` / ``build_model``
   with the block's default freezing (``freeze="auto"``). The text tower stays random (the classifier
   is the linear head, reset to the same seeded init for every block).
3. Each block trains as a :class:`~vidlang.tasks.recognition.RecognitionTask` on a
   :class:`~vidlang.data.datamodule.VideoDataModule` that decodes the ``train`` split's .mp4 files:
   same steps, batch, lr (x the block's multiplier, capped as in ``vidlang bench temporal``; the tower, when
   trained, x ``--backbone-lr-mult``),
   schedule, seed and data order for every block.
   Training clips: TSN segment sampling, a random resized crop; mixup/cutmix off; label-aware time
   reversal and flips (the temporal benchmark's augmentation, a batch callback; ``--no-augment`` drops
   it). Without it every training video is seen in one direction only, and ``mean`` memorises
   per-video direction (its training loss falls far below what its held-out ceiling allows).
4. Evaluation on the held-out videos (``val`` + ``test``): single view (T segment middles, centre
   crop) and multi-view (``--clips`` temporal clips x three crops, softmax per view, averaged). The
   corpus is square, so ``ThreeCrop`` returns three identical crops (short side = long side): the
   multi-view gain can only come from the temporal clips; the run checks the crops' logits agree.

Reported per block and view setting: top-1, top-5, mean-class accuracy and the reverse-pair accuracy
(for videos of a paired class: is the true class more probable than its time reverse? chance 50 %).
``mean`` averages frames, so it cannot tell a motion from its reverse: its top-1 ceiling is
1/9 + 8/9 x 1/2 = 56 % and its pair accuracy ~50 %.

    python tools/recognition_synthetic.py --out /tmp/vidlang_recognition_synthetic
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import resource
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

BLOCKS = "mean,seq_transformer,ted,prompt_switch"
SETTINGS = ("1view", "multiview")


# -- pure pieces (tested in tests/test_recognition_synthetic_tool.py) ----------------------------------------
def reverse_index(class_names: list[str]) -> dict[int, int]:
    """Label -> label of its time reverse, for the paired motion classes of ``class_names``."""
    from vidlang.data.synthetic.spec import LABEL_NAMES, REVERSE_PAIRS

    index = {name: i for i, name in enumerate(class_names)}
    out = {}
    for a, b in REVERSE_PAIRS.items():
        na, nb = LABEL_NAMES[a], LABEL_NAMES[b]
        if na not in index or nb not in index:
            raise ValueError(f"class names {class_names} lack the reverse pair {na!r} / {nb!r}")
        out[index[na]] = index[nb]
    return out


def pair_accuracy(scores: Tensor, labels: Tensor, reverse: dict[int, int]) -> float | None:
    """% of paired-class rows of ``scores [N, K]`` whose true class beats its reverse (ties lose); None if none."""
    rows = [i for i, y in enumerate(labels.tolist()) if y in reverse]
    if not rows:
        return None
    idx = torch.tensor(rows)
    true = scores[idx, labels[idx]]
    rev = scores[idx, torch.tensor([reverse[int(y)] for y in labels[idx]])]
    return 100.0 * (true > rev).double().mean().item()


def pair_blind_accuracy(scores: Tensor, labels: Tensor, reverse: dict[int, int]) -> float:
    """% of rows of ``scores [N, K]`` predicted as their class or its time reverse (what ``mean`` can reach: 100)."""
    pred = scores.argmax(dim=1)
    rev = torch.tensor([reverse.get(int(y), int(y)) for y in labels])
    return 100.0 * ((pred == labels) | (pred == rev)).double().mean().item()


def crops_agree(logits: Tensor, clips: int, crops: int, atol: float = 1e-4) -> bool:
    """True if the ``crops`` spatial views of every temporal clip of ``logits [N, clips * crops, K]`` agree."""
    v = logits.view(logits.shape[0], clips, crops, -1)
    return bool(torch.allclose(v, v[:, :, :1].expand_as(v), atol=atol))


class LabelAwareAugment:
    """Lightning callback: per training clip, with p = 0.5 each, time reversal and horizontal / vertical
    flips with the matching label swaps (``vidlang.bench.motion.data.AUGMENTATIONS``), in place on the batch."""

    def __init__(self, class_names: list[str], seed: int) -> None:
        from vidlang.bench.motion.data import AUGMENTATIONS
        from vidlang.data.synthetic.spec import LABEL_NAMES, MOTIONS

        order = [class_names.index(LABEL_NAMES[m]) for m in MOTIONS]  # motion index -> class label
        to_motion = torch.empty(len(order), dtype=torch.long)
        to_motion[torch.tensor(order)] = torch.arange(len(order))
        self.maps = [(dims, torch.tensor(order)[mapping[to_motion]]) for dims, mapping in AUGMENTATIONS.values()]
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, batch: dict[str, Any]) -> None:
        video, labels = batch["video"], batch["label"].long()  # [B, T, C, H, W], [B]
        for dims, mapping in self.maps:
            pick = torch.rand(video.shape[0], generator=self.generator) < 0.5
            if pick.any():
                video[pick] = video[pick].flip(dims)
                labels[pick] = mapping.to(labels.device)[labels[pick]]
        batch["video"], batch["label"] = video, labels


# -- set-up ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/vidlang_recognition_synthetic"), help="work directory")
    p.add_argument("--corpus", type=Path, default=None, help="corpus folder (default OUT/corpus; generated if empty)")
    p.add_argument("--videos", type=int, default=512)
    p.add_argument("--blocks", default=BLOCKS)
    p.add_argument("--steps", type=int, default=300, help="training steps per block")
    p.add_argument("--pretrain-steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--clips", type=int, default=4, help="temporal clips of the multi-view test (x 3 crops)")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="new parameters: lr x the block's multiplier, at most 5e-3 (as in bench temporal)")
    p.add_argument("--backbone-lr-mult", type=float, default=0.1,
                   help="the pre-trained tower, for blocks whose freezing trains it (as in bench temporal)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--crop-scale", type=float, default=0.8, help="min area of the training random resized crop")
    p.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no label-aware time reversal + flips during training")  # fmt: skip
    p.add_argument("--workers", type=int, default=1, help="data-loader workers")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def prepare(args: argparse.Namespace) -> tuple[Path, Path, list[str], Path]:
    """Corpus, held-out manifest (val + test rows), class names and tokenizer directory."""
    from vidlang.bench.motion.data import ensure_corpus
    from vidlang.models.clip.tokenizer import train_tokenizer
    from vidlang.tasks.recognition import VIFI_TEMPLATES, prompts_for

    args.out.mkdir(parents=True, exist_ok=True)
    corpus = ensure_corpus(args.corpus or args.out / "corpus", args.videos, args.seed, 3 * args.frames)
    with open(corpus / "manifest.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows, fields = list(reader), reader.fieldnames
    held = args.out / "heldout.csv"
    with open(held, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(r for r in rows if r["split"] in ("val", "test"))
    classes = [ln.strip() for ln in (corpus / "classes.txt").read_text().splitlines() if ln.strip()]
    tok = args.out / "tokenizer"
    train_tokenizer(prompts_for(classes, VIFI_TEMPLATES) * 8, tok, vocab_size=300, min_frequency=1,
                    context_length=24)  # fmt: skip
    return corpus, held, classes, tok


def pretrained_tower(args: argparse.Namespace, corpus: Path) -> tuple[Path, dict]:
    """The temporal benchmark's shared single-frame pre-training, saved once to ``OUT/pretrained.safetensors``."""
    from vidlang.bench.motion.data import load_bank, read_manifest
    from vidlang.bench.motion.train import TrainRecipe, pretrain

    recipe = TrainRecipe(frames=args.frames, pretrain_steps=args.pretrain_steps, seed=args.seed)
    weights, meta = args.out / "pretrained.safetensors", args.out / "pretrained.json"
    key = {"corpus": str(corpus.resolve()), "recipe": vars(recipe)}
    if weights.is_file() and meta.is_file() and json.loads(meta.read_text()).get("key") == key:
        return weights, json.loads(meta.read_text())["info"]
    rows = read_manifest(corpus)
    train = load_bank(corpus, [r for r in rows if r["split"] == "train"], recipe.size, "train (pre-training)")
    held = load_bank(corpus, [r for r in rows if r["split"] != "train"], recipe.size, "held-out (pre-training)")
    info = pretrain(train, recipe, weights, held)
    meta.write_text(json.dumps({"key": key, "info": info}, indent=2) + "\n")
    return weights, info


def datamodule(args: argparse.Namespace, corpus: Path, held: Path, multiview: bool):
    from vidlang.data.badsamples import BadSamplePolicy
    from vidlang.data.config import LoaderConfig, SamplingConfig, TransformConfig
    from vidlang.data.datamodule import VideoDataModule

    classes = str(corpus / "classes.txt")
    return VideoDataModule(
        train={"format": "manifest", "path": str(corpus / "manifest.csv"), "split": "train"},
        test={"format": "manifest", "path": str(held), "video_root": str(corpus), "classes": classes},
        sampling=SamplingConfig(num_frames=args.frames, eval_sampler="multiview" if multiview else None,
                                eval_sampler_args={"sampler": "segment", "num_views": args.clips} if multiview else {}),
        transform=TransformConfig(image_size=32, crop_scale=(args.crop_scale, 1.0), three_crop=multiview),
        # no loader timeout, a long decode limit: no spurious skips on a busy / paused machine
        loader=LoaderConfig(batch_size=args.batch, eval_batch_size=64, num_workers=args.workers,
                            persistent_workers=args.workers > 0, pin_memory=False, timeout_s=0.0),
        bad_samples=BadSamplePolicy(decode_timeout_s=600.0), seed=args.seed,
    )  # fmt: skip


def build_task(args: argparse.Namespace, block: str, weights: Path, tok: Path, classes: list[str]):
    import pytorch_lightning as pl

    from vidlang.bench.motion.train import BLOCK_ARGS, TrainRecipe, recipe_lr_mults
    from vidlang.models.factory import ModelConfig
    from vidlang.models.temporal import BLOCKS
    from vidlang.tasks.recognition import RecognitionTask

    pl.seed_everything(args.seed, verbose=False)
    cfg = ModelConfig(image="vit_tiny", image_size=32, num_frames=args.frames, block=block,
                      block_args=BLOCK_ARGS.get(block, {}), pretrained=str(weights),
                      lr_mults=recipe_lr_mults(TrainRecipe(lr=args.lr, backbone_lr_mult=args.backbone_lr_mult),
                                               BLOCKS.get(block)))  # fmt: skip
    task = RecognitionTask(cfg, tokenizer=str(tok), class_names=classes, head={"enabled": True, "init": "random"},
                           optim={"lr": args.lr, "weight_decay": args.weight_decay, "warmup_ratio": 0.1},
                           mix={"mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0},
                           evaluation={"view_layout": (args.clips, 3), "write_plots": False})
    torch.manual_seed(args.seed + 7)  # the same head for every block
    task.head.reset_parameters()
    return task


# -- per block ---------------------------------------------------------------------------------------------
def _trainer(args: argparse.Namespace, root: Path, callbacks: list):
    import pytorch_lightning as pl

    return pl.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=True, enable_model_summary=False, limit_val_batches=0,
                      num_sanity_val_steps=0, callbacks=callbacks, default_root_dir=root)  # fmt: skip


def _callbacks(augment: LabelAwareAugment | None, trained: set[str]) -> list:
    """Optional label-aware augmentation of each training batch; records the parameters that got a gradient."""
    import pytorch_lightning as pl

    class Hooks(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if augment is not None:
                augment(batch)

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            if not trained:
                trained.update(n for n, p in pl_module.named_parameters() if p.grad is not None)

    return [Hooks()]


def evaluate(task, trainer, dm, reverse: dict[int, int], multiview: bool, clips: int, save: Path) -> dict[str, Any]:
    """Test metrics of RecognitionTask + pair / pair-blind accuracy of its fused predictions (saved to ``save``)."""
    from vidlang.eval.classification import fuse_views

    trainer.test(task, dm, verbose=False)
    m, out = dict(task.last_metrics["test"]), task.last_outputs["test"]
    probs = fuse_views(out["logits"])  # [N, K]
    m["pair_acc"] = pair_accuracy(probs, out["labels"], reverse)
    m["pair_blind_acc"] = pair_blind_accuracy(probs, out["labels"], reverse)
    torch.save(out, save)
    if multiview:
        m["crops_identical"] = crops_agree(out["logits"], clips, 3)
    return m


def run_block(block: str, args: argparse.Namespace, setup: dict) -> dict[str, Any]:
    task = build_task(args, block, setup["weights"], setup["tok"], setup["classes"])
    aug = LabelAwareAugment(setup["classes"], args.seed + 11) if args.augment else None
    (args.out / "runs" / block).mkdir(parents=True, exist_ok=True)
    trained: set[str] = set()
    trainer = _trainer(args, args.out / "runs" / block, _callbacks(aug, trained))
    t0, c0 = time.perf_counter(), _cpu()
    trainer.fit(task, datamodule(args, setup["corpus"], setup["held"], multiview=False))
    row: dict[str, Any] = {"block": block, "freeze": task.model.freeze_policy, "lr_mult": task.model.lr_mult("block"),
                           "params_added": task.model.block.extra_param_count(),
                           "trained": sum(p.numel() for n, p in task.named_parameters() if n in trained),
                           "train_s": time.perf_counter() - t0}  # fmt: skip
    for setting in SETTINGS:
        mv = setting == "multiview"
        dm = datamodule(args, setup["corpus"], setup["held"], multiview=mv)
        save = args.out / "runs" / block / f"test_{setting}_outputs.pt"
        row[setting] = evaluate(task, trainer, dm, setup["reverse"], mv, args.clips, save)
    row["wall_s"], row["cpu_s"] = time.perf_counter() - t0, _cpu() - c0
    return row


def _cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


# -- report ------------------------------------------------------------------------------------------------
def format_table(rows: list[dict], clips: int) -> str:
    """Markdown table: per block, top-1 / top-5 / mean-class / pair accuracy, single view and multi-view."""
    heads = ["block", "freezing", "params added", "params trained"]
    for label in ("1 view", f"{clips}x3 views"):
        heads += [f"top-1 {label}", f"top-5 {label}", f"mean-cls {label}", f"pair {label}", f"pair-blind {label}"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    fmt = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
    for r in rows:
        cells = [r["block"], r["freeze"], f"{r['params_added']:,}", f"{r['trained']:,}"]
        for s in SETTINGS:
            m = r[s]
            cells += [fmt(m[k]) for k in ("top1", "top5", "mean_class_acc", "pair_acc", "pair_blind_acc")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    t0, c0 = time.perf_counter(), _cpu()
    corpus, held, classes, tok = prepare(args)
    weights, pre = pretrained_tower(args, corpus)
    setup = {"corpus": corpus, "held": held, "classes": classes, "tok": tok, "weights": weights,
             "reverse": reverse_index(classes)}  # fmt: skip
    blocks = [b.strip() for b in args.blocks.split(",") if b.strip()]
    rows = []
    for block in blocks:
        rows.append(run_block(block, args, setup))
        print(json.dumps(rows[-1]), flush=True)
    n_held = rows[0]["1view"]["num_samples"]
    result = {"seed": args.seed, "budget": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "pretrain": pre, "held_out_videos": n_held, "rows": rows,
              "wall_s": time.perf_counter() - t0, "cpu_s": _cpu() - c0}  # fmt: skip
    print(f"\nseed {args.seed}; {n_held} held-out videos (val+test), 9 classes (chance: top-1 11.1, top-5 55.6, "
          f"pair 50); shared single-frame pre-training {args.pretrain_steps} steps; per block {args.steps} steps x "
          f"batch {args.batch}, {args.frames} frames at 32 px, AdamW lr {args.lr:g} (x block lr_mult, at most 5e-3) "
          f"(tower x {args.backbone_lr_mult:g}), "
          f"augment={args.augment}; multi-view = {args.clips} temporal clips x 3 crops (identical on the square "
          f"corpus: {all(r['multiview']['crops_identical'] for r in rows)})")
    print(format_table(rows, args.clips))
    print(f"total {result['wall_s']:.0f} s wall, {result['cpu_s']:.0f} s CPU")
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
