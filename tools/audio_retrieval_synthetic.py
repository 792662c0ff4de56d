"""Audio-visual fusion for text->video retrieval on the synthetic corpus: the same tiny model with and without audio.

Generates a synthetic corpus (``vidlang.data.synthetic``: coloured shapes doing a motion, each with a sound --
low tone, high tone, beeping or silence, half of the silent ones without any audio track -- and captions that
name shape, colour, motion and sound), then trains a randomly initialised ``vit_tiny`` retrieval model
(:class:`~vidlang.tasks.retrieval.RetrievalTask`, the corpus tokenizer) twice for the same number of steps, with
the same seed (identical tower initialisation and data order): video only, and video + audio (audio decoded at
16 kHz, log-mel on the device, a small spectrogram ViT + audio Q-former, ``gated_sum`` fusion).

Evaluation, text -> video:

(a) **all captions**: every caption of the test split against all test videos (R@1 / R@5).
(b) **sound-dependent queries**: each test video is re-rendered with each of the four sounds (same spec, so the
    frames are identical; captions regenerated for the new sound). A *group* is the four sound variants of one
    test video: they share shape, colour, motion, background and distractor and differ only in sound (the
    silent variant has no audio track in every other group). Every caption of every variant is a query; its
    gallery is its own group (4 videos), so only the sound can pick the target: chance R@1 = 25 %. We also
    report R@1 / R@5 with the gallery = all variants of all groups pooled. Ties (a video-only model gives the
    four variants the same embedding) are counted as a random order: a query whose target ties with k other
    videos and is beaten by h counts ``clip((K - h) / (k + 1), 0, 1)`` towards R@K.

    python tools/audio_retrieval_synthetic.py --videos 256 --steps 300 --batch 16
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

SOUND_DEFINITION = (
    "sound-dependent queries: each test video re-rendered with each of the 4 sounds (identical frames); a query is "
    "any caption of a variant; gallery = its group of 4 variants (chance R@1 25%) or all variants pooled; ties "
    "count as a random order"
)
VARIANT_COLUMNS = ["key", "path", "split", "captions", "group", "sound", "has_audio"]
TINY_AUDIO = {  # a small spectrogram ViT over one 1-s segment of 64 mel bins (98 frames, padded to 100)
    "backbone": "vit",
    "backbone_args": {"width": 64, "layers": 2, "heads": 4, "patch_size": 16, "stride": 16, "num_mel_bins": 64,
                      "frames": 100},
    "num_queries": 4,
    "qformer_layers": 1,
    "qformer_heads": 4,
    "max_segments": 1,
}
TINY_FRONTEND = {"num_segments": 1, "segment_seconds": 1.0, "num_mel_bins": 64, "target_frames": 100}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/vidlang_audio_retrieval", help="work directory")
    p.add_argument("--videos", type=int, default=256)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--fps", type=float, default=8.0, help="corpus fps (frames / fps = clip seconds)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-mult-audio", type=float, default=3.0, help="lr multiplier of the audio branch + fusion")
    p.add_argument("--workers", type=int, default=1, help="data-loader workers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--symile", action="store_true",
                   help="add a third run: audio as its own modality, trained with the Symile loss (fusion symile)")
    return p.parse_args(argv)


# -- data ------------------------------------------------------------------------------------------------
def prepare_corpus(out: Path, videos: int, seed: int, size: int, frames: int, fps: float) -> Path:
    """The synthetic corpus in ``out/corpus`` (reused when its manifest already has ``videos`` rows)."""
    from vidlang.data.synthetic import generate_corpus

    corpus = out / "corpus"
    manifest = corpus / "manifest.csv"
    if not manifest.is_file() or sum(1 for _ in open(manifest)) != videos + 1:
        generate_corpus(corpus, videos, seed=seed, size=size, frames=frames, fps=fps, workers=2)
    return corpus


def sound_variant(spec: Any, sound: str, group: int) -> Any:
    """``spec`` with ``sound`` (frames unchanged); captions regenerated with a per-group random state."""
    import numpy as np

    from vidlang.data.synthetic.captions import make_captions
    from vidlang.data.synthetic.spec import BEEP_RATES, TONES

    new = spec
    if sound != spec.sound:
        tones = TONES[sound]
        has_audio = group % 2 == 0 if sound == "silence" else True  # every other silent variant has no track
        new = replace(spec, sound=sound, has_audio=has_audio, tone_hz=tones[group % len(tones)],
                      beep_hz=BEEP_RATES[group % len(BEEP_RATES)] if sound == "beeping" else 0.0,
                      key=f"{spec.key}_{sound}")
    # the same phrase choices for the whole group: the four variants' captions differ only in the sound phrase
    return replace(new, captions=tuple(make_captions(new, np.random.default_rng([spec.index, group]))))


def make_variants(out: Path, base: list[Any], splits: list[str] | None = None) -> Path:
    """Encode the four sound variants of every spec of ``base`` (group g = ``base[g]``, split ``splits[g]``,
    default "test") into ``out`` and write ``out/manifest.csv``."""
    from tqdm.auto import tqdm

    from vidlang.data.synthetic import SOUNDS, encode_video, render_video

    if not base:
        raise ValueError("no videos to make sound variants of")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for group, spec in enumerate(tqdm(base, desc="sound variants", unit="group")):
        frames = render_video(spec)  # [T, H, W, 3], shared by the four variants
        for sound in SOUNDS:
            v = sound_variant(spec, sound, group)
            rel = f"videos/{v.key}.mp4"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            encode_video(v, out / rel, frames)
            rows.append({"key": v.key, "path": rel, "split": splits[group] if splits else "test",
                         "captions": json.dumps(list(v.captions)), "group": group, "sound": sound,
                         "has_audio": str(v.has_audio).lower()})
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=VARIANT_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return out / "manifest.csv"


def datamodule(train: str | None, test: str, frames: int, size: int, batch: int, workers: int, seed: int,
               audio: bool) -> Any:
    """Manifest splits -> :class:`VideoDataModule` (audio decoded at 16 kHz when ``audio``)."""
    from vidlang.data.config import DecodeConfig, LoaderConfig, SamplingConfig, TransformConfig
    from vidlang.data.datamodule import VideoDataModule

    def split(path: str, name: str) -> dict:
        return {"format": "manifest", "path": path, "split": name}

    return VideoDataModule(train=split(train, "train") if train else None, test=split(test, "test"),
                           sampling=SamplingConfig(num_frames=frames),
                           transform=TransformConfig(image_size=size, crop_scale=(0.8, 1.0)),
                           loader=LoaderConfig(batch_size=batch, eval_batch_size=64, num_workers=workers,
                                               persistent_workers=workers > 0, pin_memory=False),
                           decode=DecodeConfig(audio=audio, audio_sample_rate=16000), seed=seed)


# -- model -----------------------------------------------------------------------------------------------
def make_task(tokenizer: str, frames: int, lr: float, audio: bool, seed: int, **task_args: Any) -> Any:
    """A from-scratch ``vit_tiny`` RetrievalTask; the towers are built first, so both variants share them."""
    import pytorch_lightning as pl

    from vidlang.models.audio import AudioConfig
    from vidlang.models.factory import ModelConfig
    from vidlang.tasks.retrieval import RetrievalTask

    pl.seed_everything(seed, verbose=False)
    # context 32 (the corpus tokenizer's): at 24 tokens the trailing sound clause of long captions is cut off
    cfg = ModelConfig(image="vit_tiny", num_frames=frames, block="mean", freeze="full", context_length=32)
    extra = dict(audio=AudioConfig(**TINY_AUDIO), fusion="gated_sum", audio_frontend=TINY_FRONTEND) if audio else {}
    args = dict(optim={"lr": lr, "weight_decay": 0.05, "warmup_ratio": 0.1},
                evaluation={"dsl": False, "write_plots": False})
    return RetrievalTask(cfg, tokenizer=tokenizer, **{**args, **extra, **task_args})


def trainer(steps: int, root: Path) -> Any:
    import pytorch_lightning as pl

    return pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      num_sanity_val_steps=0, default_root_dir=root)


# -- sound-dependent evaluation --------------------------------------------------------------------------
@torch.no_grad()
def embed(task: Any, loader: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Video ``[N, E]``, caption ``[A, E]`` embeddings (normalised), ``owner [A]`` and the N keys."""
    import torch.nn.functional as F

    task.eval()
    videos, texts, owner, keys = [], [], [], []
    for batch in loader:
        batch = task.on_after_batch_transfer(batch, 0)
        mel, mask = (batch["audio_mel"], batch["audio_mel_mask"]) if task.frontend is not None else (None, None)
        offset = sum(v.shape[0] for v in videos)
        videos.append(task.encode_video(batch["video"], mel, mask))
        ids, att = task.tokenize(list(batch["captions"]))
        texts.append(F.normalize(task.model.encode_text(ids, att).embeds, dim=-1))
        owner.append(batch["caption_index"] + offset)
        keys += list(batch["key"])
    return torch.cat(videos), torch.cat(texts), torch.cat(owner), keys


def tie_aware_recall(sim: torch.Tensor, target: torch.Tensor, gallery: torch.Tensor, ks: tuple[int, ...],
                     tol: float = 1e-6) -> dict[int, float]:
    """R@K (%) of ``sim [A, N]`` with target column ``target [A]``, each query restricted to the columns where
    ``gallery [A, N]`` is True; ties (within ``tol``) count as a uniformly random order."""
    gt = sim.gather(1, target[:, None])  # [A, 1]
    higher = ((sim > gt + tol) & gallery).sum(1).float()  # [A]
    tied = ((sim - gt).abs() <= tol).logical_and(gallery).sum(1).float()  # [A], includes the target
    return {k: float(((k - higher) / tied).clamp(0, 1).mean() * 100) for k in ks}


def sound_dependent_metrics(task: Any, loader: Any, group_of: dict[str, int]) -> dict[str, float]:
    """In-group R@1 (4 sound variants, chance 25 %) and pooled R@1/R@5 over all variants (module docstring)."""
    video, text, owner, keys = embed(task, loader)
    groups = torch.tensor([group_of[k] for k in keys])  # [N]
    sim = text @ video.T  # [A, N]
    in_group = groups[None, :] == groups[owner][:, None]  # [A, N]
    pooled = torch.ones_like(in_group)
    r_group = tie_aware_recall(sim, owner, in_group, (1,))
    r_pool = tie_aware_recall(sim, owner, pooled, (1, 5))
    return {"group_R@1": r_group[1], "pooled_R@1": r_pool[1], "pooled_R@5": r_pool[5], "queries": len(owner),
            "groups": int(groups.unique().numel()), "gallery": len(keys)}


def read_groups(manifest: Path) -> dict[str, int]:
    with open(manifest, newline="", encoding="utf-8") as f:
        return {row["key"]: int(row["group"]) for row in csv.DictReader(f)}


# -- runs ------------------------------------------------------------------------------------------------
RUNS = {"video only": {}, "video + audio (gated_sum)": {"fusion": "gated_sum"},
        "video + audio (Symile loss)": {"fusion": "symile", "contrastive": {"loss": "symile"}}}


def run(name: str, corpus: Path, variants: Path, args: argparse.Namespace) -> dict[str, Any]:
    import hashlib

    audio = name != "video only"
    extra = {"lr_mult_audio": args.lr_mult_audio, **RUNS[name]} if audio else {}
    task = make_task(str(corpus / "tokenizer"), args.frames, args.lr, audio, args.seed, **extra)
    towers = hashlib.sha1(b"".join(p.detach().numpy().tobytes() for p in task.video_text.parameters()))
    root = Path(args.out) / "runs" / name.replace(" ", "_")
    tr = trainer(args.steps, root)
    manifest = str(corpus / "manifest.csv")
    t0 = time.perf_counter()
    tr.fit(task, datamodule(manifest, manifest, args.frames, args.size, args.batch, args.workers, args.seed, audio))
    train_s = time.perf_counter() - t0
    tr.test(task, datamodule(None, manifest, args.frames, args.size, args.batch, args.workers, args.seed, audio),
            verbose=False)
    m = task.last_metrics["test"]
    dm = datamodule(None, str(variants), args.frames, args.size, args.batch, 0, args.seed, audio)
    dm.setup("test")
    sound = sound_dependent_metrics(task, dm.test_dataloader(), read_groups(variants))
    return {"model": name, "init": towers.hexdigest()[:10],
            "all_R@1": m["t2v_R@1"], "all_R@5": m["t2v_R@5"], "test_videos": int(m["num_videos"]),
            "test_captions": int(m["num_texts"]), **{f"sound_{k}": v for k, v in sound.items()}, "train_s": train_s}


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    r0 = rows[0]
    print(f"\nseed {args.seed}; {args.videos} videos {args.size}x{args.size}, {args.frames} frames at {args.fps:g} "
          f"fps; budget {args.steps} steps x batch {args.batch}, lr {args.lr}")
    print(f"(a) all captions: {r0['test_captions']} captions x {r0['test_videos']} test videos")
    print(f"(b) {SOUND_DEFINITION}: {r0['sound_queries']} queries, {r0['sound_groups']} groups, "
          f"{r0['sound_gallery']} videos")
    print("| model | all R@1 | all R@5 | sound in-group R@1 (chance 25) | sound pooled R@1 | sound pooled R@5 "
          "| train s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['all_R@1']:.1f} | {r['all_R@5']:.1f} | {r['sound_group_R@1']:.1f} "
              f"| {r['sound_pooled_R@1']:.1f} | {r['sound_pooled_R@5']:.1f} | {r['train_s']:.0f} |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    from vidlang.data.synthetic import make_specs

    t0 = time.perf_counter()
    out = Path(args.out)
    corpus = prepare_corpus(out, args.videos, args.seed, args.size, args.frames, args.fps)
    specs = make_specs(args.videos, args.seed, size=args.size, frames=args.frames, fps=args.fps)
    variants = make_variants(out / "sound_variants", [s for s in specs if s.split == "test"])
    print(SOUND_DEFINITION, flush=True)
    rows = []
    for name in list(RUNS)[: 3 if args.symile else 2]:
        rows.append(run(name, corpus, variants, args))
        print(json.dumps(rows[-1]), flush=True)
    print_table(rows, args)
    print(f"total {time.perf_counter() - t0:.0f} s")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "definition": SOUND_DEFINITION,
                                                  "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
