"""Action recognition as a thin LightningModule: model + text classifier (+ linear head) + soft-target losses.

Classifier. Class names x prompt templates (ViFi-CLIP's ``"a photo of a {}."`` by default; ``_`` in a
class name becomes a space) go through the text tower; a class embedding is the mean of its
L2-normalised template embeddings, normalised again, and ``logits = exp(logit_scale) * v . t`` (scale
clamped to 100). While anything on the text side trains (text tower, or a block's text adapters) the
class embeddings are recomputed with gradient every training step; otherwise they are computed once
and cached. Evaluation always uses the text tower (zero-shot on any label set) unless the linear head
is the classifier and the evaluation label set is the training one (``classifier``). A block that declares
``conditions_text`` (X-CLIP) gets the unnormalised class embeddings and makes them video-specific
(``block.condition_text -> [B, K, E]``, normalised): each video is scored against its own classifier.

Class names: ``class_names`` (training) / ``eval_class_names`` if given, else the datamodule's index of
the split (``trainer.datamodule.indices[split].classes``), so training on label set A and evaluating on
label set B (zero-shot transfer, base-to-novel) just works. The resolved training names are kept in the
hyper-parameters and, with the evaluation names, in every checkpoint (``checkpoint["vidlang_classes"]``).

Losses. Soft-target cross-entropy with mixup / cutmix / label smoothing (:class:`MixupCutmix`, the same
lambda for every frame); the block's auxiliary losses (weights: ``aux_loss_weights``, else the block's
``default_aux_weights``, else 1); optionally M2-CLIP's multi-task terms (:mod:`vidlang.losses.m2clip`).

Multi-label data (Charades-style: the batch carries ``label_set [B, L]``, see :mod:`vidlang.data.collate`):
the targets are multi-hot ``[B, K]``. ``multi_label_loss="soft_ce"`` (default) normalises each row to sum 1
and uses the same soft-target cross-entropy over the class similarities (a video with m actions puts 1/m
on each; scale-free, so CLIP's text classifier needs no bias term, and mixup / cutmix / smoothing mix these
rows exactly like one-hot rows); ``"bce"`` uses binary cross-entropy with logits on the raw multi-hot rows
(mean over videos and classes; ``scale x cosine`` has no bias, so this suits the linear head best), and
evaluation then fuses views with a sigmoid instead of a softmax. M2-CLIP's terms and base-to-novel need
single-label data. Evaluation reports mAP (:mod:`vidlang.eval.classification`) instead of top-k accuracy.

Evaluation. ``video [B, T, C, H, W]`` or multi-view ``[B, V, T, C, H, W]`` (views clip-major, e.g. the
``multiview`` sampler x ``three_crop``): every view is classified, softmax (sigmoid with multi-label
``bce``) per view, averaged.
Reported: top-1/top-5/mean-class accuracy (multi-label: mAP, top-1) fused and per view, base/novel/harmonic
mean with ``evaluation.base_to_novel``, and ``num_videos``, the videos evaluated (kept in ``last_metrics[stage]``; the
per-view logits and labels of the last evaluation in ``last_outputs[stage]``). Under DDP the ranks' outputs
are gathered and a video evaluated twice (a distributed sampler pads ranks with repeats) counts once: items
are the same video when key, path and window agree; the first occurrence is kept. Rank 0 writes
``{stage}_metrics.json`` (+ history) and ``{stage}_confusion.png`` (single-label data) beside the checkpoint
(else the logger's directory, else ``default_root_dir``).

Tokenizer: as :class:`~vidlang.tasks.retrieval.RetrievalTask` (``set_tokenizer``, the checkpoint,
the ``tokenizer`` directory, ``trainer.datamodule.tokenizer``), embedded in every checkpoint.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vidlang.errors import ConfigError
from vidlang.eval.classification import ClassificationResult, evaluate_views, write_report
from vidlang.eval.protocols import protocol_of
from vidlang.losses.classification import multi_hot, soft_target_cross_entropy
from vidlang.losses.distributed import all_gather_no_grad, all_gather_objects
from vidlang.losses.m2clip import (
    M2CLIPMLM,
    CrossModalMLM,
    MLMVocabulary,
    build_mlm_batch,
    cross_modal_ce,
    cross_modal_ce_on_probabilities,
    mask_tokens,
    official_same_label_targets,
    soft_contrastive_kl,
)
from vidlang.models.contract import TemporalBlock, VideoOutput
from vidlang.models.factory import ModelConfig, build_model
from vidlang.models.temporal.video_mask import video_mask_state
from vidlang.tasks.base import EvalLoopMixin, TokenizerMixin, VideoTask, normalize_uint8_video
from vidlang.tasks.config import (
    RECOGNITION_OPTIM,
    HeadConfig,
    M2ClipConfig,
    MixConfig,
    OptimConfig,
    RecognitionEvalConfig,
)

log = logging.getLogger(__name__)
VIFI_TEMPLATES = ["a photo of a {}."]
CLASSES_KEY = "vidlang_classes"
CLASSIFIERS = ("auto", "text", "head")
MULTI_LABEL_LOSSES = ("soft_ce", "bce")
MAX_SCALE = 100.0


def prompts_for(class_names: list[str], templates: list[str]) -> list[str]:
    """``K * P`` prompts, class-major: class 0 with every template, then class 1, ..."""
    return [t.format(name.replace("_", " ")) for name in class_names for t in templates]


class RecognitionTask(EvalLoopMixin, TokenizerMixin, VideoTask):
    """Video classification by text prompts and/or a linear head (see the module docstring)."""

    def __init__(
        self,
        model: ModelConfig,
        tokenizer: str | None = None,
        class_names: list[str] | None = None,
        eval_class_names: list[str] | None = None,
        templates: list[str] | None = None,
        classifier: str = "auto",
        multi_label_loss: str = "soft_ce",
        aux_loss_weights: dict[str, float] | None = None,
        head: HeadConfig = HeadConfig(),  # noqa: B008  (frozen: a shared default is safe)
        optim: OptimConfig = RECOGNITION_OPTIM,
        mix: MixConfig = MixConfig(),  # noqa: B008
        m2clip: M2ClipConfig = M2ClipConfig(),  # noqa: B008
        evaluation: RecognitionEvalConfig = RecognitionEvalConfig(),  # noqa: B008
        protocol: str | None = None,
    ) -> None:
        """Build from config (the groups are :mod:`vidlang.tasks.config`; each may be given as a mapping of its fields).

        Args:
            model: the model config (freezing via ``model.freeze``, ``"auto"`` = the block's recipe).
            tokenizer: tokenizer directory (see :class:`~vidlang.tasks.base.TokenizerMixin`).
            class_names, eval_class_names: training / evaluation label sets (module docstring).
            templates: prompt templates with one ``{}`` (default ViFi-CLIP's).
            classifier: what evaluation uses: ``"text"``, ``"head"`` (falls back to text on another label set) or
                ``"auto"`` (head if there is one and M2-CLIP is off).
            multi_label_loss: ``"soft_ce"`` or ``"bce"`` for multi-label data (module docstring).
            aux_loss_weights: weight per auxiliary loss name, over the block's ``default_aux_weights``.
            head: the linear head (:class:`HeadConfig`: on, its init, its lr multiplier).
            optim: AdamW + warm-up cosine (:class:`OptimConfig`).
            mix: mixup / cutmix / label smoothing (:class:`MixConfig`).
            m2clip: M2-CLIP's losses (:class:`M2ClipConfig`; implies a head).
            evaluation: multi-view layout, base-to-novel split, text chunk, plots (:class:`RecognitionEvalConfig`).
            protocol: a named evaluation protocol (:mod:`vidlang.eval.protocols`): its view fusion replaces the
                loss's, and the metrics JSON embeds its name, hash and whether the evaluation has the official size.
        """
        super().__init__()
        if protocol is not None:
            from vidlang.eval.protocols import get_protocol

            get_protocol(protocol).require("recognition")  # an unknown name or a retrieval protocol: fail now
        model = self.model_config(model)
        groups = self.init_groups(head=head, optim=optim, mix=mix, m2clip=m2clip, evaluation=evaluation)
        if classifier not in CLASSIFIERS:
            raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {classifier!r}")
        if multi_label_loss not in MULTI_LABEL_LOSSES:
            raise ValueError(f"multi_label_loss must be one of {MULTI_LABEL_LOSSES}, got {multi_label_loss!r}")
        templates = list(templates or VIFI_TEMPLATES)
        bad = [t for t in templates if t.count("{}") != 1]
        if bad:
            raise ValueError(f"each prompt template needs exactly one '{{}}' for the class name: {bad}")
        self.save_config(model=model, templates=templates, **groups)
        self.head_config, self.optim, self.evaluation = groups["head"], groups["optim"], groups["evaluation"]
        self.templates = templates
        self.model = build_model(model)
        self.freeze_unreached_block_parts(calls_condition_text=True)  # class text goes through condition_text
        if self.model.block.conditions_text and groups["m2clip"].enabled:
            raise ConfigError(f"M2-CLIP's losses need one text embedding per class; the block {model.block!r} makes "
                              "them video-specific (conditions_text): disable m2clip or use another block")
        self.use_head = bool(self.head_config.enabled or groups["m2clip"].enabled)
        self.head: nn.Linear | None = None
        if self.use_head and class_names:
            self.head = nn.Linear(self.model.embed_dim, len(class_names))
        self.mixer = groups["mix"].build()
        self.aux_loss_weights = dict(aux_loss_weights or {})  # over the block's default_aux_weights
        self.m2_weights = groups["m2clip"].resolved_weights()
        self.m2 = groups["m2clip"]
        self.mlm: nn.Module | None = None
        self.mlm_vocab: MLMVocabulary | None = None
        if self.m2_weights.get("mlm", 0) > 0:
            if not self.m2.official:
                self.mlm = CrossModalMLM(self.model.embed_dim, self.model.text_tower.cfg.vocab_size)
            elif class_names:  # else built in setup, once the training classes are known (as the head)
                self._build_official_mlm(list(class_names))
        self.class_names_by_split: dict[str, list[str]] = {}
        if class_names:
            self.class_names_by_split["train"] = list(class_names)
        self._head_ready = False
        self._tokenizer: Any = None
        self._cached: dict[tuple[str, ...], Tensor] = {}
        self._eval: dict[str, list] = {}
        self.last_metrics: dict[str, dict[str, float]] = {}
        self.last_outputs: dict[str, dict[str, Tensor]] = {}  # stage -> {"logits" [N, V, K], "labels" [N] or [N, K]}

    # -- tokenizer -------------------------------------------------------------------------------
    def on_tokenizer_change(self) -> None:
        self._cached.clear()  # class embeddings depend on the tokenizer

    @property
    def context_length(self) -> int:
        return self.model.text_tower.cfg.context_length

    def _datamodule(self) -> Any:
        return getattr(self._trainer, "datamodule", None) if self._trainer is not None else None

    # -- class names -----------------------------------------------------------------------------
    def _data_classes(self, split: str) -> list[str] | None:
        index = getattr(self._datamodule(), "indices", {}).get(split)
        return list(index.classes) if index is not None and index.classes is not None else None

    def train_label_set(self) -> list[str]:
        names = self.class_names_by_split.get("train") or self._data_classes("train")
        if not names:
            raise RuntimeError("RecognitionTask: no training class names; set class_names or use data with classes")
        self.class_names_by_split["train"] = names
        return names

    def eval_label_set(self, split: str) -> list[str]:
        """Evaluation label set: ``eval_class_names`` > the data split's classes > the training classes."""
        names = self.hparams.eval_class_names or self._data_classes(split) or self.class_names_by_split.get(split)
        if not names:
            names = self.train_label_set()
        self.class_names_by_split[split] = list(names)
        return list(names)

    def _build_official_mlm(self, names: list[str]) -> None:
        """M2-CLIP's word-level MLM: the vocabulary of the first template's prompts, the 13th-block head."""
        self.mlm_vocab = MLMVocabulary.from_prompts(self.templates[:1], [n.replace("_", " ") for n in names])
        self.mlm = M2CLIPMLM.from_text_tower(self.model.text_tower, len(self.mlm_vocab)).to(self.device)

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        names = self.train_label_set()
        self.hparams["class_names"] = names
        if self.m2.official and self.m2_weights.get("mlm", 0) > 0 and self.mlm is None:
            self._build_official_mlm(names)
        if self.use_head and self.head is None:
            self.head = nn.Linear(self.model.embed_dim, len(names)).to(self.device)
        if self.head is not None and self.head.out_features != len(names):
            raise ValueError(f"the head has {self.head.out_features} classes but the training data {len(names)}")
        if self.head is not None and not self._head_ready and self.head_config.init == "text":
            self._init_head_from_text(names)  # a checkpoint restored after setup overwrites it
        self._head_ready = True
        if self.head is not None and not self.m2_weights and self.trainer.world_size > 1:
            self._freeze_unreached()

    def _freeze_unreached(self) -> list[str]:
        """Under DDP, with the linear head as the training classifier (no text in the loss): freeze the trainable
        parameters the loss cannot reach (the text tower, a block's text adapters); returns their names.

        They never get a gradient, and DDP, which all-reduces the gradient of every trainable parameter in
        buckets, would otherwise leave the ranks' gradients unsynchronised (then fail at the next step). Found by
        one forward + backward of a blank clip through the training path (video -> head, + aux losses), with the
        random state kept. Single-process training is left as it is (AdamW skips a parameter without gradient)."""
        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        cfg = self.model.image_tower.cfg
        video = torch.zeros(1, self.hparams.model["num_frames"], 3, cfg.image_size, cfg.image_size, device=self.device)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), torch.enable_grad():
            out = self.model.encode_video(video)
            loss = self.head_logits(F.normalize(out.embeds.float(), dim=-1)).sum()
            aux = self.weigh_aux(out.aux_losses)
            grads = torch.autograd.grad(loss if aux is None else loss + aux, [p for _, p in trainable],
                                        allow_unused=True)  # fmt: skip
        frozen = [n for (n, _), g in zip(trainable, grads, strict=True) if g is None]
        for name, param in trainable:
            if name in frozen:
                param.requires_grad_(False)
        if frozen:
            log.info("RecognitionTask: %d parameters the head-only loss cannot reach are frozen for DDP (%s ...)",
                     len(frozen), ", ".join(frozen[:3]))
        return frozen

    @torch.no_grad()
    def _init_head_from_text(self, names: list[str]) -> None:
        emb = F.normalize(self.class_embeddings(names, grad=False), dim=-1)  # [K, E]
        self.head.weight.copy_(emb)
        self.head.bias.zero_()

    # -- classifier ------------------------------------------------------------------------------
    def text_trains(self) -> bool:
        """True if any parameter that shapes the text embeddings requires grad."""
        if any(p.requires_grad for p in self.model.text_tower.parameters()):
            return True
        text_hooks = self.model.block.implemented_hooks() & set(TemporalBlock.TEXT_HOOKS)
        return bool(text_hooks) and any(p.requires_grad for p in self.model.block.parameters())

    def class_embeddings(self, class_names: list[str], grad: bool = False) -> Tensor:
        """Normalised class embeddings ``[K, E]`` = mean over templates of normalised prompt embeddings. With a
        block that ``conditions_text`` (X-CLIP): the mean of the *unnormalised* template embeddings, the input of
        its prompt generator (:meth:`text_logits` conditions them on each video, then normalises)."""
        prompts = prompts_for(class_names, self.templates)
        chunk = self.evaluation.text_chunk
        raw = self.model.block.conditions_text
        with torch.set_grad_enabled(grad):
            parts = []
            for s in range(0, len(prompts), chunk):
                ids, mask = self.tokenize(prompts[s : s + chunk])
                emb = self.model.encode_text(ids, mask).embeds.float()
                parts.append(emb if raw else F.normalize(emb, dim=-1))
            emb = torch.cat(parts).view(len(class_names), len(self.templates), -1).mean(dim=1)  # [K, E]
        return emb if raw else F.normalize(emb, dim=-1)

    def text_logits(self, out: VideoOutput, emb: Tensor, text_cls: Tensor) -> Tensor:
        """``scale x cosine`` logits ``[B, K]`` of the normalised video embeddings ``emb [B, E]`` against the class
        embeddings ``text_cls [K, E]`` (:meth:`class_embeddings`); a block that ``conditions_text`` first makes them
        video-specific from its output ``out`` (``[B, K, E]``, then normalised)."""
        if not self.model.block.conditions_text:
            return self.scale * emb @ text_cls.t()
        text = F.normalize(self.model.block.condition_text(text_cls, out).float(), dim=-1)  # [B, K, E]
        return self.scale * torch.einsum("be,bke->bk", emb, text)

    def _train_classifier(self, names: list[str]) -> Tensor:
        if self.text_trains():
            return self.class_embeddings(names, grad=True)
        key = tuple(names)
        if key not in self._cached:
            self._cached = {key: self.class_embeddings(names, grad=False)}
        return self._cached[key]

    def head_logits(self, emb: Tensor) -> Tensor:
        """Linear head on ``scale * emb`` (``emb [B, E]`` normalised): a cosine-like classifier whose
        weights stay O(1) (``head_init="text"`` starts it exactly as the zero-shot text classifier)."""
        return self.head(self.scale * emb)

    @property
    def scale(self) -> Tensor:
        return self.model.logit_scale.exp().clamp(max=MAX_SCALE)

    def _eval_uses_head(self, names: list[str]) -> bool:
        mode = self.hparams.classifier
        if mode == "auto":
            mode = "head" if self.use_head and not self.m2_weights else "text"
        train = self.class_names_by_split.get("train") or self.hparams.class_names
        return mode == "head" and self.head is not None and train is not None and list(train) == list(names)

    @torch.no_grad()
    def classify(self, video: Tensor, class_names: list[str] | None = None) -> Tensor:
        """Probabilities ``[B, K]`` for normalised ``video [B, T, C, H, W]`` or ``[B, V, T, C, H, W]``
        (softmax per view, averaged); ``class_names`` default to the training classes."""
        names = class_names or self.train_label_set()
        logits = self.view_logits(video, names, self.class_embeddings(names))
        return logits.float().softmax(dim=-1).mean(dim=1)

    def view_logits(self, video: Tensor, names: list[str], text_cls: Tensor,
                    video_mask: Tensor | None = None) -> Tensor:
        """``video [B, (V,) T, C, H, W]`` (``video_mask [B, (V,) T]`` of short clips) -> logits ``[B, V, K]`` (one
        forward per view)."""
        views = video[:, None] if video.ndim == 5 else video
        if views.ndim != 6:
            raise ValueError(f"video must be [B, T, C, H, W] or [B, V, T, C, H, W], got {tuple(video.shape)}")
        masks = None if video_mask is None else (video_mask[:, None] if video_mask.ndim == 2 else video_mask)
        use_head = self._eval_uses_head(names)
        out = []
        for v in range(views.shape[1]):
            state = video_mask_state(self.block, None if masks is None else masks[:, v])
            video_out = self.model.encode_video(views[:, v], state=state)
            emb = F.normalize(video_out.embeds.float(), dim=-1)  # [B, E]
            out.append(self.head_logits(emb) if use_head else self.text_logits(video_out, emb, text_cls))
        return torch.stack(out, dim=1)  # [B, V, K]

    # -- batches ---------------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Normalise uint8 frames on the device (float videos are taken as already normalised)."""
        return normalize_uint8_video(batch, self.model.image_mean, self.model.image_std)

    @staticmethod
    def _labels(batch: dict[str, Any], num_classes: int) -> Tensor:
        """Class indices ``[B]`` of a single-label batch, or multi-hot ``[B, K]`` when it carries ``label_set``."""
        if "label_set" in batch:
            try:
                return multi_hot(batch["label_set"], num_classes)
            except ValueError as e:
                raise ValueError(f"{e} (samples {list(batch.get('key', []))[:5]} ...)") from None
        labels = batch["label"].long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            keys = batch.get("key", [])
            bad = [keys[i] if i < len(keys) else i for i in torch.nonzero((labels < 0) | (labels >= num_classes))
                   .flatten().tolist()]
            raise ValueError(f"labels outside [0, {num_classes}) (-1 = unlabelled) for samples {bad[:5]}")
        return labels

    def _fuse(self, multi_label: bool) -> str:
        protocol = protocol_of(self.hparams)
        if protocol is not None:
            return protocol.fuse
        return "sigmoid" if multi_label and self.hparams.multi_label_loss == "bce" else "softmax"

    # -- training --------------------------------------------------------------------------------
    def forward_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and its (unweighted) parts for one training batch."""
        video = batch["video"]
        if video.ndim != 5:
            raise ValueError(f"recognition training expects video [B, T, C, H, W], got {tuple(video.shape)}")
        names = self.train_label_set()
        labels = self._labels(batch, len(names))  # [B], or multi-hot [B, K]
        multi = labels.ndim == 2
        if multi and self.m2_weights:
            raise ValueError("M2-CLIP's losses need single-label data; this batch is multi-label (label_set)")
        bce = multi and self.hparams.multi_label_loss == "bce"
        if multi and not bce:  # soft-target CE: a video with m labels puts 1/m on each
            labels = labels / labels.sum(dim=1, keepdim=True).clamp_min(1.0)
        mix = self.mixer(video, labels, len(names))
        vmask = batch.get("video_mask")
        if vmask is not None and mix.video is not video and not bool(vmask.all()):
            raise ConfigError("mixup / cutmix blend clips of different lengths: with data.sampling.short_video: "
                              "mask, set mix.mixup and mix.cutmix to 0 (or use short_video: repeat)")
        out = self.model.encode_video(mix.video, state=video_mask_state(self.block, vmask))
        emb = F.normalize(out.embeds.float(), dim=-1)  # [B, E]
        parts: dict[str, Tensor] = {}
        if self.head is not None and not self.m2_weights:  # plain linear classification: no text needed
            logits = self.head_logits(emb)
        else:
            text_cls = self._train_classifier(names)  # [K, E]
            logits = self.text_logits(out, emb, text_cls)  # [B, K]
            if self.m2_weights:
                parts.update(self._m2clip_parts(emb, out, text_cls, logits, mix.targets, labels, names))
        if not self.m2_weights:
            if bce:
                parts["bce"] = F.binary_cross_entropy_with_logits(logits.float(), mix.targets)
            else:
                parts["ce"] = soft_target_cross_entropy(logits, mix.targets)
        total = sum(self.m2_weights.get(k, 1.0) * v for k, v in parts.items())
        aux = self.weigh_aux(out.aux_losses)
        parts.update({f"aux_{name}": value for name, value in out.aux_losses.items()})
        return (total if aux is None else total + aux), parts

    def _m2clip_parts(self, emb: Tensor, out: Any, text_cls: Tensor, text_logits: Tensor, targets: Tensor,
                      labels: Tensor, names: list[str]) -> dict[str, Tensor]:
        w, parts, official = self.m2_weights, {}, self.m2.official
        if w["cross_modal"]:
            ce = cross_modal_ce_on_probabilities if official else cross_modal_ce
            parts["cross_modal"] = ce(text_logits, targets)
        if w["contrastive"]:
            soft = official_same_label_targets(labels) if official else None
            parts["contrastive"] = soft_contrastive_kl(self.scale * emb @ text_cls[labels].t(), targets, soft)
        if w["head"]:
            parts["head"] = soft_target_cross_entropy(self.head_logits(emb), targets)
        if self.mlm is not None and official:
            prompts = [self.templates[0].format(names[c].replace("_", " ")) for c in labels.tolist()]
            mlm = build_mlm_batch(prompts, self.tokenizer, self.mlm_vocab, rate=self.m2.mlm_rate,
                                  context_length=self.context_length)
            ids, mask = mlm.input_ids.to(self.device), mlm.attention_mask.to(self.device)
            hidden = self.model.encode_text(ids, mask).hidden  # [B, Lt, W]
            frames = out.frame_embeds if out.frame_embeds is not None else out.embeds[:, None]  # [B, T, E]
            parts["mlm"] = self.mlm.loss(hidden.float(), frames.float(), mlm.labels.to(self.device))
        elif self.mlm is not None:
            prompts = [self.templates[0].format(names[c].replace("_", " ")) for c in labels.tolist()]
            ids, mask = self.tokenize(prompts)
            masked, mlm_labels = mask_tokens(ids, mask, self.tokenizer.pad_id, self.m2.mlm_rate)
            tokens = self.model.encode_text(masked, mask).tokens  # [B, Lt, E]
            frames = out.frame_embeds if out.frame_embeds is not None else out.embeds[:, None]  # [B, T, E]
            parts["mlm"] = self.mlm.loss(tokens.float(), frames.float(), mlm_labels)
        return parts

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        total, parts = self.forward_loss(batch)
        logs = {"train/loss": total, **{f"train/loss_{k}": v for k, v in parts.items()}, "train/scale": self.scale}
        self.log_train(logs, total, batch["video"].shape[0])
        return total

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():  # keep the parameter itself inside [0, log 100] (as CLIP does)
            self.model.logit_scale.clamp_(0.0, math.log(MAX_SCALE))
        if self.text_trains():
            self._cached.clear()

    def param_groups(self) -> list[dict[str, Any]]:
        """The model's groups, then the task's own modules (the linear head, M2-CLIP's MLM head) at
        ``lr x head.lr_mult`` with the task's weight decay."""
        lr, wd, mult = self.run_lr, self.optim.weight_decay, self.head_config.lr_mult
        groups = self.model.param_groups(lr, wd)
        for name, module in (("head", self.head), ("mlm", self.mlm)):
            if module is not None:
                groups.append({"name": name, "params": [p for p in module.parameters() if p.requires_grad],
                               "lr": lr * mult, "lr_mult": mult, "weight_decay": wd})  # fmt: skip
        return groups

    # -- evaluation ------------------------------------------------------------------------------
    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        if "names" not in self._eval:
            names = self.eval_label_set("val" if stage == "val" else "test")
            self._eval = {"names": names, "text": self.class_embeddings(names), "logits": [], "labels": [], "ids": [],
                          "skipped": []}
        e = self._eval
        e["skipped"].extend(batch.get("skipped", []))
        if batch.get("video") is None or batch["video"].shape[0] == 0:  # every sample of the batch was skipped
            return
        labels = self._labels(batch, len(e["names"]))  # [B] or multi-hot [B, K]
        if e.setdefault("multi", labels.ndim == 2) != (labels.ndim == 2):
            raise ValueError(f"{stage} data mixes single-label and multi-label (label_set) batches")
        e["logits"].append(self.view_logits(batch["video"], e["names"], e["text"], batch.get("video_mask")).float())
        e["labels"].append(labels)
        e["ids"].extend(self._identities(batch, labels.shape[0], sum(x.shape[0] for x in e["logits"][:-1])))

    def _identities(self, batch: dict[str, Any], n: int, offset: int) -> list[tuple]:
        """What makes two evaluated items the same video: ``(key, path, window)`` (a sampler's repeat agrees
        on all three; two windows of one video do not)."""
        keys = batch.get("key") or [f"#{self.global_rank}:{offset + i}" for i in range(n)]
        paths = batch.get("path") or [""] * n
        window = batch.get("window")
        spans = [None] * n if window is None else [
            None if any(math.isnan(x) for x in w) else tuple(w) for w in window.tolist()]
        return [(str(k), str(p), w) for k, p, w in zip(keys, paths, spans, strict=True)]

    def _gathered(self) -> tuple[Tensor, Tensor, int, int]:
        """All ranks' logits ``[N, V, K]``, labels ``[N]`` (or multi-hot ``[N, K]``), the number of duplicates
        dropped (a video that occurs more than once, e.g. a distributed sampler's padding, is kept at its first
        occurrence in rank order) and the number of distinct samples skipped as bad. Collective: every rank
        calls it, also a rank whose every batch was skipped."""
        e = self._eval
        shapes = (tuple(e["logits"][0].shape[1:]), tuple(e["labels"][0].shape[1:])) if e["logits"] else None
        per_rank = all_gather_objects((e["ids"], e["skipped"], shapes))
        logit_shape, label_shape = next((s for _, _, s in per_rank if s is not None), ((1, len(e["names"])), ()))
        dev = self.device
        logits = torch.cat(e["logits"]) if e["logits"] else torch.zeros(0, *logit_shape, device=dev)
        labels = torch.cat(e["labels"]) if e["labels"] else torch.zeros(0, *label_shape, dtype=torch.long, device=dev)
        ids = [item for rank_ids, _, _ in per_rank for item in rank_ids]
        logits, labels = all_gather_no_grad(logits).cpu(), all_gather_no_grad(labels).cpu()
        first: dict[tuple, int] = {}
        keep = torch.tensor([first.setdefault(item, pos) == pos for pos, item in enumerate(ids)], dtype=torch.bool)
        served = {item[0] for item in ids}
        skipped = {key for _, keys, _ in per_rank for key in keys} - served
        return logits[keep], labels[keep], int((~keep).sum()), len(skipped)

    def _finish_eval(self, stage: str) -> None:
        if self.trainer.sanity_checking or "names" not in self._eval:  # every rank runs >= 1 step (Lightning)
            self._eval = {}
            return
        names = self._eval["names"]
        logits, labels, dropped, skipped = self._gathered()
        self._eval = {}
        if labels.shape[0] == 0:
            raise RuntimeError(f"{stage}: no video left to evaluate ({skipped} samples skipped as bad; see the "
                               "bad-sample report)")
        ev = self.evaluation
        split = None
        if ev.base_to_novel:
            from vidlang.data.formats.protocols import base_novel_split

            split = base_novel_split(len(names), ev.base_ratio, ev.split_seed)
        result = evaluate_views(logits, labels, ev.view_layout, split, fuse=self._fuse(labels.ndim == 2))
        result.metrics["num_videos"] = int(labels.shape[0])
        result.metrics["num_skipped"] = skipped
        logs = {f"{stage}/{k}": float(v) for k, v in result.metrics.items() if k not in ("num_samples", "map_classes")}
        if len(result.per_view) > 1:
            main = "mAP" if result.multi_label else "top1"
            logs.update({f"{stage}/{view}/{main}": m[main] for view, m in result.per_view.items()})
        self.log_dict(logs, sync_dist=False)
        self.last_metrics[stage] = result.metrics
        self.last_outputs[stage] = {"logits": logits, "labels": labels}
        self.publish_report(lambda out_dir: self._write_report(out_dir, stage, result, names, split, dropped))

    def _write_report(self, out_dir: Path, stage: str, result: ClassificationResult, names: list[str], split: Any,
                      dropped: int = 0) -> None:
        info = {
            "epoch": self.current_epoch,
            "global_step": self.global_step,
            "classifier": "head" if self._eval_uses_head(names) else "text",
            "templates": self.templates,
            "views": list(result.per_view),
            "duplicates_dropped": dropped,
        }
        if result.multi_label:
            info["multi_label_loss"] = self.hparams.multi_label_loss
        protocol = protocol_of(self.hparams)
        if protocol is not None:
            info.update(protocol.report_fields(int(result.metrics["num_videos"])))
        if split is not None:
            info["base_classes"], info["novel_classes"] = [names[i] for i in split[0]], [names[i] for i in split[1]]
        write_report(out_dir, stage, result, names, info, plot=self.evaluation.write_plots)

    # -- checkpoints -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.save_tokenizer(checkpoint)
        checkpoint[CLASSES_KEY] = dict(self.class_names_by_split)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._head_ready = True
        self.load_tokenizer(checkpoint)
        for split, names in checkpoint.get(CLASSES_KEY, {}).items():
            self.class_names_by_split.setdefault(split, list(names))
