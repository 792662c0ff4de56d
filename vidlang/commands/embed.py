"""``vidlang embed``: embeddings of a data config's split or a folder of videos into a Parquet folder
(docs/embeddings.md); ``--trainer.NAME VALUE`` options go to ``pl.Trainer`` (devices, num_nodes, strategy, ...)."""

from __future__ import annotations

import argparse
import inspect
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vidlang.commands import COMMANDS
from vidlang.errors import ConfigError

SPLIT_ORDER = ("test", "val", "train")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def trainer_options(argv: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """Split ``--trainer.NAME VALUE`` / ``--trainer.NAME=VALUE`` out of ``argv``; values are read as YAML
    (``8``, ``true``, ``[0, 1]``, ``bf16-mixed``). Unknown ``pl.Trainer`` arguments raise :class:`ConfigError`."""
    import pytorch_lightning as pl
    import yaml

    known = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}
    rest: list[str] = []
    opts: dict[str, Any] = {}
    it = iter(range(len(argv)))
    for i in it:
        arg = argv[i]
        if not arg.startswith("--trainer."):
            rest.append(arg)
            continue
        name, eq, value = arg[len("--trainer."):].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"{arg}: expected a value")
            value = argv[next(it)]
        if name not in known:
            raise ConfigError(f"--trainer.{name}: not a pl.Trainer argument")
        try:
            opts[name] = yaml.safe_load(value)
        except yaml.YAMLError:
            opts[name] = value
    return rest, opts


def data_split(path: str, split: str | None) -> tuple[dict[str, Any], dict[str, Any], str]:
    """A data config YAML (a whole ``vidlang fit`` config with ``data:``, or its data section; ``init_args``
    accepted) -> (the split's format spec, the groups, the split's name)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--data {path}: no such file")
    try:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"--data {path}: unreadable YAML ({err})") from None
    cfg = cfg.get("data", cfg) if isinstance(cfg, dict) else cfg
    cfg = cfg.get("init_args", cfg) if isinstance(cfg, dict) else cfg
    if not isinstance(cfg, dict):
        raise ConfigError(f"--data {path}: expected a mapping with splits (train / val / test)")
    names = [s for s in SPLIT_ORDER if isinstance(cfg.get(s), dict)]
    name = split or (names[0] if names else "test")
    if not isinstance(cfg.get(name), dict):
        raise ConfigError(f"--data {path}: no split {name!r} (it has: {', '.join(names) or 'none'})")
    groups = {g: cfg[g] for g in ("sampling", "transform", "loader", "decode", "bad_samples") if cfg.get(g)}
    return dict(cfg[name]), groups, name


@COMMANDS.register("embed")
class EmbedCommand:
    help = "embed the videos (and/or captions) of a data config or a folder into Parquet shards, on N ranks"
    passthrough = True

    def parser(self) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(
            prog="vidlang embed", description="Embeddings of a data config's split or a folder of videos from a "
            "vidlang checkpoint, into an embeddings folder (Parquet shards + manifest.json; docs/embeddings.md). "
            "Resumable: rerun the same command to finish an interrupted run. --trainer.NAME VALUE options go to "
            "pl.Trainer, e.g. --trainer.accelerator gpu --trainer.devices 8 --trainer.num_nodes 4.")
        p.add_argument("--ckpt", required=True, help="a vidlang checkpoint (retrieval, recognition or chat encoder)")
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--videos", help="folder of videos (searched recursively; ids are relative paths)")
        src.add_argument("--data", help="a data config YAML (a vidlang fit config or its data section): any format")
        p.add_argument("--split", choices=SPLIT_ORDER, help="the split of --data (default: test, else val, else "
                                                            "train)")
        p.add_argument("--out", required=True, help="output folder (an unfinished run there is continued)")
        p.add_argument("--text", action="store_true", help="also embed each entry's first caption (text_embedding)")
        p.add_argument("--no-video", action="store_true", help="embed captions only (needs --text)")
        p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored precision")
        p.add_argument("--shard-size", type=_positive, default=1000, help="entries per shard (default 1000)")
        p.add_argument("--batch-size", type=_positive, help="clips per forward (default: the data config's eval "
                                                            "batch size, else 8)")
        p.add_argument("--num-workers", type=int, help="DataLoader workers per rank (default: the data config's, "
                                                       "else 2)")
        p.add_argument("--llm", help="causal LM directory of a chat-encoder checkpoint (default: the one it names)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        return p

    def run_argv(self, argv: Sequence[str]) -> int:
        rest, trainer = trainer_options(argv)
        args = self.parser().parse_args(rest)
        return self.run(args, trainer)

    def run(self, args: argparse.Namespace, trainer: dict[str, Any]) -> int:
        from dataclasses import replace

        from vidlang.data.badsamples import BadSamplePolicy
        from vidlang.data.config import DecodeConfig, LoaderConfig, SamplingConfig, TransformConfig, as_config
        from vidlang.embed import config_entries, embed, folder_entries, load_encoder

        if args.no_video and not args.text:
            raise ConfigError("--no-video needs --text (there is nothing else to embed)")
        groups: dict[str, Any] = {}
        if args.videos is not None:
            entries, name = folder_entries(args.videos), str(Path(args.videos).resolve())
        else:
            spec, groups, split = data_split(args.data, args.split)
            entries, name = config_entries(spec), f"{Path(args.data).resolve()}:{split}"
        types = {"sampling": SamplingConfig, "transform": TransformConfig, "loader": LoaderConfig,
                 "decode": DecodeConfig, "bad_samples": BadSamplePolicy}
        cfg = {g: as_config(t, groups[g], g) if g in groups else None for g, t in types.items()}
        loader = cfg["loader"] or LoaderConfig()
        if args.batch_size:
            loader = replace(loader, batch_size=args.batch_size, eval_batch_size=None)
        if args.num_workers is not None:
            loader = replace(loader, num_workers=args.num_workers)
        encoder = load_encoder(args.ckpt, llm=args.llm)
        t0 = time.perf_counter()
        out = embed(encoder, args.out, entries, video=not args.no_video, text=args.text, dtype=args.dtype,
                    shard_size=args.shard_size, sampling=cfg["sampling"], transform=cfg["transform"], loader=loader,
                    decode=cfg["decode"], bad_samples=cfg["bad_samples"], trainer=trainer,
                    progress=not args.quiet, data_name=name)
        if out is None:  # not global rank 0
            return 0
        seconds = time.perf_counter() - t0
        skipped = out.protocol.get("skipped", 0)
        # the folder's totals: a resumed run keeps an earlier run's finished shards (this run's clips/s: the bar)
        print(f"{args.out}: {out.count} clips ({skipped} skipped) in {len(out.shards)} shards, columns "
              f"{', '.join(out.columns)}, {out.dtype}; this run took {seconds:.1f} s")
        for bad in out.protocol.get("skipped_examples", [])[:10]:
            print(f"  skipped: {bad['source']}: {bad['reason']}")
        return 0
