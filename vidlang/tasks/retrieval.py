"""Text-video retrieval as a thin LightningModule: model + :class:`ContrastiveLoss` + retrieval metrics.

Batch contract (:mod:`vidlang.data.collate`): ``video`` uint8 ``[B, T, C, H, W]`` (``[B, V, T, C, H, W]``
multi-view: evaluation averages the V view embeddings), ``captions`` list of A strings (or pre-tokenised
``input_ids`` / ``attention_mask [A, Lt]``), ``caption_index [A]``, ``key`` list of B strings.

Tokenizer, in order of precedence: one given to :meth:`RetrievalTask.set_tokenizer`; the one embedded in
a checkpoint this task was loaded from; the directory ``tokenizer`` (loaded lazily with
``ClipTokenizer.from_dir``); ``trainer.datamodule.tokenizer``. Whatever is used is embedded in every
checkpoint (``checkpoint["vidlang_tokenizer"]``, plain strings), so ``load_from_checkpoint`` needs no
tokenizer files.

Evaluation embeds every video and caption once, gathers them across ranks, drops the duplicates that a
distributed sampler pads with, computes :func:`vidlang.eval.retrieval.evaluate_embeddings` and logs
``{stage}/t2v_R@1`` ... (``{stage}/dsl_...`` separately when ``dsl``). Rank 0 writes
``{stage}_metrics.json`` (+ a line in ``{stage}_metrics_history.jsonl``) and ``{stage}_recall_at_k.png``
to the checkpoint directory (else the logger's directory, else ``trainer.default_root_dir``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from vidlang.eval.retrieval import chance_levels, evaluate_embeddings
from vidlang.losses.contrastive import ContrastiveLoss, ContrastiveOutput
from vidlang.losses.distributed import all_gather_no_grad, all_gather_objects, world_info
from vidlang.models.factory import ModelConfig, build_model
from vidlang.tasks.schedule import resolve_warmup, warmup_cosine

TOKENIZER_KEY = "vidlang_tokenizer"


def tokenizer_state(tok: Any) -> dict[str, Any]:
    """A ``ClipTokenizer`` as plain strings/ints (safe for ``torch.load(weights_only=True)``)."""
    return {
        "tokenizer_json": tok.tokenizer.to_str(),
        "bos_token": tok.bos_token,
        "eot_token": tok.eot_token,
        "pad_token": tok.pad_token,
        "context_length": tok.context_length,
    }


def tokenizer_from_state(state: dict[str, Any]) -> Any:
    from tokenizers import Tokenizer

    from vidlang.models.clip.tokenizer import ClipTokenizer

    tok = Tokenizer.from_str(state["tokenizer_json"])
    return ClipTokenizer(tok, state["bos_token"], state["eot_token"], state["pad_token"], state["context_length"])


class RetrievalTask(pl.LightningModule):
    """Contrastive video-text training and retrieval evaluation (see the module docstring)."""

    def __init__(
        self,
        model: ModelConfig,
        tokenizer: str | None = None,
        lr: float = 1e-5,
        lr_mult_block: float | None = None,
        weight_decay: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int | None = None,
        warmup_ratio: float | None = 0.1,
        min_lr_ratio: float = 0.0,
        gather: bool = True,
        local_loss: bool = False,
        aux_loss_weights: dict[str, float] | None = None,
        dsl: bool = True,
        dsl_temperature: float = 0.01,
        text_chunk: int = 1024,
        ties: Literal["pessimistic", "optimistic"] = "pessimistic",
        write_plots: bool = True,
    ) -> None:
        """``model``: the model config. ``tokenizer``: tokenizer directory (see module docstring).
        ``lr_mult_block``: overrides the model config's block lr multiplier. Warm-up: ``warmup_steps``
        when given, else ``warmup_ratio`` of the total steps; then cosine decay to ``min_lr_ratio * lr``
        (AdamW with ``betas``/``eps``; weight-decay exclusions from ``param_groups``). ``gather`` /
        ``local_loss``: see :class:`ContrastiveLoss`. ``aux_loss_weights``: weight per auxiliary loss
        name (unlisted ones weigh 1.0; 0 disables). ``dsl``: also report dual-softmax metrics under
        ``dsl_`` keys. ``text_chunk``: rows per similarity block in evaluation. ``ties``: rank tie rule
        (see :mod:`vidlang.eval.retrieval`)."""
        super().__init__()
        if isinstance(model, dict):  # from a checkpoint's hyper-parameters
            model = ModelConfig(**model)
        self.save_hyperparameters()
        self.hparams["model"] = dataclasses.asdict(model)  # plain dict: checkpoints load with weights_only
        self.model_config = model
        self.model = build_model(model)
        self.loss = ContrastiveLoss(gather=gather, local_loss=local_loss)
        self.aux_loss_weights = dict(aux_loss_weights or {})
        self._tokenizer: Any = None
        self._eval: dict[str, list] = {}

    # -- tokenizer -------------------------------------------------------------------------------
    def set_tokenizer(self, tokenizer: Any) -> None:
        """Use ``tokenizer`` (a ``ClipTokenizer``); it is saved inside every checkpoint."""
        self._tokenizer = tokenizer

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = self._find_tokenizer()
        return self._tokenizer

    def _find_tokenizer(self) -> Any:
        if self.hparams.tokenizer:
            from vidlang.models.clip.tokenizer import ClipTokenizer

            return ClipTokenizer.from_dir(self.hparams.tokenizer, context_length=self.context_length)
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if getattr(dm, "tokenizer", None) is not None:
            return dm.tokenizer
        raise RuntimeError(
            "RetrievalTask has no tokenizer: pass tokenizer=<dir>, call set_tokenizer(), give the datamodule a "
            "`tokenizer` attribute, or load a checkpoint that embeds one"
        )

    @property
    def context_length(self) -> int:
        return self.model.text_tower.cfg.context_length

    def tokenize(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """``captions`` -> ``input_ids, attention_mask [A, Lt]`` on this module's device."""
        ids, mask = self.tokenizer(captions, self.context_length)
        return ids.to(self.device), mask.to(self.device)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        tok = self._tokenizer
        if tok is None:
            try:
                tok = self.tokenizer
            except RuntimeError:
                return
        checkpoint[TOKENIZER_KEY] = tokenizer_state(tok)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if TOKENIZER_KEY in checkpoint and self._tokenizer is None:
            self._tokenizer = tokenizer_from_state(checkpoint[TOKENIZER_KEY])

    # -- batches ---------------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Normalise uint8 frames on the device (float videos are taken as already normalised)."""
        from vidlang.data.transforms import normalize

        video = batch.get("video")
        if isinstance(video, Tensor) and video.dtype == torch.uint8:
            batch["video"] = normalize(video, self.model.image_mean, self.model.image_std)
        return batch

    def _text_inputs(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        if "input_ids" in batch:
            return batch["input_ids"], batch["attention_mask"]
        return self.tokenize(list(batch["captions"]))

    def encode_video(self, video: Tensor) -> Tensor:
        """Normalised video embeddings ``[B, E]``; ``[B, V, T, C, H, W]`` averages the V views."""
        if video.ndim == 6:
            b, v = video.shape[:2]
            emb = F.normalize(self.model.encode_video(video.flatten(0, 1)).embeds, dim=-1)  # [B*V, E]
            return F.normalize(emb.view(b, v, -1).mean(dim=1), dim=-1)
        return F.normalize(self.model.encode_video(video).embeds, dim=-1)

    # -- training --------------------------------------------------------------------------------
    def forward_loss(self, batch: dict[str, Any]) -> tuple[Tensor, ContrastiveOutput, dict[str, Tensor]]:
        """Total loss, the contrastive parts and the (unweighted) auxiliary losses of one batch."""
        video = batch["video"]
        if video.ndim != 5:
            raise ValueError(f"retrieval training expects video [B, T, C, H, W], got {tuple(video.shape)}")
        ids, mask = self._text_inputs(batch)
        state = self.model.caption_state(ids, mask, batch["caption_index"], video.shape[0])
        v = self.model.encode_video(video, state=state)
        t = self.model.encode_text(ids, mask)
        out = self.loss(v.embeds, t.embeds, batch["caption_index"], self.model.logit_scale)
        aux = {**v.aux_losses, **t.aux_losses}
        total = out.loss
        for name, value in aux.items():
            total = total + self.aux_loss_weights.get(name, 1.0) * value
        return total, out, aux

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        total, out, aux = self.forward_loss(batch)
        bs = batch["video"].shape[0]
        logs = {
            "train/loss": total,
            "train/loss_contrastive": out.loss,
            "train/loss_t2v": out.loss_t2v,
            "train/loss_v2t": out.loss_v2t,
            "train/scale": out.scale,
        }
        logs.update({f"train/aux_{k}": v.detach() for k, v in aux.items()})
        self.log_dict(logs, prog_bar=False, batch_size=bs)
        self.log("loss", total.detach(), prog_bar=True, logger=False, batch_size=bs)
        if self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bs)
        return total

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():  # keep the parameter itself inside [0, log 100] (as CLIP does)
            self.model.logit_scale.clamp_(0.0, math.log(self.loss.max_scale))

    def configure_optimizers(self) -> dict[str, Any]:
        from vidlang.models.optim import param_groups

        mults = self.model.lr_mults
        block_mult = mults["block"] if self.hparams.lr_mult_block is None else self.hparams.lr_mult_block
        groups = param_groups(self.model, self.hparams.lr, self.hparams.weight_decay, mults["backbone"], block_mult)
        if not groups:
            raise ValueError("no trainable parameters: check ModelConfig.freeze")
        opt = torch.optim.AdamW(groups, lr=self.hparams.lr, betas=tuple(self.hparams.betas), eps=self.hparams.eps)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("cannot size the lr schedule: set trainer.max_steps (the data has no length)")
        total = max(1, int(total))
        warmup = resolve_warmup(total, self.hparams.warmup_steps, self.hparams.warmup_ratio)
        sched = warmup_cosine(opt, warmup, total, self.hparams.min_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- evaluation ------------------------------------------------------------------------------
    def _eval_step(self, batch: dict[str, Any]) -> None:
        ids, mask = self._text_inputs(batch)
        video = self.encode_video(batch["video"])  # [B, E]
        text = F.normalize(self.model.encode_text(ids, mask).embeds, dim=-1)  # [A, E]
        store = self._eval.setdefault("video", []), self._eval.setdefault("text", [])
        index = self._eval.setdefault("index", [])
        offset = sum(x.shape[0] for x in store[0])
        store[0].append(video.float())
        store[1].append(text.float())
        index.append(batch["caption_index"].long() + offset)
        captions, owner = list(batch.get("captions", [])), batch["caption_index"].tolist()
        keys = self._eval.setdefault("keys", [])
        default_keys = [f"#{world_info()[0]}:{offset + i}" for i in range(video.shape[0])]
        for b, key in enumerate(batch.get("key", default_keys)):
            caps = [c for c, o in zip(captions, owner, strict=False) if o == b]
            keys.append(f"{key}\x00" + "\x1f".join(caps))  # identifies a sampler-padding duplicate

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_start(self) -> None:
        self._eval = {}

    def on_test_epoch_start(self) -> None:
        self._eval = {}

    def on_validation_epoch_end(self) -> None:
        self._finish_eval("val")

    def on_test_epoch_end(self) -> None:
        self._finish_eval("test")

    def _gathered(self) -> tuple[Tensor, Tensor, Tensor]:
        """All ranks' video ``[B, E]``, text ``[A, E]`` and global ``caption_index [A]``.

        Videos whose key and captions repeat an earlier one (a distributed sampler's padding) are
        dropped with their captions; the first occurrence is kept and order is preserved.
        """
        e, dim, dev = self._eval, self.model.embed_dim, self.device
        video = torch.cat(e["video"]) if e.get("video") else torch.empty(0, dim, device=dev)
        text = torch.cat(e["text"]) if e.get("text") else torch.empty(0, dim, device=dev)
        index = torch.cat(e["index"]) if e.get("index") else torch.empty(0, dtype=torch.long, device=dev)
        rank, _ = world_info()
        keys_per_rank = all_gather_objects(e.get("keys", []))
        offset = sum(len(k) for k in keys_per_rank[:rank])
        index = all_gather_no_grad(index + offset).cpu()
        video, text = all_gather_no_grad(video), all_gather_no_grad(text)
        keys = [k for ks in keys_per_rank for k in ks]
        first: dict[str, int] = {}
        new_id = torch.tensor([first.setdefault(k, len(first)) for k in keys], dtype=torch.long)  # [B_all]
        keep_video = torch.tensor([first[k] == i for i, k in enumerate(keys)], dtype=torch.bool)  # [B_all]
        keep_text = keep_video[index]  # [A_all]
        return video[keep_video.to(dev)], text[keep_text.to(dev)], new_id[index[keep_text]]

    def _finish_eval(self, stage: str) -> None:
        if self.trainer.sanity_checking:
            self._eval = {}
            return
        video, text, index = self._gathered()
        self._eval = {}
        h = self.hparams
        with torch.autocast(self.device.type, enabled=False):  # fp32 similarities even under bf16 training
            result = evaluate_embeddings(
                text,
                video,
                index,
                dsl=h.dsl,
                dsl_temperature=h.dsl_temperature,
                chunk=h.text_chunk,
                ties=h.ties,
                normalize=False,
            )
        self.log_dict({f"{stage}/{k}": v for k, v in result.metrics.items()}, sync_dist=False)
        self.last_metrics = {stage: result.metrics}
        out_dir = self.report_dir()  # on every rank: trainer.log_dir is a collective (broadcast)
        if self.trainer.is_global_zero:
            self._write_report(out_dir, stage, result, chance_levels(index, video.shape[0]))

    def report_dir(self) -> Path:
        """Where metrics JSON and plots go: checkpoint dir > logger dir > ``default_root_dir``.

        Call it on every rank: ``trainer.log_dir`` broadcasts rank 0's value."""
        trainer = self.trainer
        ckpt = getattr(trainer, "checkpoint_callback", None)
        if ckpt is not None and getattr(ckpt, "dirpath", None):
            return Path(ckpt.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir)

    def _write_report(self, out_dir: Path, stage: str, result: Any, chance: dict[str, float]) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        h = self.hparams
        report = {
            "stage": stage,
            "epoch": self.current_epoch,
            "global_step": self.global_step,
            "metrics": result.metrics,
            "chance": chance,
            "options": {"ties": h.ties, "dsl": h.dsl, "dsl_temperature": h.dsl_temperature},
        }
        (out_dir / f"{stage}_metrics.json").write_text(json.dumps(report, indent=2) + "\n")
        with open(out_dir / f"{stage}_metrics_history.jsonl", "a") as f:
            f.write(json.dumps(report) + "\n")
        if h.write_plots:
            from vidlang.eval.plots import plot_recall_at_k

            title = f"{stage} recall@K (epoch {self.current_epoch}, step {self.global_step})"
            plot_recall_at_k(result.ranks, out_dir / f"{stage}_recall_at_k.png", title=title)
