"""The chat-encoder task (Video-LLaMA): stage 1 on captions, stage 2 on instructions, VideoQA evaluation.

Thin LightningModule around :class:`vidlang.models.chat.ChatEncoder`. Batch contract
(:mod:`vidlang.data.collate`): ``video`` uint8 ``[B, T, C, H, W]`` (normalised here with the image
tower's mean/std), ``captions`` list of A strings, ``caption_index [A]`` (owner video of each caption;
optional when A == B), and optionally ``audio [B, S]`` + ``audio_lengths [B]`` + ``audio_mask [B]``
(16 kHz mono) when the task has an audio branch, and ``meta`` (a dict per video).

* Stage 1 (captions): ``BOS + media + caption`` with the loss on the caption (``train/loss_caption``).
* Stage 2 (instructions, :mod:`vidlang.data.formats.instruct`): when every video of a batch carries
  ``meta["conversation"]``, the conversations go through the LLM tokenizer's chat template with the media tokens
  at the placeholder and the loss on the assistant turns (``train/loss_chat``). Set ``chat.style: chat`` so that
  questions are asked the same way, ``init_from`` a stage-1 checkpoint, and optionally ``lora`` (adapters on the
  LLM) and ``llm_bits`` (8/4-bit LLM, CUDA).
* VideoQA evaluation (val / test entries with ``meta["qa"]``, :mod:`vidlang.data.formats.videoqa`): open-ended
  questions answered greedily and compared after normalisation, multiple choice by likelihood; rank 0 writes
  ``{stage}_metrics.json`` and ``{stage}_predictions.jsonl`` (:mod:`vidlang.eval.videoqa`). Other evaluation
  batches log their caption / conversation loss.

Only the Q-former(s), the projections and the LoRA adapters train. The frozen LLM is not stored in checkpoints
(its LoRA adapters are): it is reloaded from ``llm`` and its weights are put back into the loaded state dict before
strict loading. Parameter counts and memory are printed when training starts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from vidlang.models.audio.encoder import AudioConfig, build_audio_branch
from vidlang.models.audio.frontend import LogMelFrontend
from vidlang.models.chat import CAPTION_TEMPLATE, DEFAULT_TEMPLATE, ChatEncoder
from vidlang.models.chat_lora import format_size_report
from vidlang.models.factory import ModelConfig, build_model
from vidlang.tasks.base import VideoTask, adamw_warmup_cosine
from vidlang.tasks.config import CHAT_OPTIM, ChatEvalConfig, ChatLoraConfig, ChatPromptConfig, OptimConfig

LLM_PREFIX = "encoder.llm."


def _is_lora_key(key: str) -> bool:
    return "lora_" in key


class ChatEncoderTask(VideoTask):
    """Train the video (+audio) Q-former, the projections (and LoRA adapters) with the LLM frozen."""

    def __init__(
        self,
        model: ModelConfig | None = None,
        llm: str | None = None,
        audio: AudioConfig | None = None,
        template: str = DEFAULT_TEMPLATE,
        caption_template: str = CAPTION_TEMPLATE,
        max_caption_tokens: int = 64,
        optim: OptimConfig = CHAT_OPTIM,
        chat: ChatPromptConfig = ChatPromptConfig(),  # noqa: B008  (frozen)
        lora: ChatLoraConfig = ChatLoraConfig(),  # noqa: B008
        evaluation: ChatEvalConfig = ChatEvalConfig(),  # noqa: B008
        init_from: str | None = None,
        llm_bits: int | None = None,
        encoder: ChatEncoder | None = None,
    ) -> None:
        """``model``: the visual model config (its block must be ``qformer``). ``llm``: a local directory
        with a causal LM and its tokenizer. ``audio``: the audio branch config (None = video only).
        ``optim``: AdamW + warm-up cosine (:class:`~vidlang.tasks.config.OptimConfig`, or a mapping of its fields).
        ``chat``: prompt style (``template`` for stage 1, ``chat`` for stage 2), system message, chat template.
        ``lora``: LoRA adapters on the LLM. ``evaluation``: VideoQA evaluation. ``init_from``: a stage-1 (or
        earlier stage-2) ChatEncoderTask checkpoint whose Q-former / projection (/ adapter) weights start the
        training (read when fitting starts; a checkpoint of this task, once loaded, wins). ``llm_bits``: load the
        LLM in 8 or 4 bits (bitsandbytes, CUDA only).
        ``encoder``: a ready :class:`ChatEncoder` instead of ``model``/``llm``/``audio`` (programmatic use)."""
        super().__init__()
        model = self.model_config(model)
        if isinstance(audio, dict):
            audio = AudioConfig(**audio)
        groups = self.init_groups(optim=optim, chat=chat, lora=lora, evaluation=evaluation)
        self.save_config(ignore=["encoder"], model=model, audio=audio, **groups)
        self.optim, self.chat, self.lora, self.evaluation = (groups[k] for k in ("optim", "chat", "lora",
                                                                                   "evaluation"))
        self.encoder = encoder if encoder is not None else self._build(model, llm, audio, llm_bits)
        self._configure_encoder()
        self.frontend = LogMelFrontend() if self.encoder.audio is not None else None
        self._restored = False
        self._qa: list[dict[str, Any]] = []

    def _build(self, model: ModelConfig | None, llm: str | None, audio: AudioConfig | None,
               bits: int | None) -> ChatEncoder:
        if model is None or llm is None:
            raise ValueError("ChatEncoderTask needs `model` and `llm` (a local LLM directory), or `encoder`")
        if model.block != "qformer":
            raise ValueError(f"the chat encoder needs ModelConfig.block='qformer', got {model.block!r}")
        visual = build_model(model)
        branch = build_audio_branch(audio) if audio is not None else None
        return ChatEncoder.from_pretrained_llm(
            visual,
            llm,
            audio=branch,
            bits=bits,
            template=self.hparams.template,
            caption_template=self.hparams.caption_template,
            max_caption_tokens=self.hparams.max_caption_tokens,
        )

    def _configure_encoder(self) -> None:
        """The prompt settings of ``chat`` and the adapters of ``lora`` on the encoder. Adapters loaded from a
        folder are recorded in the hyper-parameters as their shape (a checkpoint rebuilds them and loads their
        weights from its state dict, without the folder)."""
        enc, c, lo = self.encoder, self.chat, self.lora
        enc.prompt_style, enc.system, enc.chat_template, enc.max_tokens = c.style, c.system, c.chat_template, \
            c.max_tokens  # fmt: skip
        if not lo.active or enc.has_lora:
            return
        if lo.adapter is not None:
            enc.load_adapter(lo.adapter, trainable=True)
            cfg = enc.llm.peft_config["default"]
            targets = cfg.target_modules if isinstance(cfg.target_modules, str) else sorted(cfg.target_modules)
            self.lora = dataclasses.replace(lo, enabled=True, adapter=None, r=cfg.r, alpha=float(cfg.lora_alpha),
                                            dropout=float(cfg.lora_dropout), target_modules=targets)
            self.hparams["lora"] = dataclasses.asdict(self.lora)
        else:
            enc.add_lora(lo.r, lo.alpha, lo.dropout, lo.target_modules)

    # -- batches ---------------------------------------------------------------------------------
    def _media(self, batch: dict[str, Any]) -> list[Tensor]:
        video = batch["video"]
        if video.ndim != 5:
            raise ValueError(f"chat-encoder training expects video [B, T, C, H, W], got {tuple(video.shape)}")
        mel = mask = None
        if self.frontend is not None and "audio" in batch:
            mel, mask = self.frontend.from_batch(batch["audio"], batch["audio_lengths"], batch["audio_mask"])
        return self.encoder.media_tokens(video, mel, mask)

    def caption_loss(self, batch: dict[str, Any]) -> Tensor:
        captions = list(batch["captions"])
        media = self._media(batch)
        owner = batch.get("caption_index")
        if owner is None:
            if len(captions) != len(media):
                raise ValueError(f"{len(captions)} captions for {len(media)} videos and no caption_index")
            owner = range(len(media))
        return self.encoder.caption_loss([media[int(i)] for i in owner], captions)

    @staticmethod
    def conversations(batch: dict[str, Any]) -> list[Any] | None:
        """The batch's conversations when every video carries one (instruction data), else None."""
        meta = batch.get("meta")
        if not meta or not all("conversation" in m for m in meta):
            return None
        return [m["conversation"] for m in meta]

    def conversation_loss(self, batch: dict[str, Any]) -> Tensor:
        conversations = self.conversations(batch)
        if conversations is None:
            raise ValueError("the batch has no conversations (batch['meta'][i]['conversation'])")
        return self.encoder.conversation_loss(self._media(batch), conversations)

    def batch_loss(self, batch: dict[str, Any]) -> tuple[str, Tensor]:
        """``("chat", conversation loss)`` for instruction batches, else ``("caption", caption loss)``."""
        if self.conversations(batch) is not None:
            return "chat", self.conversation_loss(batch)
        return "caption", self.caption_loss(batch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        kind, loss = self.batch_loss(batch)
        self.log_train({f"train/loss_{kind}": loss}, loss, batch["video"].shape[0])
        return loss

    # -- evaluation ------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self._qa = []

    def on_test_epoch_start(self) -> None:
        self._qa = []

    def on_validation_epoch_end(self) -> None:
        self._finish_qa("val")

    def on_test_epoch_end(self) -> None:
        self._finish_qa("test")

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        if batch.get("video") is None:  # every sample of the batch failed to load (skipped, vidlang.data.collate)
            return
        meta = batch.get("meta") or []
        if any(m.get("qa") for m in meta):
            self._qa += self.answer_questions(batch)
            return
        kind, loss = self.batch_loss(batch)
        self.log(f"{stage}/loss_{kind}", loss, batch_size=batch["video"].shape[0], sync_dist=True)

    @torch.no_grad()
    def answer_questions(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """Every question of the batch (``meta[i]["qa"]``) answered: open-ended ones greedily (``evaluation.
        max_new_tokens``), multiple-choice ones by likelihood -> prediction records (:mod:`vidlang.eval.videoqa`)."""
        from vidlang.eval.videoqa import open_correct

        enc, ev = self.encoder, self.evaluation
        media = self._media(batch)
        out: list[dict[str, Any]] = []
        open_rows: list[tuple[Tensor, dict[str, Any]]] = []
        for b, meta in enumerate(batch["meta"]):
            for qa in meta.get("qa", []):
                row = {"key": batch["key"][b], **{k: v for k, v in qa.items() if k != "answer_index"}}
                if "choices" in qa:
                    scores = enc.choice_scores(media[b], qa["question"], qa["choices"], ev.mc_score)
                    pick = int(scores.argmax())
                    row.update(prediction=qa["choices"][pick], scores=[round(float(x), 4) for x in scores],
                               correct=pick == int(qa["answer_index"]))
                    out.append(row)
                else:
                    open_rows.append((media[b], row))
        if open_rows:
            answers = enc.answer_batch([m for m, _ in open_rows], [r["question"] for _, r in open_rows],
                                       ev.max_new_tokens)
            for (_, row), answer in zip(open_rows, answers, strict=True):
                row.update(prediction=answer, correct=open_correct(answer, row["answer"]))
                out.append(row)
        return out

    def _finish_qa(self, stage: str) -> None:
        """Gather the predictions of every rank (each question once), log the accuracy, write the report."""
        from vidlang.losses.distributed import all_gather_objects

        if not any(all_gather_objects(bool(self._qa))):
            return
        from vidlang.eval.report import write_metrics
        from vidlang.eval.videoqa import qa_metrics, write_predictions

        seen: set[tuple[str, str]] = set()
        rows = []
        for part in all_gather_objects(self._qa):
            for r in part:  # evaluation padding repeats videos on some ranks: keep each question once
                if (r["key"], r["id"]) not in seen:
                    seen.add((r["key"], r["id"]))
                    rows.append(r)
        metrics = qa_metrics(rows)
        self.log(f"{stage}/qa_accuracy", float(metrics["accuracy"]), rank_zero_only=True)

        def write(out_dir: Any) -> None:
            write_metrics(out_dir, stage, metrics)
            if self.evaluation.write_predictions:
                write_predictions(out_dir / f"{stage}_predictions.jsonl", rows)

        self.publish_report(write)
        self.last_qa = {"metrics": metrics, "predictions": rows}

    # -- stage 2 start ---------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if stage == "fit" and self.hparams.get("init_from") and not self._restored:
            self.load_stage1(self.hparams.init_from)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.trainer.is_global_zero:
            print(format_size_report(self.encoder.size_report()), flush=True)

    def load_stage1(self, path: str) -> None:
        """Start from a ChatEncoderTask checkpoint: its Q-former(s), projections (and LoRA adapters, when both
        have them); the LLM's own weights are never read from it. Weights that do not fit raise
        :class:`~vidlang.errors.CheckpointError` naming ``path``."""
        from vidlang.checkpoints import check_weights, checkpoint_task, read_checkpoint, wrong_kind
        from vidlang.errors import CheckpointError

        ckpt = read_checkpoint(path)
        kind = checkpoint_task(ckpt, path)
        if kind != "chat":
            raise wrong_kind(path, kind, "ChatEncoderTask.init_from", ["chat"])
        own = self.state_dict()
        state = {k: v for k, v in ckpt["state_dict"].items()
                 if not k.startswith(LLM_PREFIX) or (_is_lora_key(k) and k in own)}
        try:
            missing, unexpected = self.load_state_dict(state, strict=False)
        except RuntimeError as err:
            raise CheckpointError(f"{path}: the stage-1 weights do not fit this model: {err}") from None
        check_weights(path, [k for k in missing if not k.startswith(LLM_PREFIX)], unexpected)
        print(f"stage 2 starts from {path} ({len(state)} tensors; LLM weights from {self.hparams.llm})", flush=True)

    # -- checkpoints -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The frozen LLM's weights stay out (its LoRA adapters are kept)."""
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(LLM_PREFIX) and not _is_lora_key(k)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Put the (reloaded, frozen) LLM weights back so that strict loading checks everything else."""
        self._restored = True
        state = checkpoint.get("state_dict")
        if state is not None:
            for k, v in self.encoder.llm.state_dict().items():
                if not _is_lora_key(k):
                    state.setdefault(LLM_PREFIX + k, v)

    # -- optimisation ---------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """The chat encoder's groups (its trainable parts: Q-former(s), projections, LoRA adapters)."""
        return self.encoder.param_groups(self.run_lr, self.optim.weight_decay)

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_warmup_cosine(self, self.param_groups(), self.optim,
                                   no_params="the chat encoder has no trainable parameters")
