"""``embed``: one embedding run -- plan, Lightning predict on every rank, manifest (docs/embeddings.md)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from vidlang.data.badsamples import BadSamplePolicy
from vidlang.data.config import DecodeConfig, LoaderConfig, SamplingConfig, TransformConfig
from vidlang.data.sample import VideoEntry
from vidlang.embed.module import EmbedModule, Encoder, load_encoder
from vidlang.embed.plan import ShardPlan, check_run, data_fingerprint, unique_ids
from vidlang.errors import ConfigError

TRAINER_DEFAULTS: dict[str, Any] = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False}


def clip_settings(encoder: Encoder, sampling: SamplingConfig | None, transform: TransformConfig | None,
                  decode: DecodeConfig | None) -> tuple[SamplingConfig, TransformConfig, DecodeConfig]:
    """The data config's groups, defaulting to the checkpoint's clip: its inference frames (segment sampler),
    its image size (short-side resize while decoding, centre crop) and audio when the model fuses audio."""
    sampling = sampling or SamplingConfig(num_frames=encoder.num_frames)
    transform = transform or TransformConfig(image_size=encoder.image_size)
    decode = decode or DecodeConfig(resize_short_side=transform.image_size)
    if encoder.audio_model is not None and not decode.audio:
        decode = replace(decode, audio=True)
    return sampling, transform, decode


def embed(
    ckpt: str | os.PathLike | Encoder,
    out: str | os.PathLike,
    entries: Sequence[VideoEntry],
    *,
    video: bool = True,
    text: bool = False,
    dtype: str = "float16",
    shard_size: int = 1000,
    sampling: SamplingConfig | None = None,
    transform: TransformConfig | None = None,
    loader: LoaderConfig | None = None,
    decode: DecodeConfig | None = None,
    bad_samples: BadSamplePolicy | None = None,
    trainer: dict[str, Any] | None = None,
    callbacks: Sequence[Any] = (),
    progress: bool = True,
    data_name: str = "",
    seed: int = 0,
) -> Any:
    """Embed ``entries`` with a checkpoint into the embeddings folder ``out``; returns it opened
    (:class:`~vidlang.embeddings.EmbeddingsDir`) on global rank 0, None on the other ranks.

    ``trainer``: ``pl.Trainer`` arguments (``devices``, ``num_nodes``, ``accelerator``, ``strategy``, ...): each
    rank embeds its share of the shards and writes them. A folder holding part of the same run is continued
    (finished shards kept, the rest redone); one holding another run is refused (:mod:`vidlang.embed.plan`)."""
    import pytorch_lightning as pl
    import torch

    from vidlang.embed.data import EmbedDataModule
    from vidlang.embed.writer import ShardWriter, finish

    if dtype not in ("float16", "float32"):
        raise ConfigError(f"--dtype must be float16 or float32, got {dtype!r}")
    if not entries:
        raise ConfigError("nothing to embed: no entries")
    encoder = ckpt if isinstance(ckpt, Encoder) else load_encoder(ckpt)
    module = EmbedModule(encoder, video=video, text=text)
    sampling, transform, decode = clip_settings(encoder, sampling, transform, decode)
    loader = loader or LoaderConfig()
    policy = replace(bad_samples or BadSamplePolicy())
    keys, paths = [e.key for e in entries], [e.path for e in entries]
    if text:
        bare = next((e for e in entries if not e.captions), None)
        if bare is not None:
            raise ConfigError(f"--text: entry {bare.key} ({bare.path}) has no caption; text embeddings need one per "
                              "entry (embed video only, or fix the data)")
    plan = ShardPlan(len(entries), shard_size)
    columns = {"embedding": "video" if video else "text", **({"text_embedding": "text"} if video and text else {})}
    protocol = {"data": data_name, "frames": sampling.frames(False), "sampler": sampling.eval_sampler or
                sampling.sampler, "image_size": transform.image_size, "three_crop": transform.three_crop,
                "audio": encoder.audio_model is not None, "caption": "first"} if video else {"data": data_name}
    run = {"checkpoint_sha256": encoder.info.checkpoint_sha256, "entries": len(entries),
           "data_sha256": data_fingerprint(keys, paths), "shard_size": shard_size, "dtype": dtype,
           "columns": columns, "protocol": protocol}
    out = Path(out)
    if (out / "run.json").is_file():  # every rank: a foreign folder fails here, before any collective
        check_run(out, run)
    policy.report_dir = policy.report_dir or str(out / "bad_samples")
    data = EmbedDataModule(entries, plan, out, sampling, transform, loader, decode, policy, video=video, seed=seed)
    data.run = run  # written by rank 0 before it lists the finished shards
    writer = ShardWriter(out, plan, unique_ids(keys), paths, [e.captions[0] if e.captions else None for e in entries],
                         encoder.info, columns, int(encoder.model.embed_dim), dtype)
    kw = {**TRAINER_DEFAULTS, "enable_progress_bar": progress, **(trainer or {})}
    kw["use_distributed_sampler"] = False  # the plan splits the work (EmbedDataModule)
    kw["callbacks"] = [writer, *list(kw.get("callbacks") or []), *callbacks]
    pl_trainer = pl.Trainer(**kw)
    with warnings.catch_warnings():  # Lightning's note that it cannot check a custom batch sampler's drop_last
        warnings.filterwarnings("ignore", message=".*custom batch sampler.*")
        pl_trainer.predict(module, datamodule=data, return_predictions=False)
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    if dist:  # torchrun / SLURM: every rank is here; wait for the others' shards
        torch.distributed.barrier()
    if (torch.distributed.get_rank() if dist else 0) != 0:
        return None
    folder = finish(out, plan, encoder.info, int(encoder.model.embed_dim), dtype, columns,
                    {**protocol, "sampling": asdict(sampling), "transform": asdict(transform)})
    skipped = int(folder.protocol.get("skipped", 0))
    if skipped > policy.max_skip_rate * plan.count:
        warnings.warn(f"{out}: {skipped} of {plan.count} entries could not be decoded and were skipped "
                      f"(more than max_skip_rate {policy.max_skip_rate:.1%}); see {policy.report_dir}", stacklevel=2)
    return folder
