"""Text-video retrieval as a thin LightningModule: model + :class:`ContrastiveLoss` + retrieval metrics.

Batch contract (:mod:`vidlang.data.collate`): ``video`` uint8 ``[B, T, C, H, W]`` (``[B, V, T, C, H, W]``
multi-view: evaluation averages the V view embeddings), ``captions`` list of A strings (or pre-tokenised
``input_ids`` / ``attention_mask [A, Lt]``), ``caption_index [A]``, ``key`` list of B strings.

Tokenizer, in order of precedence: one given to :meth:`RetrievalTask.set_tokenizer`; the one embedded in
a checkpoint this task was loaded from; the directory ``tokenizer`` (loaded lazily with
``ClipTokenizer.from_dir``); ``trainer.datamodule.tokenizer``. Whatever is used is embedded in every
checkpoint (``checkpoint["vidlang_tokenizer"]``, plain strings), so ``load_from_checkpoint`` needs no
tokenizer files.

Evaluation embeds every video and caption once, gathers them across ranks, keeps the first occurrence of
each video (a distributed sampler pads with repeats; key + captions identify a video), computes
:func:`vidlang.eval.retrieval.evaluate_embeddings` and logs ``{stage}/t2v_R@1`` ... (``{stage}/dsl_...``
separately when ``dsl``) with the gallery's size: ``{stage}/num_videos``, ``{stage}/num_captions`` and
``{stage}/num_skipped`` (distinct samples that failed to load and were left out, ``batch["skipped"]``; they
are never replaced in evaluation). Rank 0 writes ``{stage}_metrics.json`` (+ a line in
``{stage}_metrics_history.jsonl``, both with those counts) and ``{stage}_recall_at_k.png`` to the checkpoint
directory (else the logger's directory, else ``trainer.default_root_dir``).

Audio (``audio`` set): the video model is wrapped in :class:`~vidlang.models.fusion.AudioVisualModel`
(parameters ``model.video_model.*``, ``model.audio.*``, ``model.fusion.*``). Batches then should carry
the collated audio (``audio [B, S]`` float32 at the frontend's sample rate, ``audio_lengths [B]``,
``audio_mask [B]``; data with ``decode_audio: true``); ``on_after_batch_transfer`` turns it into log-mel
on the device (``audio_mel [B, S_seg, 1, M, F]``, ``audio_mel_mask [B]``). Clips without an audio track
(or batches without any audio) take the masked path: their embedding is the video embedding alone.
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

from vidlang.eval.protocols import protocol_of
from vidlang.eval.retrieval import chance_levels, evaluate_embeddings
from vidlang.losses.aux import weigh_aux_losses
from vidlang.losses.contrastive import ContrastiveLoss, ContrastiveOutput
from vidlang.losses.distributed import all_gather_no_grad, all_gather_objects, world_info
from vidlang.models.audio.encoder import AudioConfig, build_audio_branch
from vidlang.models.audio.frontend import LogMelFrontend
from vidlang.models.contract import VideoOutput
from vidlang.models.factory import ModelConfig, build_model
from vidlang.models.fusion.fusion import AudioVisualModel
from vidlang.models.video_clip import VideoTextModel
from vidlang.tasks.common import EvalLoopMixin, TokenizerMixin, adamw_warmup_cosine, normalize_uint8_video


class RetrievalTask(EvalLoopMixin, TokenizerMixin, pl.LightningModule):
    """Contrastive video-text training and retrieval evaluation (see the module docstring)."""

    def __init__(
        self,
        model: ModelConfig,
        tokenizer: str | None = None,
        lr: float = 1e-5,
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
        audio: AudioConfig | None = None,
        fusion: str = "gated_sum",
        fusion_args: dict[str, Any] | None = None,
        audio_frontend: dict[str, Any] | None = None,
        lr_mult_audio: float = 1.0,
        protocol: str | None = None,
    ) -> None:
        """``model``: the model config. ``tokenizer``: tokenizer directory (see module docstring). Learning rates:
        ``lr`` x the model's recipe (``ModelConfig.lr_mults``, :meth:`VideoTextModel.param_groups`). Warm-up:
        ``warmup_steps`` when given, else ``warmup_ratio`` of the total steps; then cosine decay to ``min_lr_ratio *
        lr`` (AdamW with ``betas``/``eps``; weight-decay exclusions from the model's ``param_groups``). ``gather`` /
        ``local_loss``: see :class:`ContrastiveLoss`. ``aux_loss_weights``: weight per auxiliary loss name, over the
        block's ``default_aux_weights`` (unlisted in both: 1.0; 0 disables). ``dsl``: also report dual-softmax
        metrics under ``dsl_`` keys. ``text_chunk``: rows per similarity block in evaluation. ``ties``: rank tie rule
        (see :mod:`vidlang.eval.retrieval`). ``audio``: the audio branch config (None = video only); ``fusion`` /
        ``fusion_args``: a name in :data:`vidlang.models.fusion.FUSIONS` and its arguments; ``audio_frontend``:
        :class:`LogMelFrontend` arguments (e.g. ``num_segments``, ``segment_seconds``, ``num_mel_bins``,
        ``target_frames``; they must match the audio backbone's input size); ``lr_mult_audio``: lr multiplier of the
        audio branch and the fusion. ``protocol``: a named evaluation protocol (:mod:`vidlang.eval.protocols`):
        its tie rule and video -> text convention replace ``ties``, and the metrics JSON embeds its name, hash and
        whether the gallery has the official size."""
        super().__init__()
        if protocol is not None:
            from vidlang.eval.protocols import get_protocol

            get_protocol(protocol).require("retrieval")  # an unknown name or a recognition protocol: fail now
        if isinstance(model, dict):  # from a checkpoint's hyper-parameters
            model = ModelConfig.from_dict(model)
        if isinstance(audio, dict):
            audio = AudioConfig(**audio)
        self.save_hyperparameters()
        self.hparams["model"] = dataclasses.asdict(model)  # plain dict: checkpoints load with weights_only
        self.hparams["audio"] = dataclasses.asdict(audio) if audio is not None else None
        self.model_config = model
        self.model: VideoTextModel | AudioVisualModel = build_model(model)
        self.frontend: LogMelFrontend | None = None
        if audio is not None:
            self.model = AudioVisualModel(self.model, build_audio_branch(audio), fusion, fusion_args,
                                          lr_mults={"": lr_mult_audio})
            self.frontend = LogMelFrontend(**(audio_frontend or {}))
        self.loss = ContrastiveLoss(gather=gather, local_loss=local_loss)
        self.aux_loss_weights = dict(aux_loss_weights or {})
        self._tokenizer: Any = None
        self._eval: dict[str, list] = {}

    # -- tokenizer -------------------------------------------------------------------------------
    @property
    def video_text(self) -> VideoTextModel:
        """The image/text towers + temporal block (inside the audio-visual wrapper when there is audio)."""
        return self.model.video_model if isinstance(self.model, AudioVisualModel) else self.model

    @property
    def context_length(self) -> int:
        return self.video_text.text_tower.cfg.context_length

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.save_tokenizer(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.load_tokenizer(checkpoint)

    # -- batches ---------------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Normalise uint8 frames on the device (float videos are taken as already normalised); with audio,
        compute the log-mel input ``audio_mel [B, S_seg, 1, M, F]`` + ``audio_mel_mask [B]`` on the device."""
        normalize_uint8_video(batch, self.model.image_mean, self.model.image_std)
        video = batch.get("video")
        if self.frontend is not None and isinstance(video, Tensor) and "audio_mel" not in batch:
            batch["audio_mel"], batch["audio_mel_mask"] = self.audio_input(batch, video.shape[0])
        return batch

    def audio_input(self, batch: dict[str, Any], num_videos: int) -> tuple[Tensor, Tensor]:
        """The batch's audio fields -> ``(mel [B, S_seg, 1, M, F], mask [B])``; all masked without audio."""
        if self.frontend is None:
            raise RuntimeError("this RetrievalTask has no audio branch (audio=None)")
        if "audio" not in batch:  # no clip of this batch has an audio track
            return self.frontend([None] * num_videos)
        audio = batch["audio"].to(self.device)
        return self.frontend.from_batch(audio, batch["audio_lengths"], batch["audio_mask"])

    def _text_inputs(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        if "input_ids" in batch:
            return batch["input_ids"], batch["attention_mask"]
        return self.tokenize(list(batch["captions"]))

    def _batch_audio(self, batch: dict[str, Any]) -> tuple[Tensor | None, Tensor | None]:
        if self.frontend is None:
            return None, None
        if "audio_mel" not in batch:  # a batch that did not pass through on_after_batch_transfer
            batch["audio_mel"], batch["audio_mel_mask"] = self.audio_input(batch, batch["video"].shape[0])
        return batch["audio_mel"], batch["audio_mel_mask"]

    def video_output(
        self, video: Tensor, audio_mel: Tensor | None = None, audio_mask: Tensor | None = None,
        state: dict | None = None,
    ) -> VideoOutput:
        """``video [B, T, 3, H, W]`` (+ ``audio_mel [B, S_seg, 1, M, F]``, ``audio_mask [B]``) -> the (fused)
        :class:`VideoOutput`. With an audio branch and no ``audio_mel``, every clip takes the masked path."""
        if not isinstance(self.model, AudioVisualModel):
            return self.video_text.encode_video(video, state=state)
        if audio_mel is None:
            audio_mel, audio_mask = self.frontend([None] * video.shape[0])
        return self.model.encode_video(video, audio_mel.to(video.device), audio_mask, state=state)

    def encode_video(self, video: Tensor, audio_mel: Tensor | None = None, audio_mask: Tensor | None = None) -> Tensor:
        """Normalised video embeddings ``[B, E]``; ``[B, V, T, C, H, W]`` averages the V views (each view gets
        the clip's audio)."""
        if video.ndim == 6:
            b, v = video.shape[:2]
            if audio_mel is not None:
                audio_mel, audio_mask = audio_mel.repeat_interleave(v, 0), audio_mask.repeat_interleave(v, 0)
            out = self.video_output(video.flatten(0, 1), audio_mel, audio_mask)
            emb = F.normalize(out.embeds, dim=-1)  # [B*V, E]
            return F.normalize(emb.view(b, v, -1).mean(dim=1), dim=-1)
        return F.normalize(self.video_output(video, audio_mel, audio_mask).embeds, dim=-1)

    # -- training --------------------------------------------------------------------------------
    def forward_loss(self, batch: dict[str, Any]) -> tuple[Tensor, ContrastiveOutput, dict[str, Tensor]]:
        """Total loss, the contrastive parts and the (unweighted) auxiliary losses of one batch."""
        video = batch["video"]
        if video.ndim != 5:
            raise ValueError(f"retrieval training expects video [B, T, C, H, W], got {tuple(video.shape)}")
        ids, mask = self._text_inputs(batch)
        state = self.video_text.caption_state(ids, mask, batch["caption_index"], video.shape[0])
        v = self.video_output(video, *self._batch_audio(batch), state=state)
        t = self.model.encode_text(ids, mask)
        out = self.loss(v.embeds, t.embeds, batch["caption_index"], self.model.logit_scale)
        aux = {**v.aux_losses, **t.aux_losses}
        weighted, _ = weigh_aux_losses(aux, self.video_text.block.default_aux_weights, self.aux_loss_weights)
        total = out.loss if weighted is None else out.loss + weighted
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
        groups = self.model.param_groups(self.hparams.lr, self.hparams.weight_decay)
        return adamw_warmup_cosine(self, groups, eps=self.hparams.eps)

    # -- evaluation ------------------------------------------------------------------------------
    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        self._eval.setdefault("skipped", []).extend(batch.get("skipped", []))
        if batch.get("video") is None or batch["video"].shape[0] == 0:  # every sample of the batch was skipped
            return
        ids, mask = self._text_inputs(batch)
        video = self.encode_video(batch["video"], *self._batch_audio(batch))  # [B, E]
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

    def _gathered(self) -> tuple[Tensor, Tensor, Tensor, int]:
        """All ranks' video ``[B, E]``, text ``[A, E]``, global ``caption_index [A]`` and the number of distinct
        skipped samples.

        Videos whose key and captions repeat an earlier one (a distributed sampler's padding) are
        dropped with their captions; the first occurrence is kept and order is preserved.
        """
        e, dim, dev = self._eval, self.model.embed_dim, self.device
        video = torch.cat(e["video"]) if e.get("video") else torch.empty(0, dim, device=dev)
        text = torch.cat(e["text"]) if e.get("text") else torch.empty(0, dim, device=dev)
        index = torch.cat(e["index"]) if e.get("index") else torch.empty(0, dtype=torch.long, device=dev)
        rank, _ = world_info()
        per_rank = all_gather_objects((e.get("keys", []), e.get("skipped", [])))
        keys_per_rank = [k for k, _ in per_rank]
        offset = sum(len(k) for k in keys_per_rank[:rank])
        index = all_gather_no_grad(index + offset).cpu()
        video, text = all_gather_no_grad(video), all_gather_no_grad(text)
        keys = [k for ks in keys_per_rank for k in ks]
        keep_video, new_id = first_occurrences(keys)  # [B_all], [B_all]
        keep_text = keep_video[index]  # [A_all]
        served = {k.split("\x00", 1)[0] for k in keys}
        skipped = {k for _, sk in per_rank for k in sk} - served  # a padding repeat of a bad sample counts once
        return video[keep_video.to(dev)], text[keep_text.to(dev)], new_id[index[keep_text]], len(skipped)

    def _finish_eval(self, stage: str) -> None:
        if self.trainer.sanity_checking:
            self._eval = {}
            return
        video, text, index, skipped = self._gathered()
        self._eval = {}
        if video.shape[0] == 0 or text.shape[0] == 0:
            raise RuntimeError(
                f"{stage}: no video to evaluate ({video.shape[0]} videos, {text.shape[0]} captions; {skipped} "
                "samples skipped as bad, see the bad-sample report)"
            )
        h = self.hparams
        protocol = protocol_of(h)
        with torch.autocast(self.device.type, enabled=False):  # fp32 similarities even under bf16 training
            result = evaluate_embeddings(
                text,
                video,
                index,
                dsl=h.dsl,
                dsl_temperature=h.dsl_temperature,
                chunk=h.text_chunk,
                ties=protocol.ties if protocol else h.ties,
                normalize=False,
                v2t=protocol.captions.video_to_text if protocol else "best_caption",
            )
        counts = {"num_videos": video.shape[0], "num_captions": text.shape[0], "num_skipped": skipped}
        logs = {f"{stage}/{k}": float(v) for k, v in {**result.metrics, **counts}.items()}
        self.log_dict(logs, sync_dist=False)
        self.last_metrics = {stage: result.metrics}
        out_dir = self.report_dir()  # on every rank: trainer.log_dir is a collective (broadcast)
        if self.trainer.is_global_zero:
            self._write_report(out_dir, stage, result, chance_levels(index, video.shape[0]), counts)

    def report_dir(self) -> Path:
        """Where metrics JSON and plots go: checkpoint dir > logger dir > ``default_root_dir``.

        Call it on every rank: ``trainer.log_dir`` broadcasts rank 0's value."""
        trainer = self.trainer
        ckpt = getattr(trainer, "checkpoint_callback", None)
        if ckpt is not None and getattr(ckpt, "dirpath", None):
            return Path(ckpt.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir)

    def _write_report(
        self, out_dir: Path, stage: str, result: Any, chance: dict[str, float], counts: dict[str, int]
    ) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        h = self.hparams
        report = {
            "stage": stage,
            "epoch": self.current_epoch,
            "global_step": self.global_step,
            **counts,
            "metrics": result.metrics,
            "chance": chance,
            "options": {"ties": h.ties, "dsl": h.dsl, "dsl_temperature": h.dsl_temperature},
        }
        protocol = protocol_of(h)
        if protocol is not None:
            report.update(protocol.report_fields(counts["num_videos"], counts["num_captions"]))
            report["options"]["ties"] = protocol.ties
        from vidlang.io import append_line, atomic_write_text

        atomic_write_text(out_dir / f"{stage}_metrics.json", json.dumps(report, indent=2) + "\n")
        append_line(out_dir / f"{stage}_metrics_history.jsonl", json.dumps(report))
        if h.write_plots:
            from vidlang.eval.plots import plot_recall_at_k

            title = f"{stage} recall@K (epoch {self.current_epoch}, step {self.global_step})"
            plot_recall_at_k(result.ranks, out_dir / f"{stage}_recall_at_k.png", title=title)


def first_occurrences(keys: list[str]) -> tuple[Tensor, Tensor]:
    """``keep [N]`` (True at the first occurrence of each key) and ``new_id [N]`` (the compacted position of each
    key's first occurrence among the kept ones), e.g. ``[a, b, b, c]`` -> ``[T, T, F, T]``, ``[0, 1, 1, 2]``."""
    first: dict[str, int] = {}
    new_id = torch.tensor([first.setdefault(k, len(first)) for k in keys], dtype=torch.long)  # [N]
    seen: set[str] = set()
    keep = torch.tensor([not (k in seen or seen.add(k)) for k in keys], dtype=torch.bool)  # [N]
    return keep, new_id
