"""The typed settings groups of the tasks (:mod:`vidlang.tasks`), as :mod:`vidlang.data.config` has for the data.

Each group is a frozen dataclass, one YAML mapping under ``model.init_args`` and one group of LightningCLI options
(``--model.init_args.optim.lr 1e-4``); a group may also be given as a mapping of its fields, which fills in over the
task's own defaults (the default of its argument), and an unknown key inside a group is an error::

    model:
      class_path: vidlang.tasks.recognition.RecognitionTask
      init_args:
        model: {image: vit_b16, block: stan}
        optim: {lr: 8.0e-6, weight_decay: 1.0e-3}
        mix: {mixup: 0.8, cutmix: 1.0}
        evaluation: {view_layout: [4, 3]}

The flat keys of before the groups (``lr``, ``mixup``, ``view_layout``, ...) are refused with a one-line error naming
their new place (:data:`TASK_MOVED`); checkpoints that carry them load (:meth:`vidlang.tasks.base.VideoTask.
hparams_from_checkpoint` maps them, with the model config's older keys).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from vidlang.config import MovedKeys, check_min
from vidlang.errors import ConfigError


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with a per-step linear warm-up then cosine decay (:mod:`vidlang.tasks.schedule`).

    Args:
        lr: the base learning rate; each parameter's is ``lr x`` its multiplier in the model's recipe
            (``ModelConfig.lr_mults``, :meth:`vidlang.models.video_clip.VideoTextModel.param_groups`).
        weight_decay: AdamW's (norms, biases, embeddings, prompts and ``logit_scale`` get none: the model's groups).
        betas, eps: AdamW's.
        warmup_steps: warm-up length in optimizer steps (wins over ``warmup_ratio``); warmup_ratio: the same as a
            fraction of the total steps (None and no ``warmup_steps``: no warm-up).
        min_lr_ratio: the cosine ends at ``min_lr_ratio x lr``.
        base_batch_size: the linear scaling rule: the lr actually used is ``lr x global batch / base_batch_size``
            (global batch = per-device batch x devices x nodes x gradient accumulation; printed at start-up).
            None: ``lr`` as given.
    """

    lr: float = 1e-5
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    warmup_steps: int | None = None
    warmup_ratio: float | None = 0.1
    min_lr_ratio: float = 0.0
    base_batch_size: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))  # a YAML list
        check_min("optim", 0, lr=self.lr, weight_decay=self.weight_decay, warmup_steps=self.warmup_steps,
                  min_lr_ratio=self.min_lr_ratio)  # fmt: skip
        check_min("optim", 1, base_batch_size=self.base_batch_size)

    def scaled_lr(self, global_batch: int) -> float:
        """The base lr of a run: ``lr x global_batch / base_batch_size`` with the linear scaling rule (M2-CLIP's
        ``blr x batch / 256``), else ``lr``."""
        return self.lr if self.base_batch_size is None else self.lr * global_batch / self.base_batch_size


# Each task's defaults (the default of its ``optim`` argument; a partial mapping fills in over them).
RETRIEVAL_OPTIM = OptimConfig(lr=1e-5, weight_decay=0.2, eps=1e-6, warmup_ratio=0.1)
RECOGNITION_OPTIM = OptimConfig(lr=2e-5, weight_decay=1e-3, eps=1e-8, warmup_ratio=0.1)
CHAT_OPTIM = OptimConfig(lr=1e-4, weight_decay=0.05, betas=(0.9, 0.999), warmup_ratio=0.05)


SIMILARITY_KINDS = ("cosine", "mug", "tight", "glscl")


@dataclass(frozen=True)
class ContrastiveConfig:
    """The retrieval loss (:class:`vidlang.losses.contrastive.ContrastiveLoss`) and the similarity it trains and
    evaluates with.

    Args:
        gather: gather the batch over ranks; local_loss: each rank's rows against the gathered columns.
        similarity: ``cosine`` (pooled embeddings), ``mug`` (Mug-STAN's parameter-free word x frame similarity,
            :func:`vidlang.models.similarity.mug_similarity`) or ``tight`` (CLIP4Clip's tightTransf cross-encoder,
            :class:`vidlang.models.cross_similarity.TightTransformerSimilarity`, a head of the task trained on the
            local batch with raw logits: no gather, no temperature) or ``glscl`` (GLSCL's global + local interaction,
            :class:`vidlang.models.glscl.GLSCLSimilarity`, a head of the task with learnable queries and auxiliary
            losses ``glscl_icl`` / ``glscl_icl_diag`` / ``glscl_idl``). Training and evaluation use the same one.
        temperature: a fixed temperature (logits = similarity / temperature; Mug-STAN: 0.01); None = CLIP's
            learnable ``logit_scale``.
        directions: the loss is the ``mean`` (CLIP, CLIP4Clip) or the ``sum`` (Mug-STAN) of text->video and
            video->text.
        tight_layers: layers of the tightTransf head (CLIP4Clip: 4, initialised from the text tower's first ones).
        similarity_args: arguments of the ``glscl`` head (``queries``, ``layers``, ``heads``, ``ffn``, ``dropout``,
            ``global_temperature``, ``local_weight``, ``margin``, ``diag_target``; defaults: the official ones).
        head_lr_mult: lr multiplier of the similarity head's parameters (``tight`` / ``glscl``), over the task's lr
            (the paper recipes train their heads at 1e-4 against CLIP's 1e-7: 1000).
        loss: the retrieval loss by name in :data:`vidlang.losses.LOSSES` (``infonce``, ``soft_target``, ``m2mix``,
            ``align_uniform``, ``symile``; ``docs/recipes.md``); loss_args: its own arguments (e.g.
            ``{smoothing: 0.1}``); ``gather`` / ``local_loss`` / ``temperature`` / ``directions`` come from here.
        micro_batch_size: encode the batch this many videos at a time with feature-cache gradient accumulation
            (:mod:`vidlang.losses.grad_cache`, GradCache / open_clip's ``accum_freq``): the loss still sees every
            negative of the (gathered) batch, the activations held are one micro-batch's. None: the whole batch at
            once. Needs ``similarity: cosine`` and a block without auxiliary losses or caption inputs; replaces
            ``trainer.accumulate_grad_batches`` and ``gradient_clip_val`` (manual optimisation).
    """

    gather: bool = True
    local_loss: bool = False
    similarity: Literal["cosine", "mug", "tight", "glscl"] = "cosine"
    temperature: float | None = None
    directions: Literal["mean", "sum"] = "mean"
    tight_layers: int = 4
    similarity_args: dict[str, Any] = field(default_factory=dict)
    head_lr_mult: float = 1.0
    loss: str = "infonce"
    loss_args: dict[str, Any] = field(default_factory=dict)
    micro_batch_size: int | None = None

    def __post_init__(self) -> None:
        from vidlang.losses import LOSSES  # here: the losses package imports nothing of the tasks

        object.__setattr__(self, "loss_args", dict(self.loss_args or {}))
        object.__setattr__(self, "similarity_args", dict(self.similarity_args or {}))
        check_min("contrastive", 0, head_lr_mult=self.head_lr_mult)
        check_min("contrastive", 1, micro_batch_size=self.micro_batch_size)
        if self.micro_batch_size is not None and self.similarity != "cosine":
            raise ConfigError("contrastive.micro_batch_size caches pooled embeddings: it needs similarity 'cosine', "
                              f"got {self.similarity!r}")
        kind = LOSSES.get(self.loss)  # an unknown name: one line listing the registered losses
        if getattr(kind, "needs_embeddings", False) and self.similarity != "cosine":
            raise ConfigError(f"contrastive.loss {self.loss!r} works on the pooled embeddings: it needs similarity "
                              f"'cosine', got {self.similarity!r}")
        if getattr(kind, "needs_audio", False):
            if self.similarity != "cosine":
                raise ConfigError(f"contrastive.loss {self.loss!r} scores (video, audio, caption) embeddings: it needs "
                                  f"similarity 'cosine', got {self.similarity!r}")
            if self.micro_batch_size is not None:
                raise ConfigError(f"contrastive.loss {self.loss!r} needs the audio embeddings, which the feature "
                                  "cache of contrastive.micro_batch_size does not carry: set it null")
        if self.similarity not in SIMILARITY_KINDS:
            raise ConfigError(f"contrastive.similarity must be one of {SIMILARITY_KINDS}, got {self.similarity!r}")
        if self.directions not in ("mean", "sum"):
            raise ConfigError(f"contrastive.directions must be 'mean' or 'sum', got {self.directions!r}")
        if self.temperature is not None and not self.temperature > 0:
            raise ConfigError(f"contrastive.temperature must be > 0 (or null), got {self.temperature}")
        if self.similarity == "tight" and self.temperature is not None:
            raise ConfigError("contrastive.temperature does not apply to similarity 'tight' (raw logits)")
        check_min("contrastive", 1, tight_layers=self.tight_layers)
        if self.similarity_args:
            self._check_similarity_args()

    def _check_similarity_args(self) -> None:
        if self.similarity != "glscl":
            raise ConfigError(f"contrastive.similarity_args apply to similarity 'glscl', not {self.similarity!r}")
        import inspect

        from vidlang.models.glscl import GLSCLSimilarity

        known = set(inspect.signature(GLSCLSimilarity).parameters) - {"embed_dim"}
        unknown = sorted(set(self.similarity_args) - known)
        if unknown:
            raise ConfigError(f"unknown contrastive.similarity_args {unknown} for 'glscl'; known: {sorted(known)}")


@dataclass(frozen=True)
class RetrievalEvalConfig:
    """Retrieval evaluation.

    Args:
        dsl, dsl_temperature: also report dual-softmax metrics (under ``dsl_`` keys) at this temperature.
        text_chunk: rows per similarity block.
        ties: rank tie rule (:mod:`vidlang.eval.retrieval`).
        v2t: the video -> text convention with several captions per video: ``best_caption`` (the video's best
            caption ranked among all captions) or ``clip4clip`` (captions collapsed by max per video, ranked among
            videos, as CLIP4Clip's multi-sentence evaluation); a ``protocol`` of the task overrides it.
        write_plots: write ``{stage}_recall_at_k.png`` beside the metrics.
    """

    dsl: bool = True
    dsl_temperature: float = 0.01
    text_chunk: int = 1024
    ties: Literal["pessimistic", "optimistic"] = "pessimistic"
    v2t: Literal["best_caption", "clip4clip"] = "best_caption"
    write_plots: bool = True

    def __post_init__(self) -> None:
        check_min("evaluation", 1, text_chunk=self.text_chunk)
        if self.ties not in ("pessimistic", "optimistic"):
            raise ConfigError(f"evaluation.ties must be 'pessimistic' or 'optimistic', got {self.ties!r}")
        if self.v2t not in ("best_caption", "clip4clip"):
            raise ConfigError(f"evaluation.v2t must be 'best_caption' or 'clip4clip', got {self.v2t!r}")


@dataclass(frozen=True)
class HeadConfig:
    """The recognition task's linear head.

    Args:
        enabled: add a linear head on ``exp(logit_scale) x`` the normalised video embedding (M2-CLIP adds it too).
        init: ``text`` (the class text embeddings: it starts as the zero-shot classifier) or ``random``.
        lr_mult: lr multiplier of the head (and of M2-CLIP's MLM head), the task's own modules.
    """

    enabled: bool = False
    init: Literal["text", "random"] = "text"
    lr_mult: float = 1.0

    def __post_init__(self) -> None:
        if self.init not in ("text", "random"):
            raise ConfigError(f"head.init must be 'text' or 'random', got {self.init!r}")
        check_min("head", 0, lr_mult=self.lr_mult)


@dataclass(frozen=True)
class MixConfig:
    """Mixup / cutmix / label smoothing of the recognition targets (:class:`vidlang.losses.classification.
    MixupCutmix`, the same lambda for every frame): Beta alphas ``mixup`` / ``cutmix`` (0 disables), ``mix_prob``
    the chance to mix a batch, ``switch_prob`` cutmix rather than mixup."""

    mixup: float = 0.8
    cutmix: float = 1.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1

    def build(self) -> Any:
        from vidlang.losses.classification import MixupCutmix

        return MixupCutmix(self.mixup, self.cutmix, self.mix_prob, self.switch_prob, self.label_smoothing)


@dataclass(frozen=True)
class M2ClipConfig:
    """M2-CLIP's multi-task losses (:mod:`vidlang.losses.m2clip`).

    Args:
        enabled: add them (implies the linear head).
        weights: over ``contrastive`` / ``cross_modal`` / ``head`` / ``mlm`` (0 disables a term), over the defaults:
            ``OFFICIAL_WEIGHTS`` (0.5 / 0.5 / 1 / 0.1) with ``official``, else ``DEFAULT_WEIGHTS`` (1 / 1 / 1 / 0.1).
        mlm_prob: the masking rate of the MLM term (None: 0.2 with ``official``, the share of masked words; else
            0.15, the share of masked tokens).
        official: the released code's losses: its weights, cross-entropy applied to the cross-modal
            *probabilities* (a bug of the release, kept for faithful runs), the soft targets ``softmax(10 x
            same label)`` and the word-level MLM (:func:`vidlang.losses.m2clip.build_mlm_batch` +
            :class:`~vidlang.losses.m2clip.M2CLIPMLM`). False: the corrected cross-entropy on logits, the
            same-label targets of the (mixed) targets and vidlang's token-level MLM.
    """

    enabled: bool = False
    weights: dict[str, float] = field(default_factory=dict)
    mlm_prob: float | None = None
    official: bool = False

    def __post_init__(self) -> None:
        from vidlang.losses.m2clip import DEFAULT_WEIGHTS

        object.__setattr__(self, "weights", dict(self.weights or {}))  # None in checkpoints of before the groups
        unknown = set(self.weights) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise ConfigError(f"unknown m2clip.weights {sorted(unknown)}; known: {sorted(DEFAULT_WEIGHTS)}")

    def resolved_weights(self) -> dict[str, float]:
        """The weight of each term when enabled, else ``{}``."""
        from vidlang.losses.m2clip import DEFAULT_WEIGHTS, OFFICIAL_WEIGHTS

        base = OFFICIAL_WEIGHTS if self.official else DEFAULT_WEIGHTS
        return {**base, **self.weights} if self.enabled else {}

    @property
    def mlm_rate(self) -> float:
        from vidlang.losses.m2clip import MLM_RATE

        return self.mlm_prob if self.mlm_prob is not None else (MLM_RATE if self.official else 0.15)


@dataclass(frozen=True)
class RecognitionEvalConfig:
    """Recognition evaluation.

    Args:
        view_layout: (clips, crops) of multi-view evaluation, for naming per-view results.
        base_to_novel, base_ratio, split_seed: also report base / novel / harmonic mean over the evaluation classes
            split by :func:`vidlang.data.formats.protocols.base_novel_split`.
        text_chunk: prompts per text-tower forward (the class embeddings, also in training).
        write_plots: write ``{stage}_confusion.png`` beside the metrics.
    """

    view_layout: tuple[int, int] | None = None
    base_to_novel: bool = False
    base_ratio: float = 0.5
    split_seed: int | None = None
    text_chunk: int = 256
    write_plots: bool = True

    def __post_init__(self) -> None:
        if self.view_layout is not None:
            object.__setattr__(self, "view_layout", tuple(self.view_layout))  # a YAML list
        check_min("evaluation", 1, text_chunk=self.text_chunk)



@dataclass(frozen=True)
class ChatPromptConfig:
    """How the chat encoder talks to its LLM (:class:`vidlang.models.chat.ChatEncoder`).

    Args:
        style: ``template`` (stage 1: captions after the media tokens, questions through the task's ``template``)
            or ``chat`` (stage 2: conversations and questions through the LLM tokenizer's chat template,
            :mod:`vidlang.models.chat_format`).
        system: a system message put before every conversation and question (``chat`` style; None: none).
        chat_template: a Jinja chat template instead of the tokenizer's own (None: the tokenizer's, or
            Video-LLaMA's ``###Human / ###Assistant`` turns when it has none).
        max_tokens: the longest training sequence, media tokens included (longer ones are cut at the end).
    """

    style: Literal["template", "chat"] = "template"
    system: str | None = None
    chat_template: str | None = None
    max_tokens: int = 1024

    def __post_init__(self) -> None:
        if self.style not in ("template", "chat"):
            raise ConfigError(f"chat.style must be 'template' or 'chat', got {self.style!r}")
        check_min("chat", 8, max_tokens=self.max_tokens)


@dataclass(frozen=True)
class ChatLoraConfig:
    """LoRA adapters on the chat encoder's LLM (``peft``, :mod:`vidlang.models.chat_lora`).

    Args:
        enabled: attach fresh adapters (trained with the Q-former and the projections; the LLM stays frozen).
        r, alpha, dropout: the adapters' rank, scale numerator (scale = alpha / r) and dropout.
        target_modules: the LLM's linear layers to adapt, by name suffix (``[q_proj, v_proj]``; ``all-linear``:
            every linear layer but the output head).
        adapter: a folder of saved adapters (``ChatEncoder.save_adapter``) to start from instead of fresh ones.
    """

    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: str | list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    adapter: str | None = None

    def __post_init__(self) -> None:
        check_min("lora", 1, r=self.r)
        check_min("lora", 0, dropout=self.dropout)
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", list(self.target_modules))
        if not self.target_modules:
            raise ConfigError("lora.target_modules is empty")

    @property
    def active(self) -> bool:
        return self.enabled or self.adapter is not None


@dataclass(frozen=True)
class ChatEvalConfig:
    """VideoQA evaluation of the chat encoder (val / test splits whose entries carry questions).

    Args:
        max_new_tokens: longest generated answer (open-ended questions, greedy).
        mc_score: multiple choice by the log-likelihood of each candidate: its ``sum`` over the answer's tokens or
            their ``mean``.
        write_predictions: write ``{stage}_predictions.jsonl`` (question, answer, prediction, correct) beside
            ``{stage}_metrics.json``.
    """

    max_new_tokens: int = 16
    mc_score: Literal["sum", "mean"] = "sum"
    write_predictions: bool = True

    def __post_init__(self) -> None:
        check_min("evaluation", 1, max_new_tokens=self.max_new_tokens)
        if self.mc_score not in ("sum", "mean"):
            raise ConfigError(f"evaluation.mc_score must be 'sum' or 'mean', got {self.mc_score!r}")


# The flat task arguments of before the groups -> where they live now (one table for every task: a key means the
# same in each). Refused with this hint when parsed; moved into their groups in older checkpoints.
TASK_MOVED = MovedKeys(
    "model.init_args",
    "task settings",
    {
        **{k: f"optim.{k}" for k in ("lr", "weight_decay", "betas", "eps", "warmup_steps", "warmup_ratio",
                                      "min_lr_ratio")},
        **{k: f"mix.{k}" for k in ("mixup", "cutmix", "mix_prob", "switch_prob", "label_smoothing")},
        "head": "head.enabled",
        "head_init": "head.init",
        "lr_mult_head": "head.lr_mult",
        "m2clip": "m2clip.enabled",
        "m2clip_weights": "m2clip.weights",
        "mlm_prob": "m2clip.mlm_prob",
        **{k: f"contrastive.{k}" for k in ("gather", "local_loss")},
        **{k: f"evaluation.{k}" for k in ("dsl", "dsl_temperature", "ties", "view_layout", "base_to_novel",
                                           "base_ratio", "split_seed", "text_chunk", "write_plots")},
    },
    also=(r"[Oo]ption 'KEY' is not accepted", r"does not accept option 'KEY'"),
    context=r"vidlang\.tasks\.",
)
