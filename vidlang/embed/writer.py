"""Shard writing of ``vidlang embed``: a prediction writer per rank, and the manifest once every shard is there.

:class:`ShardWriter` collects each batch's rows by shard; a shard whose every entry came back (embedded or
skipped) is written at once, atomically (:func:`vidlang.embeddings.write_shard`), with its skipped videos in
its header. :func:`finish` writes ``manifest.json`` (the commit point of the folder, :mod:`vidlang.embeddings`)
when every shard of the plan exists.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from pytorch_lightning.callbacks import BasePredictionWriter

from vidlang.embed.plan import ShardPlan
from vidlang.embeddings import EmbeddingsDir, ModelInfo, read_shard_info, write_manifest, write_shard

log = logging.getLogger(__name__)


class ShardWriter(BasePredictionWriter):
    """Writes the shards of this rank as they complete; counts clips, skipped videos and clips/s."""

    def __init__(self, out: str | os.PathLike, plan: ShardPlan, ids: list[str], sources: list[str],
                 captions: list[str | None], model: ModelInfo, columns: dict[str, str], dim: int,
                 dtype: str = "float16") -> None:
        super().__init__(write_interval="batch")
        self.out, self.plan = Path(out), plan
        self.ids, self.sources, self.captions = ids, sources, captions
        self.model, self.columns, self.dim, self.dtype = model, columns, dim, dtype
        self.open: dict[int, dict[str, Any]] = {}  # shard -> {"rows": {entry: {column: [E]}}, "skipped": [...]}
        self.written: list[int] = []
        self.clips = self.skipped = 0
        self.started = 0.0

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self.started = time.perf_counter()

    @property
    def clips_per_second(self) -> float:
        return self.clips / max(time.perf_counter() - self.started, 1e-9)

    def write_on_batch_end(self, trainer: Any, pl_module: Any, prediction: dict[str, Any], batch_indices: Any,
                           batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        cols = {name: prediction[name].numpy() for name in self.columns}  # [b, E] each
        for row, entry in enumerate(prediction["index"]):
            shard = self._shard(entry)
            shard["rows"][entry] = {name: x[row] for name, x in cols.items()}
        for entry, reason in prediction["skipped"]:
            self._shard(entry)["skipped"].append({"id": self.ids[entry], "source": self.sources[entry],
                                                  "reason": str(reason)})
        self.clips += len(prediction["index"])
        self.skipped += len(prediction["skipped"])
        for j in [j for j, s in self.open.items() if len(s["rows"]) + len(s["skipped"]) == s["size"]]:
            self._write(j, self.open.pop(j), trainer.global_rank)
        show_rate(trainer, f"{self.clips} clips, {self.clips_per_second:.1f} clips/s, {self.skipped} skipped")

    def _shard(self, entry: int) -> dict[str, Any]:
        j = self.plan.shard_of(entry)
        if j not in self.open:
            lo, hi = self.plan.bounds(j)
            self.open[j] = {"rows": {}, "skipped": [], "size": hi - lo}
        return self.open[j]

    def _write(self, j: int, shard: dict[str, Any], rank: int) -> None:
        order = sorted(shard["rows"])  # entry order
        arrays = {name: (np.stack([shard["rows"][i][name] for i in order]) if order
                         else np.zeros((0, self.dim), np.float32)) for name in self.columns}
        lo, hi = self.plan.bounds(j)
        info = {"shard": j, "entries": [lo, hi], "rank": rank, "skipped": shard["skipped"]}
        extra = {name: (self.columns[name], arrays[name]) for name in self.columns if name != "embedding"}
        write_shard(self.out / self.plan.name(j), [self.ids[i] for i in order], [self.sources[i] for i in order],
                    arrays["embedding"], self.model, [self.captions[i] for i in order], self.dtype,
                    extra_embeddings=extra, dim=self.dim, info=info)
        self.written.append(j)

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        if self.open:  # a loader that stopped early (it does not: batches cover whole shards)
            log.warning("rank %d: %d shards incomplete at the end of the loop, not written", trainer.global_rank,
                        len(self.open))
        seconds = time.perf_counter() - self.started
        log.info("rank %d: embedded %d clips (%d skipped) into %d shards in %.1f s (%.1f clips/s)",
                 trainer.global_rank, self.clips, self.skipped, len(self.written), seconds, self.clips_per_second)


def show_rate(trainer: Any, text: str) -> None:
    """Put ``text`` beside the predict progress bar (Lightning's tqdm or rich bar; none: nothing)."""
    cb = getattr(trainer, "progress_bar_callback", None)
    if cb is None:
        return
    try:
        cb.predict_progress_bar.set_postfix_str(text, refresh=False)  # tqdm
        return
    except (AttributeError, TypeError):  # rich, or no bar yet
        pass
    task, progress = getattr(cb, "predict_progress_bar_id", None), getattr(cb, "progress", None)
    if task is not None and progress is not None:
        progress.update(task, description=f"{cb.predict_description} ({text})")


def finish(out: str | os.PathLike, plan: ShardPlan, model: ModelInfo, dim: int, dtype: str, columns: dict[str, str],
           protocol: dict[str, Any]) -> EmbeddingsDir:
    """Write ``manifest.json`` over every shard of ``plan`` (in order); a missing shard raises ``RuntimeError``
    (a rank failed: rerun the same command to finish). Returns the folder, opened and validated."""
    import pyarrow.parquet as pq

    base = Path(out)
    missing = plan.pending(base)
    if missing:
        raise RuntimeError(f"{base}: {len(missing)} of {plan.num_shards} shards missing (first: "
                           f"{plan.name(missing[0])}); rerun the same command to finish them")
    shards, skipped = [], []
    for j in range(plan.num_shards):
        path = base / plan.name(j)
        shards.append((plan.name(j), pq.read_metadata(path).num_rows))
        skipped.extend((read_shard_info(path).get("shard") or {}).get("skipped", []))
    write_manifest(base, shards, dim, model, dtype, normalized=True, columns=columns,
                   protocol={**protocol, "entries": plan.count, "skipped": len(skipped),
                             "skipped_examples": skipped[:100]})
    return EmbeddingsDir(base)
