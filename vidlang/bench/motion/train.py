"""Training side of ``vidlang bench temporal``: shared pre-training, per-block training, evaluation.

One recipe for every block (:class:`TrainRecipe`): AdamW, linear warm-up then cosine decay, the same
steps, batch, clips and data order; every block's new parameters at ``lr x`` its paper's multiplier
(x10 for STAN's branch and Prompt Switch's modules), capped at ``max_block_lr``: those multipliers are
ratios to CLIP fine-tuning rates of 1e-6..1e-5, and at 1e-2 300 AdamW steps are unstable (measured:
STAN 58.7 % pair accuracy at 1e-2, 86-91 % at 5e-3); the pre-trained tower (if the block's freezing,
``ModelConfig.freeze="auto"``, trains it) at ``lr x backbone_lr_mult``. The classifier is a linear head
on the RMS-normalised video embedding (``sqrt(E) * v / |v|``), trained at the base lr; the block's auxiliary
losses are added with its ``default_aux_weights`` (1.0 for unlisted ones).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vidlang.bench.motion.data import ClipBank, augment, clips_at, frame_moments, pair_members, train_indices
from vidlang.data.synthetic.spec import COLORS, MOTIONS, SHAPES
from vidlang.data.transforms import normalize
from vidlang.losses.aux import weigh_aux_losses
from vidlang.models.contract import TemporalBlock
from vidlang.models.factory import ModelConfig, build_model
from vidlang.models.optim import join
from vidlang.models.temporal import BLOCKS
from vidlang.models.video_clip import VideoTextModel
from vidlang.tasks.schedule import warmup_cosine

IMAGE = "vit_tiny"


@dataclass
class TrainRecipe:
    """The budget every block gets (and the shared pre-training's)."""

    frames: int = 8  # T
    size: int = 32  # image size (patch 8)
    steps: int = 300  # per block
    pretrain_steps: int = 1000
    batch: int = 32
    lr: float = 1e-3  # new (block) parameters
    backbone_lr_mult: float = 0.1  # pre-trained tower, when the block's freezing trains it: lr x this
    use_block_lr_mult: bool = True  # new parameters at lr x the block's paper multiplier (else at lr) ...
    max_block_lr: float = 5e-3  # ... but never above this
    pretrain_lr: float = 2e-3
    pretrain_frames: int = 128  # single frames per pre-training step
    weight_decay: float = 0.01
    embed_norm: float = 1.0  # mean L2 norm of the pre-trained tower's frame embeddings (projection rescaled)
    warmup: float = 0.1  # fraction of steps
    seed: int = 0
    eval_batch: int = 64
    augment: bool = True  # time reversal + flips with the matching label swaps (see motion.data.augment)


# recognition has no captions: blocks whose auxiliary head needs them run without it (as in configs/recognition/)
BLOCK_ARGS: dict[str, dict] = {"prompt_switch": {"caption": False}}


def recipe_lr_mults(recipe: TrainRecipe, block: type[TemporalBlock]) -> dict[str, float]:
    """``ModelConfig.lr_mults`` under ``recipe``: the tower at ``backbone_lr_mult``, each of the block's declared
    multipliers (the paper's, or 1 without ``use_block_lr_mult``) capped at ``max_block_lr``."""
    cap = recipe.max_block_lr / recipe.lr
    own = {join("block", p): min(m if recipe.use_block_lr_mult else 1.0, cap) for p, m in block.lr_mults.items()}
    return {"": recipe.backbone_lr_mult, **own}


def model_config(recipe: TrainRecipe, block: str, pretrained: str | None = None) -> ModelConfig:
    return ModelConfig(
        image=IMAGE, image_size=recipe.size, num_frames=recipe.frames, block=block, pretrained=pretrained,
        block_args=BLOCK_ARGS.get(block, {}), lr_mults=recipe_lr_mults(recipe, BLOCKS.get(block)),
    )


def rms_embed(embeds: Tensor) -> Tensor:
    """``[B, E]`` -> ``sqrt(E) * v / |v|`` (unit RMS), the classifier's input."""
    return F.normalize(embeds.float(), dim=-1) * math.sqrt(embeds.shape[-1])


def schedule(opt: torch.optim.Optimizer, steps: int, warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    """The tasks' linear warm-up + cosine decay to 0 (:func:`vidlang.tasks.schedule.warmup_cosine`) over ``steps``,
    warming up for ``warmup`` of them (at least one step)."""
    return warmup_cosine(opt, max(1, round(steps * warmup)), steps)


def batch_order(n: int, steps: int, batch: int, seed: int) -> tuple[list[Tensor], list[Tensor]]:
    """The shared data order: video ids ``[batch]`` and frame-index generator draws, per step."""
    g = torch.Generator().manual_seed(seed)
    ids, perm = [], torch.randperm(n, generator=g)
    while len(ids) < steps:
        if perm.numel() < batch:
            perm = torch.cat([perm, torch.randperm(n, generator=g)])
        ids.append(perm[:batch])
        perm = perm[batch:]
    return ids, [torch.Generator().manual_seed(seed * 100_003 + s) for s in range(steps)]


def train_batch(
    bank: ClipBank, videos: Tensor, generator: torch.Generator, recipe: TrainRecipe
) -> tuple[Tensor, Tensor]:
    """Training clips ``uint8 [B, T, 3, S, S]`` (random segment offsets, augmented) and motion labels ``[B]``."""
    clips = clips_at(bank, videos, train_indices(bank, recipe.frames, len(videos), generator))
    if not recipe.augment:
        return clips, bank.labels[videos]
    return augment(clips, bank.labels[videos], generator)


# -- shared pre-training ------------------------------------------------------------------------------------
def frame_batch(bank: ClipBank, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``count`` random single frames ``uint8 [M, 3, S, S]`` (random flips) and their video ids ``[M]``."""
    videos = torch.randint(len(bank), (count,), generator=generator)
    frames = bank.frames[videos, torch.randint(bank.frames.shape[1], (count,), generator=generator)]
    for dim in (-1, -2):  # flips change the geometry targets, which are measured after them
        pick = torch.rand(count, generator=generator) < 0.5
        frames[pick] = frames[pick].flip(dim)
    return frames, videos


def _pretrain_losses(model: VideoTextModel, heads: nn.ModuleDict, bank: ClipBank, frames: Tensor, videos: Tensor):
    z = rms_embed(model.encode_image(normalize(frames, model.image_mean, model.image_std)))  # [M, E]
    geometry = frame_moments(frames, bank.rgb[videos])  # [M, 5]
    return {
        "shape": F.cross_entropy(heads["shape"](z), bank.shapes[videos]),
        "color": F.cross_entropy(heads["color"](z), bank.colors[videos]),
        "geometry": 30 * F.mse_loss(heads["geometry"](z), geometry),
    }


def pretrain(
    bank: ClipBank, recipe: TrainRecipe, out: Path, held: ClipBank | None = None, progress: bool = True
) -> dict:
    """Image-level pre-training of the tower on single frames (order-free by construction); save to ``out``.

    Targets per frame: the primary shape's class and colour, and its geometry measured from the pixels
    (centroid, size, orientation: :func:`frame_moments`), so the frame features encode where the shape
    is and how it lies -- what a temporal block needs to compare across frames.
    """
    from safetensors.torch import save_file

    from vidlang.progress import progress as tqdm  # a live bar on a terminal, lines in a log

    torch.manual_seed(recipe.seed)
    model = build_model(model_config(recipe, "mean")).train()
    e = model.embed_dim
    heads = nn.ModuleDict({"shape": nn.Linear(e, len(SHAPES)), "color": nn.Linear(e, len(COLORS)),
                           "geometry": nn.Linear(e, 5)})  # fmt: skip
    params = [p for n, p in model.named_parameters() if n.startswith("image_tower.")] + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.pretrain_lr, weight_decay=recipe.weight_decay)
    sched = schedule(opt, recipe.pretrain_steps, recipe.warmup)
    g = torch.Generator().manual_seed(recipe.seed + 1)
    t0, last = time.perf_counter(), {}
    for _ in tqdm(range(recipe.pretrain_steps), desc="pre-train (single frames)", disable=not progress):
        losses = _pretrain_losses(model, heads, bank, *frame_batch(bank, recipe.pretrain_frames, g))
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()
        sched.step()
        last = {k: round(x.item(), 4) for k, x in losses.items()}
    info = {"steps": recipe.pretrain_steps, "seconds": time.perf_counter() - t0, "final_losses": last,
            "embed_scale": calibrate_embed_norm(model, bank, recipe.embed_norm, recipe.seed + 4)}  # fmt: skip
    from vidlang.io import atomic_path

    with atomic_path(out) as tmp:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    if held is not None:  # held-out losses of the heads, to show the features are useful
        model.eval()
        with torch.no_grad():
            frames, videos = frame_batch(held, 512, torch.Generator().manual_seed(recipe.seed + 3))
            info["held_out_losses"] = {k: round(x.item(), 4) for k, x in
                                       _pretrain_losses(model, heads, held, frames, videos).items()}  # fmt: skip
    return info


@torch.no_grad()
def calibrate_embed_norm(model: VideoTextModel, bank: ClipBank, target: float, seed: int, count: int = 512) -> float:
    """Rescale the tower's projection so its frame embeddings have mean L2 norm ``target``; returns the factor.

    The pre-training reads the embedding through :func:`rms_embed`, so its raw scale is left arbitrary
    (wherever the optimiser drifted). Blocks that add learned vectors to the frame embeddings (CLIP4Clip's
    frame position embedding, initialised at ~0.01) see them relative to that scale; fixing it makes the
    start the same for every seed and run length. Directions, hence every cosine, are unchanged.
    """
    model.eval()
    frames, _ = frame_batch(bank, count, torch.Generator().manual_seed(seed))
    norms = model.encode_image(normalize(frames, model.image_mean, model.image_std)).norm(dim=-1)  # [M]
    factor = target / norms.mean().item()
    model.image_tower.proj.mul_(factor)
    return factor


# -- per-block training -----------------------------------------------------------------------------------
def build_block_model(recipe: TrainRecipe, block: str, pretrained: Path) -> tuple[VideoTextModel, nn.Linear]:
    """The block's model from the shared weights (block params seeded by ``recipe.seed``) + a seeded head."""
    torch.manual_seed(recipe.seed)
    model = build_model(model_config(recipe, block, str(pretrained)))
    torch.manual_seed(recipe.seed + 7)
    head = nn.Linear(model.embed_dim, len(MOTIONS))
    return model, head


def _optimizer(model: VideoTextModel, head: nn.Linear, recipe: TrainRecipe) -> torch.optim.Optimizer:
    for p in model.text_tower.parameters():  # the text tower is not used by this benchmark
        p.requires_grad_(False)
    model.logit_scale.requires_grad_(False)
    groups = model.param_groups(recipe.lr, recipe.weight_decay)  # the recipe's lr_mults (model_config)
    groups.append({"name": "head", "params": list(head.parameters()), "lr": recipe.lr,
                   "weight_decay": recipe.weight_decay})  # fmt: skip
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.98))


def motion_loss(model: VideoTextModel, head: nn.Linear, clips: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of the head on the RMS-normalised video embedding + the block's weighted aux losses."""
    out = model.encode_video(clips)
    loss = F.cross_entropy(head(rms_embed(out.embeds)), labels)
    aux, _ = weigh_aux_losses(out.aux_losses, model.block.default_aux_weights)
    return loss if aux is None else loss + aux


def train_block(
    model: VideoTextModel, head: nn.Linear, bank: ClipBank, recipe: TrainRecipe, desc: str, progress: bool = True
) -> dict:
    """Train ``model`` + ``head`` on the motion labels; returns timing and parameter counts."""
    from vidlang.progress import progress as tqdm  # a live bar on a terminal, lines in a log

    model.train()
    opt = _optimizer(model, head, recipe)
    sched = schedule(opt, recipe.steps, recipe.warmup)
    ids, gens = batch_order(len(bank), recipe.steps, recipe.batch, recipe.seed + 2)
    wall, cpu, updated = [], [], set()
    for step in tqdm(range(recipe.steps), desc=desc, disable=not progress):
        clips, labels = train_batch(bank, ids[step], gens[step], recipe)
        clips = normalize(clips, model.image_mean, model.image_std)
        t0, c0 = time.perf_counter(), time.process_time()
        loss = motion_loss(model, head, clips, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            updated = {n for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        sched.step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"{desc}: loss became {value} at step {step}")
    skip = min(5, len(wall) - 1)  # warm-up steps
    params = dict(model.named_parameters())
    return {
        "ms_per_step": 1e3 * statistics.median(wall[skip:]),
        "cpu_ms_per_step": 1e3 * statistics.median(cpu[skip:]),
        "final_loss": value,
        "params_added": model.block.extra_param_count(),
        "trainable": sum(params[n].numel() for n in updated) + sum(p.numel() for p in head.parameters()),
    }


# -- evaluation --------------------------------------------------------------------------------------------
@torch.no_grad()
def embed_videos(model: VideoTextModel, bank: ClipBank, indices: Tensor, batch: int) -> Tensor:
    """Video embeddings ``[V, E]`` of every video of ``bank`` at the fixed eval frame ``indices [T]``."""
    model.eval()
    out = []
    for start in range(0, len(bank), batch):
        v = torch.arange(start, min(start + batch, len(bank)))
        clips = normalize(clips_at(bank, v, indices), model.image_mean, model.image_std)
        out.append(model.encode_video(clips).embeds)
    return torch.cat(out)


@torch.no_grad()
def predict(model: VideoTextModel, head: nn.Linear, bank: ClipBank, indices: Tensor, batch: int) -> Tensor:
    """Logits ``[V, classes]`` of every video of ``bank`` at the fixed eval ``indices [T]``."""
    return head(rms_embed(embed_videos(model, bank, indices, batch)))


ORDER_TOLERANCE = 1e-5  # relative embedding change under time reversal below this = order-free (float noise)


@torch.no_grad()
def order_sensitivity(model: VideoTextModel, bank: ClipBank, indices: Tensor, batch: int) -> float:
    """Mean relative change ``|v(x) - v(reverse(x))| / |v(x)|`` of the video embedding when the eval clips of
    the first ``batch`` videos of ``bank`` are played backwards. 0 (up to float noise): the block cannot see
    frame order at all, by construction (e.g. per-frame processing, then a mean)."""
    model.eval()
    videos = torch.arange(min(batch, len(bank)))
    clips = normalize(clips_at(bank, videos, indices), model.image_mean, model.image_std)  # [B, T, 3, S, S]
    fwd, bwd = model.encode_video(clips).embeds, model.encode_video(clips.flip(1)).embeds  # [B, E]
    return ((fwd - bwd).norm(dim=-1) / fwd.norm(dim=-1).clamp_min(1e-12)).mean().item()


def _mean_or_none(values: Tensor) -> float | None:
    return values.float().mean().item() if values.numel() else None


def motion_metrics(logits: Tensor, labels: Tensor) -> dict[str, float | int | None]:
    """Accuracy on all classes, 2-way pair accuracy, accuracy on paired classes and on ``static``.

    ``pair_acc``: for each video of a paired class, does its class score beat its reverse's (chance 50%)?
    A metric without any video to measure it (e.g. no ``static`` video held out) is ``None``.
    """
    if logits.shape[0] != labels.shape[0] or not labels.numel():
        raise ValueError(f"need one logit row per label, got {tuple(logits.shape)} for {labels.numel()} labels")
    pred = logits.argmax(-1)
    correct = pred == labels
    reverse = dict(pair_members())
    paired = torch.tensor([int(y) in reverse for y in labels], dtype=torch.bool)
    static = labels == MOTIONS.index("static")
    rev = torch.tensor([reverse.get(int(y), int(y)) for y in labels])
    rows = torch.arange(len(labels))
    two_way = logits[rows, labels] > logits[rows, rev]  # the true member beats its reverse (ties lose)
    return {
        "acc": _mean_or_none(correct),
        "pair_acc": _mean_or_none(two_way[paired]),
        "paired_acc": _mean_or_none(correct[paired]),
        "static_acc": _mean_or_none(correct[static]),
        "n_eval": len(labels),
        "n_paired": int(paired.sum()),
        "n_static": int(static.sum()),
    }
