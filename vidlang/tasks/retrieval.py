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
separately when ``evaluation.dsl``) with the gallery's size: ``{stage}/num_videos``, ``{stage}/num_captions`` and
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

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vidlang.errors import ConfigError
from vidlang.eval.protocols import protocol_of
from vidlang.eval.report import write_metrics
from vidlang.eval.retrieval import chance_levels, evaluate_embeddings, evaluate_similarity
from vidlang.losses.aux import weigh_aux_losses
from vidlang.losses.contrastive import LOSSES, ContrastiveLoss, ContrastiveOutput
from vidlang.losses.distributed import (
    all_gather_no_grad,
    all_gather_objects,
    all_gather_with_grad,
    gather_caption_index,
    is_distributed,
    world_info,
)
from vidlang.models.audio.encoder import AudioConfig, build_audio_branch
from vidlang.models.audio.frontend import LogMelFrontend
from vidlang.models.contract import TextOutput, VideoOutput
from vidlang.models.cross_similarity import TightTransformerSimilarity
from vidlang.models.factory import ModelConfig, build_model
from vidlang.models.fusion.fusion import AudioVisualModel, SymileFusion
from vidlang.models.glscl import GLSCLSimilarity
from vidlang.models.optim import param_groups as module_param_groups
from vidlang.models.similarity import mug_similarity, mug_similarity_rows
from vidlang.models.temporal.video_mask import video_mask_state
from vidlang.models.video_clip import VideoTextModel
from vidlang.tasks.base import EvalLoopMixin, TokenizerMixin, VideoTask, normalize_uint8_video
from vidlang.tasks.config import RETRIEVAL_OPTIM, ContrastiveConfig, OptimConfig, RetrievalEvalConfig

# evaluation features with a row per caption
TEXT_FEATURES = frozenset({"text", "tokens", "token_mask", "text_raw", "text_concepts"})


def _mug_pairs(text: tuple[Tensor, Tensor], video: tuple[Tensor]) -> Tensor:
    """Mug similarity ``[A, B]`` of ``(tokens [A, Lt, E], mask [A, Lt])`` and ``(frames [B, T, E],)``."""
    return mug_similarity(text[0], text[1], video[0])


class RetrievalTask(EvalLoopMixin, TokenizerMixin, VideoTask):
    """Contrastive video-text training and retrieval evaluation (see the module docstring)."""

    def __init__(
        self,
        model: ModelConfig,
        tokenizer: str | None = None,
        aux_loss_weights: dict[str, float] | None = None,
        optim: OptimConfig = RETRIEVAL_OPTIM,
        contrastive: ContrastiveConfig = ContrastiveConfig(),  # noqa: B008  (frozen: a shared default is safe)
        evaluation: RetrievalEvalConfig = RetrievalEvalConfig(),  # noqa: B008
        audio: AudioConfig | None = None,
        fusion: str = "gated_sum",
        fusion_args: dict[str, Any] | None = None,
        audio_frontend: dict[str, Any] | None = None,
        lr_mult_audio: float = 1.0,
        protocol: str | None = None,
    ) -> None:
        """Build from config (the groups are :mod:`vidlang.tasks.config`; each may be given as a mapping of its fields).

        Args:
            model: the model config.
            tokenizer: tokenizer directory (see the module docstring).
            aux_loss_weights: weight per auxiliary loss name, over the block's ``default_aux_weights`` (unlisted in
                both: 1.0; 0 disables).
            optim: AdamW + warm-up cosine (:class:`OptimConfig`); each parameter's lr is ``optim.lr x`` the model's
                recipe (``ModelConfig.lr_mults``, :meth:`VideoTextModel.param_groups`), weight-decay exclusions
                from the model's ``param_groups``.
            contrastive: the loss (``loss`` / ``loss_args``, registry :data:`vidlang.losses.LOSSES`), its gather,
                temperature, directions and the similarity (:class:`ContrastiveConfig`).
            evaluation: dual-softmax metrics, similarity chunk, tie rule, plots (:class:`RetrievalEvalConfig`).
            audio: the audio branch config (None = video only).
            fusion, fusion_args: a name in :data:`vidlang.models.fusion.FUSIONS` and its arguments (``symile``
                goes with ``contrastive.loss: symile``: audio is then the loss's third modality, not fused into the
                video embedding during training).
            audio_frontend: :class:`LogMelFrontend` arguments (e.g. ``num_segments``, ``segment_seconds``,
                ``num_mel_bins``, ``target_frames``; they must match the audio backbone's input size).
            lr_mult_audio: lr multiplier of the audio branch and the fusion (the audio-visual model's recipe).
            protocol: a named evaluation protocol (:mod:`vidlang.eval.protocols`): its tie rule and video -> text
                convention replace ``evaluation.ties`` / ``evaluation.v2t``, and the metrics JSON embeds its name,
                hash and whether the gallery has the official size.
        """
        super().__init__()
        if protocol is not None:
            from vidlang.eval.protocols import get_protocol

            get_protocol(protocol).require("retrieval")  # an unknown name or a recognition protocol: fail now
        model = self.model_config(model)
        if isinstance(audio, dict):
            audio = AudioConfig(**audio)
        groups = self.init_groups(optim=optim, contrastive=contrastive, evaluation=evaluation)
        self.save_config(model=model, audio=audio, **groups)
        self.optim, self.evaluation = groups["optim"], groups["evaluation"]
        self.model: VideoTextModel | AudioVisualModel = build_model(model)
        self.frontend: LogMelFrontend | None = None
        if audio is not None:
            self.model = AudioVisualModel(self.model, build_audio_branch(audio), fusion, fusion_args,
                                          lr_mults={"": lr_mult_audio})
            self.frontend = LogMelFrontend(**(audio_frontend or {}))
        self.freeze_unreached_block_parts(calls_condition_text=False)  # retrieval scores pooled video embeddings
        con = self.contrastive = groups["contrastive"]
        self.loss: ContrastiveLoss = LOSSES.build(
            con.loss, gather=con.gather and con.similarity != "tight", local_loss=con.local_loss,
            temperature=con.temperature, directions=con.directions, **con.loss_args)
        self.symile = bool(getattr(self.loss, "needs_audio", False))
        if self.symile != isinstance(getattr(self.model, "fusion", None), SymileFusion):
            raise ConfigError(
                "contrastive.loss 'symile' scores audio as its own modality: it needs an audio branch (audio) with "
                f"fusion 'symile' (got audio={'set' if audio is not None else None}, fusion={fusion!r})"
                if self.symile else
                f"fusion 'symile' gives Symile's video-side vector, trained only by contrastive.loss 'symile' (got "
                f"{con.loss!r})")
        self.tight: TightTransformerSimilarity | None = None
        if con.micro_batch_size is not None:
            self.automatic_optimization = False  # feature-cache accumulation steps the optimizer itself
        if con.similarity == "tight":
            vt, tcfg = self.video_text, self.video_text.text_tower.cfg
            self.tight = TightTransformerSimilarity(vt.embed_dim, con.tight_layers, heads=tcfg.heads,
                                                    max_positions=tcfg.context_length)
            try:
                self.tight.init_from_text_tower(vt.text_tower)  # CLIP4Clip: from the text tower's first layers
            except ValueError as e:
                raise ConfigError(f"contrastive.similarity 'tight' is initialised from the text tower, which needs "
                                  f"text width == embed dim (as in every CLIP): {e}") from None
        self.glscl: GLSCLSimilarity | None = None
        if con.similarity == "glscl":
            try:
                self.glscl = GLSCLSimilarity(self.video_text.embed_dim, **con.similarity_args)
            except ValueError as e:
                raise ConfigError(f"contrastive.similarity_args of 'glscl': {e}") from None
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
            if self.symile:  # the mean of the views' Symile vectors: the mean of their scores
                return out.embeds.view(b, v, -1).mean(dim=1)
            emb = F.normalize(out.embeds, dim=-1)  # [B*V, E]
            return F.normalize(emb.view(b, v, -1).mean(dim=1), dim=-1)
        embeds = self.video_output(video, audio_mel, audio_mask).embeds
        return embeds if self.symile else F.normalize(embeds, dim=-1)

    # -- similarity ------------------------------------------------------------------------------
    def similarity_inputs(self, v: VideoOutput, t: TextOutput, video_mask: Tensor | None) -> tuple[Any, Any, Any]:
        """``(video features, text features, similarity function)`` of ``contrastive.similarity`` for
        :class:`ContrastiveLoss` (function None: cosine of the pooled embeddings)."""
        kind = self.contrastive.similarity
        if kind == "cosine":
            return v.embeds, t.embeds, None
        if v.frame_embeds is None:
            raise ValueError(f"similarity {kind!r} needs per-frame embeddings (VideoOutput.frame_embeds)")
        if kind == "mug":
            if t.tokens is None or t.mask is None:
                raise ValueError("similarity 'mug' needs the text tower's token features (TextOutput.tokens/mask)")
            return (v.frame_embeds,), (t.tokens, t.mask), _mug_pairs
        if kind == "glscl":
            vf, tf = self.glscl.features(v, t, video_mask)
            return vf, tf, self.glscl
        mask = video_mask if video_mask is not None else v.frame_embeds.new_ones(v.frame_embeds.shape[:2]).bool()
        return (v.frame_embeds, mask), t.embeds, self._tight_pairs

    def _tight_pairs(self, text: Tensor, video: tuple[Tensor, Tensor]) -> Tensor:
        frames, mask = video
        return self.tight(text, frames, mask)  # [A, B] raw logits

    # -- training --------------------------------------------------------------------------------
    def forward_loss(self, batch: dict[str, Any]) -> tuple[Tensor, ContrastiveOutput, dict[str, Tensor]]:
        """Total loss, the contrastive parts and the (unweighted) auxiliary losses of one batch."""
        video = batch["video"]
        if video.ndim != 5:
            raise ValueError(f"retrieval training expects video [B, T, C, H, W], got {tuple(video.shape)}")
        ids, mask = self._text_inputs(batch)
        state = self.video_text.caption_state(ids, mask, batch["caption_index"], video.shape[0])
        state = video_mask_state(self.block, batch.get("video_mask"), state)
        if self.symile:
            v = self.video_text.encode_video(video, state=state)  # unfused: audio is the loss's third modality
            audio, audio_mask = self.audio_embeds(*self._batch_audio(batch))
            t = self.model.encode_text(ids, mask)
            out = self.loss(v.embeds, t.embeds, batch["caption_index"], self.model.logit_scale, audio=audio,
                            audio_mask=audio_mask)
            aux = {**v.aux_losses, **t.aux_losses}
        else:
            v = self.video_output(video, *self._batch_audio(batch), state=state)
            t = self.model.encode_text(ids, mask)
            vf, tf, sim = self.similarity_inputs(v, t, batch.get("video_mask"))
            out = self.loss(vf, tf, batch["caption_index"], self.model.logit_scale, similarity=sim)
            aux = {**v.aux_losses, **t.aux_losses, **self.similarity_aux_losses(vf, tf, batch["caption_index"])}
        weighted = self.weigh_aux(aux)
        total = out.loss if weighted is None else out.loss + weighted
        return total, out, aux

    def audio_embeds(self, audio_mel: Tensor, audio_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Symile's audio embeddings ``[B, E]`` (unnormalised; rows without audio are ignored by the loss) and the
        audio mask ``[B]`` of ``audio_mel [B, S_seg, 1, M, F]``."""
        audio = self.model.audio(audio_mel, audio_mask)
        return self.model.fusion.audio_embeds(audio.tokens), audio.mask

    def similarity_aux_losses(self, video: Any, text: Any, caption_index: Tensor) -> dict[str, Tensor]:
        """The similarity head's auxiliary losses (``glscl``'s, on the batch gathered like the loss's features;
        other similarities: none)."""
        if self.glscl is None:
            return {}
        video_concepts, text_concepts = video[2], text[1]
        if self.loss.gather and is_distributed():
            caption_index, _ = gather_caption_index(caption_index, video_concepts.shape[0])
            video_concepts, text_concepts = all_gather_with_grad(video_concepts), all_gather_with_grad(text_concepts)
        return self.glscl.aux_losses(video_concepts, text_concepts, caption_index)

    def weigh_aux(self, aux: Any) -> Tensor | None:
        """As :meth:`VideoTask.weigh_aux`, the similarity head's ``default_aux_weights`` joining the block's."""
        defaults = {**self.block.default_aux_weights, **(self.glscl.default_aux_weights if self.glscl else {})}
        total, _ = weigh_aux_losses(aux, defaults, self.aux_loss_weights)
        return total

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if self.contrastive.micro_batch_size is not None:
            return self._cached_training_step(batch)
        total, out, aux = self.forward_loss(batch)
        logs = {"train/loss": total, "train/loss_contrastive": out.loss, "train/loss_t2v": out.loss_t2v,
                "train/loss_v2t": out.loss_v2t, "train/scale": out.scale}
        logs.update({f"train/loss_{k}": v for k, v in out.extra.items()})
        logs.update({f"train/aux_{k}": v for k, v in aux.items()})
        self.log_train(logs, total, batch["video"].shape[0])
        return total

    # -- feature-cache gradient accumulation (contrastive.micro_batch_size) -----------------------
    def _cached_training_step(self, batch: dict[str, Any]) -> Tensor:
        """One optimizer step over ``batch`` encoded ``micro_batch_size`` videos at a time
        (:func:`vidlang.losses.grad_cache.cached_contrastive_backward`): the loss and the gradients of the whole
        (gathered) batch, the activations of one micro-batch. Manual optimisation: under DDP the gradients are
        averaged over the ranks here (:func:`average_gradients`)."""
        from vidlang.losses.grad_cache import cached_contrastive_backward

        if self.trainer.precision == "16-mixed":
            raise ConfigError("contrastive.micro_batch_size does not support fp16 loss scaling: use "
                              "trainer.precision bf16-mixed or 32-true")
        video = batch["video"]
        if video.ndim != 5:
            raise ValueError(f"retrieval training expects video [B, T, C, H, W], got {tuple(video.shape)}")
        ids, mask = self._text_inputs(batch)
        if self.video_text.caption_state(ids, mask, batch["caption_index"], video.shape[0]) is not None:
            raise ConfigError(f"contrastive.micro_batch_size: the {type(self.block).__name__} block reads the "
                              "captions in its video forward (a captioning head); train it without micro-batches")
        audio_mel, audio_mask = self._batch_audio(batch)
        micro = split_batch(batch, ids, mask, audio_mel, audio_mask, self.contrastive.micro_batch_size)
        opt, sched = self.optimizers(), self.lr_schedulers()
        opt.zero_grad()
        out = cached_contrastive_backward(
            micro, self._micro_video, self._micro_text,
            lambda v, t, i: self.loss(v, t, i, self.model.logit_scale), [m["caption_index"] for m in micro],
        )
        average_gradients(self)
        opt.step()
        if sched is not None:
            sched.step()
        logs = {"train/loss": out.loss, "train/loss_contrastive": out.loss, "train/loss_t2v": out.loss_t2v,
                "train/loss_v2t": out.loss_v2t, "train/scale": out.scale}
        logs.update({f"train/loss_{k}": v for k, v in out.extra.items()})
        self.log_train(logs, out.loss, video.shape[0])
        return out.loss

    def _micro_video(self, mb: dict[str, Any]) -> Tensor:
        state = video_mask_state(self.block, mb.get("video_mask"))
        v = self.video_output(mb["video"], mb.get("audio_mel"), mb.get("audio_mel_mask"), state=state)
        self._no_aux(v.aux_losses)
        return v.embeds  # [b, E]

    def _micro_text(self, mb: dict[str, Any]) -> Tensor:
        if mb["input_ids"].shape[0] == 0:  # a micro-batch whose videos have no caption in this batch
            return mb["video"].new_zeros(0, self.model.embed_dim)
        t = self.model.encode_text(mb["input_ids"], mb["attention_mask"])
        self._no_aux(t.aux_losses)
        return t.embeds  # [a, E]

    def _no_aux(self, aux: dict[str, Tensor]) -> None:
        if aux:
            raise ConfigError(f"contrastive.micro_batch_size: the {type(self.block).__name__} block adds auxiliary "
                              f"losses ({', '.join(aux)}), which feature caching cannot carry; train it without "
                              "micro-batches")

    def param_groups(self) -> list[dict[str, Any]]:
        """The model's groups (its lr / weight-decay recipe), then the similarity head's at ``run_lr x
        contrastive.head_lr_mult`` (tightTransf: one decayed group; GLSCL: norms and biases not decayed)."""
        groups = super().param_groups()
        mult = self.contrastive.head_lr_mult
        if self.tight is not None:
            groups.append({"name": "tight", "params": list(self.tight.parameters()), "lr": self.run_lr * mult,
                           "lr_mult": mult, "weight_decay": self.optim.weight_decay})  # fmt: skip
        if self.glscl is not None:
            for g in module_param_groups(self.glscl, self.run_lr * mult, self.optim.weight_decay):
                groups.append({**g, "name": f"glscl_{g['name']}", "lr_mult": mult})
        return groups

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():  # keep the parameter itself inside [0, log 100] (as CLIP does)
            self.model.logit_scale.clamp_(0.0, math.log(self.loss.max_scale))

    # -- evaluation ------------------------------------------------------------------------------
    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        self._eval.setdefault("skipped", []).extend(batch.get("skipped", []))
        if batch.get("video") is None or batch["video"].shape[0] == 0:  # every sample of the batch was skipped
            return
        ids, mask = self._text_inputs(batch)
        feats = self._eval_features(batch, ids, mask)  # name -> rows (per video or per caption)
        offset = sum(x.shape[0] for x in self._eval.get("video", []))
        for name, rows in feats.items():
            self._eval.setdefault(name, []).append(rows)
        self._eval.setdefault("index", []).append(batch["caption_index"].long() + offset)
        captions, owner = list(batch.get("captions", [])), batch["caption_index"].tolist()
        keys = self._eval.setdefault("keys", [])
        default_keys = [f"#{world_info()[0]}:{offset + i}" for i in range(feats["video"].shape[0])]
        for b, key in enumerate(batch.get("key", default_keys)):
            caps = [c for c, o in zip(captions, owner, strict=False) if o == b]
            keys.append(f"{key}\x00" + "\x1f".join(caps))  # identifies a sampler-padding duplicate

    def _eval_features(self, batch: dict[str, Any], ids: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """What evaluation keeps of a batch: normalised ``video [B, E]`` and ``text [A, E]``, plus the features of
        the similarity (``frames [B, T, E]``; for ``mug`` ``tokens [A, Lt, E]`` + ``token_mask [A, Lt]``; for
        ``tight`` ``frame_mask [B, T]`` + ``text_raw [A, E]``; for ``glscl`` those two + ``video_concepts [B, M, E]``
        + ``text_concepts [A, M, E]``)."""
        kind = self.contrastive.similarity
        t = self.model.encode_text(ids, mask)
        feats: dict[str, Tensor] = {}
        if kind == "cosine":
            feats["video"] = self.encode_video(batch["video"], *self._batch_audio(batch))  # [B, E]
        else:
            if batch["video"].ndim != 5:
                raise ValueError(f"similarity {kind!r} evaluates one view per video, got {tuple(batch['video'].shape)}")
            state = video_mask_state(self.block, batch.get("video_mask"))
            v = self.video_output(batch["video"], *self._batch_audio(batch), state=state)
            feats["video"] = F.normalize(v.embeds, dim=-1)
            vf, tf, _ = self.similarity_inputs(v, t, batch.get("video_mask"))
            feats["frames"] = vf[0].float()
            if kind == "tight":
                feats["frame_mask"], feats["text_raw"] = vf[1], tf.float()
            elif kind == "glscl":
                feats["frame_mask"], feats["video_concepts"] = vf[1], vf[2].float()
                feats["text_raw"], feats["text_concepts"] = tf[0].float(), tf[1].float()
            else:
                feats["tokens"], feats["token_mask"] = tf[0].float(), tf[1]
        feats["video"] = feats["video"].float()
        feats["text"] = F.normalize(t.embeds, dim=-1).float()
        return feats

    def _gathered(self) -> tuple[dict[str, Tensor], Tensor, int]:
        """All ranks' evaluation features (``video [B, E]``, ``text [A, E]`` and the similarity's, see
        :meth:`_eval_features`), the global ``caption_index [A]`` and the number of distinct skipped samples.

        Videos whose key and captions repeat an earlier one (a distributed sampler's padding) are
        dropped with their captions; the first occurrence is kept and order is preserved.
        """
        e, dim, dev = self._eval, self.model.embed_dim, self.device
        names = [n for n in e if n not in ("index", "keys", "skipped")] or ["video", "text"]
        feats = {n: torch.cat(e[n]) if e.get(n) else torch.empty(0, dim, device=dev) for n in names}
        index = torch.cat(e["index"]) if e.get("index") else torch.empty(0, dtype=torch.long, device=dev)
        rank, _ = world_info()
        per_rank = all_gather_objects((e.get("keys", []), e.get("skipped", [])))
        keys_per_rank = [k for k, _ in per_rank]
        offset = sum(len(k) for k in keys_per_rank[:rank])
        index = all_gather_no_grad(index + offset).cpu()
        feats = {n: all_gather_no_grad(x) for n, x in feats.items()}
        keys = [k for ks in keys_per_rank for k in ks]
        keep_video, new_id = first_occurrences(keys)  # [B_all], [B_all]
        keep_text = keep_video[index]  # [A_all]
        served = {k.split("\x00", 1)[0] for k in keys}
        skipped = {k for _, sk in per_rank for k in sk} - served  # a padding repeat of a bad sample counts once
        kept = {n: x[(keep_text if n in TEXT_FEATURES else keep_video).to(x.device)] for n, x in feats.items()}
        return kept, new_id[index[keep_text]], len(skipped)

    @torch.no_grad()
    def eval_similarity(self, feats: dict[str, Tensor]) -> Tensor:
        """The dense ``[A, B]`` similarity of ``mug`` / ``tight`` / ``glscl`` over the gathered gallery
        (``text_chunk`` captions at a time)."""
        chunk = self.evaluation.text_chunk
        if self.contrastive.similarity == "mug":
            rows = mug_similarity_rows(feats["tokens"], feats["token_mask"], feats["frames"], chunk=chunk)
            return torch.cat([r for _, r in rows], dim=0)
        if self.contrastive.similarity == "glscl":
            rows = self.glscl.similarity_rows((feats["text_raw"], feats["text_concepts"]),
                                              (feats["frames"], feats["frame_mask"], feats["video_concepts"]), chunk)
            return torch.cat([r for _, r in rows], dim=0)
        return self.tight(feats["text_raw"], feats["frames"], feats["frame_mask"], chunk=chunk).float()

    def _finish_eval(self, stage: str) -> None:
        if self.trainer.sanity_checking:
            self._eval = {}
            return
        feats, index, skipped = self._gathered()
        video, text = feats["video"], feats["text"]
        self._eval = {}
        if video.shape[0] == 0 or text.shape[0] == 0:
            raise RuntimeError(
                f"{stage}: no video to evaluate ({video.shape[0]} videos, {text.shape[0]} captions; {skipped} "
                "samples skipped as bad, see the bad-sample report)"
            )
        ev, protocol = self.evaluation, protocol_of(self.hparams)
        opts = dict(dsl=ev.dsl, dsl_temperature=ev.dsl_temperature, chunk=ev.text_chunk,
                    ties=protocol.ties if protocol else ev.ties,
                    v2t=protocol.captions.video_to_text if protocol else ev.v2t)
        with torch.autocast(self.device.type, enabled=False):  # fp32 similarities even under bf16 training
            if self.contrastive.similarity == "cosine":
                result = evaluate_embeddings(text, video, index, normalize=False, **opts)
            else:
                result = evaluate_similarity(self.eval_similarity(feats), index, **opts)
        counts = {"num_videos": video.shape[0], "num_captions": text.shape[0], "num_skipped": skipped}
        logs = {f"{stage}/{k}": float(v) for k, v in {**result.metrics, **counts}.items()}
        self.log_dict(logs, sync_dist=False)
        self.last_metrics = {stage: result.metrics}
        chance = chance_levels(index, video.shape[0])
        self.publish_report(lambda out_dir: self._write_report(out_dir, stage, result, chance, counts))

    def _write_report(
        self, out_dir: Path, stage: str, result: Any, chance: dict[str, float], counts: dict[str, int]
    ) -> None:
        ev = self.evaluation
        report = {
            "stage": stage,
            "epoch": self.current_epoch,
            "global_step": self.global_step,
            **counts,
            "metrics": result.metrics,
            "chance": chance,
            "options": {"ties": ev.ties, "v2t": ev.v2t, "dsl": ev.dsl, "dsl_temperature": ev.dsl_temperature,
                        "similarity": self.contrastive.similarity},
        }
        protocol = protocol_of(self.hparams)
        if protocol is not None:
            report.update(protocol.report_fields(counts["num_videos"], counts["num_captions"]))
            report["options"].update(ties=protocol.ties, v2t=protocol.captions.video_to_text)
        write_metrics(out_dir, stage, report)
        if ev.write_plots:
            from vidlang.eval.plots import plot_recall_at_k

            title = f"{stage} recall@K (epoch {self.current_epoch}, step {self.global_step})"
            plot_recall_at_k(result.ranks, out_dir / f"{stage}_recall_at_k.png", title=title)


def split_batch(batch: dict[str, Any], ids: Tensor, mask: Tensor, audio_mel: Tensor | None,
                audio_mask: Tensor | None, size: int) -> list[dict[str, Any]]:
    """``batch`` cut into micro-batches of ``size`` videos: ``video`` (+ ``video_mask``, audio), the captions of those
    videos (``input_ids`` / ``attention_mask``) and their ``caption_index`` within the micro-batch."""
    out = []
    index = batch["caption_index"]
    for start in range(0, batch["video"].shape[0], size):
        stop = min(start + size, batch["video"].shape[0])
        rows = (index >= start) & (index < stop)  # [A]
        mb = {"video": batch["video"][start:stop], "input_ids": ids[rows], "attention_mask": mask[rows],
              "caption_index": index[rows] - start}
        if batch.get("video_mask") is not None:
            mb["video_mask"] = batch["video_mask"][start:stop]
        if audio_mel is not None:
            mb["audio_mel"], mb["audio_mel_mask"] = audio_mel[start:stop], audio_mask[start:stop]
        out.append(mb)
    return out


@torch.no_grad()
def average_gradients(module: torch.nn.Module) -> None:
    """Under DDP with manual optimisation (the reducer is not used): average every trainable parameter's gradient
    over the ranks, in one flat all-reduce (a parameter without a gradient on a rank counts as zero there)."""
    if not is_distributed():
        return
    import torch.distributed as dist

    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def first_occurrences(keys: list[str]) -> tuple[Tensor, Tensor]:
    """``keep [N]`` (True at the first occurrence of each key) and ``new_id [N]`` (the compacted position of each
    key's first occurrence among the kept ones), e.g. ``[a, b, b, c]`` -> ``[T, T, F, T]``, ``[0, 1, 1, 2]``."""
    first: dict[str, int] = {}
    new_id = torch.tensor([first.setdefault(k, len(first)) for k in keys], dtype=torch.long)  # [N]
    seen: set[str] = set()
    keep = torch.tensor([not (k in seen or seen.add(k)) for k in keys], dtype=torch.bool)  # [N]
    return keep, new_id
