"""``vidlang bench temporal``: do the temporal blocks model time? Every block, same budget, same start.

1. The synthetic corpus (``vidlang synth``; generated with ``3 x --frames`` frames per video unless
   ``--corpus`` already holds one) is decoded once into memory at ``--size`` px. Training uses the
   ``train`` split; the held-out set is ``val`` + ``test`` (nothing is selected on it).
2. Shared start: a ``vit_tiny`` tower is pre-trained on single frames (image-level, so order-free by
   construction) to predict the shape, its colour and its geometry measured from the pixels (centroid,
   size, orientation); its projection is rescaled so frame embeddings have mean L2 norm ``embed_norm``
   (their raw scale is otherwise arbitrary) and saved; every block is then built from those weights with
   its default freezing (``freeze="auto"``) and its block parameters seeded alike.
3. Each block + a linear head on its (RMS-normalised) video embedding trains on the 9 motion classes
   for the same steps, batch, clips, data order, optimizer and schedule: every block's new parameters
   at lr x its paper's multiplier, capped at ``--max-block-lr`` (the x10 of STAN and Prompt Switch are
   ratios to CLIP-scale rates; above ~5e-3 300 AdamW steps are unstable), the pre-trained tower (when
   the block's freezing trains it) at lr x ``backbone_lr_mult`` (the papers fine-tune CLIP well below
   their new modules' lr).
   Training clips: random offsets in each of T segments, then (each with p = 0.5) time reversal,
   horizontal and vertical flips with the matching label swaps (left <-> right, ...).
4. Evaluation clips are the T segment middles, symmetric under time reversal (checked), so the eval
   clip of a video and of its reversal hold the same frames in reverse order: ``mean`` cannot
   separate a reverse pair and must sit near the 50% chance of the 2-way pair decision.

Reported per block: parameters added, parameters trained, held-out accuracy on all 9 classes, the
2-way pair accuracy (true class vs its reverse, chance 50%), whether the block is order-aware at all
(``no`` = its video embedding is unchanged, up to float noise, when the clips are played backwards: it
can only sit at chance on the pairs, by construction), 9-way accuracy on paired-class videos and
on ``static`` videos, and the fwd+bwd step time relative to ``mean``, measured round-robin after
training on one fixed batch so every block sees the same machine load.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from vidlang.bench import BENCHMARKS

SIZES = (32, 48, 64)
COLUMNS = [  # (key, header, format)
    ("block", "block", "{}"),
    ("params_added", "params added", "{:,}"),
    ("trainable", "trainable", "{:,}"),
    ("acc", "acc (9-way)", "{:.1%}"),
    ("pair_acc", "pair acc (2-way)", "{:.1%}"),
    ("order_aware", "order-aware", "{}"),
    ("paired_acc", "acc paired cls", "{:.1%}"),
    ("static_acc", "acc static", "{:.1%}"),
    ("ms_per_step", "ms/step", "{:.0f}"),
    ("rel_step", "x mean", "{:.2f}"),
    ("freeze", "freezing", "{}"),
]


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # corpus encoding workers
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _split_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    train = [r for r in rows if r["split"] == "train"]
    held = [r for r in rows if r["split"] in ("val", "test")]
    if not train or not held:
        raise ValueError(f"the corpus needs train and val/test videos; got {len(train)} train, {len(held)} held-out")
    return train, held


def time_blocks(models: dict[str, tuple], bank, indices, recipe, rounds: int) -> dict[str, float]:
    """Median fwd+bwd ms per block on one fixed batch, blocks run round-robin (same machine load)."""
    import torch

    from vidlang.bench.motion.data import clips_at
    from vidlang.bench.motion.train import motion_loss
    from vidlang.data.transforms import normalize

    videos = torch.arange(min(recipe.batch, len(bank)))
    clips = clips_at(bank, videos, indices)
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(rounds + 1):  # round 0 warms up
        for name, (model, head) in models.items():
            model.train()
            x = normalize(clips, model.image_mean, model.image_std)
            t0 = time.perf_counter()
            motion_loss(model, head, x, bank.labels[videos]).backward()
            elapsed = time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
            head.zero_grad(set_to_none=True)
            if r:
                times[name].append(elapsed)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def run_benchmark(args: argparse.Namespace, recipe, blocks: list[str], progress: bool = True) -> dict[str, Any]:
    """The whole benchmark (see module docs) -> results dict (``rows`` = one dict per block)."""
    from vidlang.bench.motion.data import ensure_corpus, eval_indices, load_bank, read_manifest
    from vidlang.bench.motion.train import (
        ORDER_TOLERANCE,
        build_block_model,
        motion_metrics,
        order_sensitivity,
        predict,
        pretrain,
        train_block,
    )

    t0, c0 = time.perf_counter(), _cpu_seconds()
    with tempfile.TemporaryDirectory(prefix="vidlang_bench_temporal_") as tmp:
        corpus = ensure_corpus(args.corpus or Path(tmp) / "corpus", args.videos, args.seed, 3 * recipe.frames, progress)
        train_rows, held_rows = _split_rows(read_manifest(corpus))
        train = load_bank(corpus, train_rows, recipe.size, "train", progress)
        held = load_bank(corpus, held_rows, recipe.size, "held-out", progress)
        idx = eval_indices(held.timestamps, held.duration, recipe.frames)  # [T], symmetric
        weights = Path(tmp) / "pretrained.safetensors"
        pre = pretrain(train, recipe, weights, held, progress)
        rows, models = [], {}
        for name in blocks:
            model, head = build_block_model(recipe, name, weights)
            info = train_block(model, head, train, recipe, f"train {name}", progress)
            metrics = motion_metrics(predict(model, head, held, idx, recipe.eval_batch), held.labels)
            sensitivity = order_sensitivity(model, held, idx, recipe.eval_batch)
            rows.append({"block": name, "freeze": model.freeze_policy, "lr_mult": model.lr_mult("block"),
                         "order_sensitivity": sensitivity, "order_aware": "yes" if sensitivity > ORDER_TOLERANCE
                         else "no", **info, **metrics})  # fmt: skip
            models[name] = (model, head)
        step_ms = time_blocks(models, train, idx, recipe, args.timing_rounds)
    for row in rows:
        row["train_ms_per_step"] = row.pop("ms_per_step")
        row["ms_per_step"] = step_ms[row["block"]]
        row["rel_step"] = step_ms[row["block"]] / step_ms["mean"]
    return {
        "benchmark": "temporal",
        "seed": recipe.seed,
        "budget": {**vars(recipe), "videos": len(train) + len(held), "train_videos": len(train),
                   "held_out_videos": len(held), "eval_frame_indices": idx.tolist(),
                   "threads": args.threads, "timing_rounds": args.timing_rounds},  # fmt: skip
        "corpus": str(args.corpus) if args.corpus else "(temporary)",
        "pretrain": pre,
        "rows": rows,
        "wall_s": time.perf_counter() - t0,
        "cpu_s": _cpu_seconds() - c0,
    }


def format_table(rows: list[dict]) -> str:
    """Markdown table of the result rows."""
    cells = [[("n/a" if row[key] is None else fmt.format(row[key])) for key, _, fmt in COLUMNS] for row in rows]
    heads = [h for _, h, _ in COLUMNS]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(heads), sep, *(line(c) for c in cells)])


def summary(result: dict) -> str:
    b, p = result["budget"], result["pretrain"]
    held = p.get("held_out_losses", {})
    return "\n".join([
        f"vidlang bench temporal: seed {result['seed']}, {b['videos']} videos ({b['train_videos']} train, "
        f"{b['held_out_videos']} held-out = val+test), T={b['frames']} frames at {b['size']}px, vit_tiny",
        f"shared pre-training: {b['pretrain_steps']} steps x {b['pretrain_frames']} single frames (shape, colour, "
        "geometry; order-free), held-out losses: " + ", ".join(f"{k} {v:.3f}" for k, v in held.items())
        + f"; frame embeddings rescaled to mean norm {b['embed_norm']:g}",
        f"budget per block: {b['steps']} steps x batch {b['batch']}, AdamW lr {b['lr']:g} "
        f"({'x block lr_mult' if b['use_block_lr_mult'] else 'every block'}, at most {b['max_block_lr']:g}; "
        f"tower x {b['backbone_lr_mult']:g}), "
        f"wd {b['weight_decay']:g}, warm-up {b['warmup']:.0%} + cosine, augment={b['augment']}; "
        f"eval frames {b['eval_frame_indices']} (symmetric)",
        f"pair acc: true class vs its time reverse (chance 50%); ms/step: fwd+bwd on one batch, round-robin, "
        f"{b['threads']} threads; order-aware: does the embedding change when the clip is reversed",
    ])  # fmt: skip


@BENCHMARKS.register("temporal")
class TemporalBench:
    help = "train every temporal block from one start on the synthetic corpus: can it tell a motion from its reverse?"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from vidlang.bench.motion.train import TrainRecipe

        d = TrainRecipe()
        parser.add_argument("--corpus", type=Path, default=None,
                            help="corpus folder: reused if it holds a manifest, else generated there (default: temp)")
        parser.add_argument("--videos", type=int, default=512, help="videos to generate (ignored when reusing)")
        parser.add_argument("--seed", type=int, default=d.seed)
        parser.add_argument("--steps", type=int, default=d.steps, help="training steps per block")
        parser.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps)
        parser.add_argument("--batch", type=int, default=d.batch)
        parser.add_argument("--lr", type=float, default=d.lr)
        parser.add_argument("--no-block-lr-mult", action="store_true",
                            help="new parameters at lr, not lr x the paper multiplier (x10: stan, prompt_switch)")
        parser.add_argument("--max-block-lr", type=float, default=d.max_block_lr, help="cap of the blocks' lr")
        parser.add_argument("--backbone-lr-mult", type=float, default=d.backbone_lr_mult,
                            help="lr multiplier of the pre-trained tower for blocks that fine-tune it")
        parser.add_argument("--frames", type=int, default=d.frames)
        parser.add_argument("--size", type=int, default=d.size, choices=SIZES)
        parser.add_argument("--blocks", default=None, help="comma-separated block names (default: all registered)")
        parser.add_argument("--no-augment", action="store_true", help="no time-reversal / flip augmentation")
        parser.add_argument("--threads", type=int, default=2)
        parser.add_argument("--timing-rounds", type=int, default=5)
        parser.add_argument("--json", type=Path, default=None, help="write the results here")
        parser.add_argument("--no-progress", action="store_true")  # fmt: skip

    def run(self, args: argparse.Namespace) -> int:
        import torch

        from vidlang.bench.motion.train import TrainRecipe
        from vidlang.models.temporal import BLOCKS

        torch.set_num_threads(args.threads)
        blocks = list(BLOCKS.names()) if args.blocks is None else [b.strip() for b in args.blocks.split(",") if b]
        unknown = [b for b in blocks if b not in BLOCKS.names()]
        if unknown:
            raise SystemExit(f"unknown blocks {unknown}; registered: {', '.join(BLOCKS.names())}")
        blocks = ["mean"] + [b for b in dict.fromkeys(blocks) if b != "mean"]  # mean is the reference
        recipe = TrainRecipe(frames=args.frames, size=args.size, steps=args.steps, pretrain_steps=args.pretrain_steps,
                             batch=args.batch, lr=args.lr, backbone_lr_mult=args.backbone_lr_mult,
                             use_block_lr_mult=not args.no_block_lr_mult, max_block_lr=args.max_block_lr,
                             seed=args.seed,
                             augment=not args.no_augment)  # fmt: skip
        result = run_benchmark(args, recipe, blocks, progress=not args.no_progress)
        print(summary(result))
        print(format_table(result["rows"]))
        print(f"total {result['wall_s']:.0f} s wall, {result['cpu_s']:.0f} s CPU")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            from vidlang.io import atomic_write_text

            atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
        return 0
