"""The hook contract between the towers and the temporal blocks: the one module both import.

What lives here: :class:`TowerSpec` (the tower shapes a block is built for), :class:`HookContext` (per-forward
state handed to every hook), :class:`VideoOutput` / :class:`TextOutput` (what a forward returns),
:class:`ImageTowerView` / :class:`TextTowerView` (what a block may read of a tower) and :class:`TemporalBlock`
(the base class of every block: hook methods and declared attributes). It imports nothing of
``vidlang.models``: towers (``models/clip``) and blocks (``models/temporal``) sit above it.

A temporal block is a registered ``nn.Module`` that plugs into hook points of the
image tower (and optionally the text tower). The tower calls only the hooks a block
overrides (see :meth:`TemporalBlock.implemented_hooks`). Notation: B videos, T frames,
L tokens (1 CLS + N patches [+ tokens a block appends]), C tower width, E embed dim.

Image-tower hooks, in call order for each forward of ``[B*T, 3, H, W]`` frames:

- ``embed(x[B*T, 1+N, C], ctx)``: after patch + position embedding, before ``ln_pre``.
- ``before_layer(i, x[B*T, L, C], ctx)``: residual stream before layer ``i``
  (``i == 0`` sees the encoder input *after* ``ln_pre``).
- ``attn_input(i, h[B*T, L, C], ctx)``: the normed input of layer ``i``'s attention only.
- ``before_mlp(i, x, ctx)``: residual stream between attention and MLP of layer ``i``.
- ``after_layer(i, x, ctx)``: output of layer ``i``. After the last layer the block must
  return exactly the tower's original ``1+N`` tokens (it removes what it appended);
  the tower then applies ``ln_post`` + projection to the CLS token.
- ``pool(frame_tokens[B, T, 1+N, C], frame_embeds[B, T, E], ctx) -> VideoOutput``.

Text-tower hooks (``ctx.frames == 1``): ``text_embed``, ``text_before_layer``,
``text_before_mlp``, ``text_after_layer`` with the same meaning on ``[A, Lt, W]``.

Short clips (``data.sampling.short_video: mask``): the task puts the collated ``video_mask [B, T]`` (bool, True =
real frame, a valid prefix in every row) in ``ctx.state[VIDEO_MASK_KEY]`` (``encode_video(video, state=...)``); the
blocks that declare ``uses_video_mask`` leave the padded slots out of what they pool, the others refuse a mask with
padding (:func:`vidlang.models.temporal.video_mask.video_mask_state`).

Blocks put auxiliary losses in ``ctx.aux_losses`` (name -> scalar); tasks weigh them with
:func:`vidlang.losses.aux.weigh_aux_losses` (the block's ``default_aux_weights``, then the task's overrides).
The towers of the forward are in ``ctx.image_tower`` / ``ctx.text_tower`` (read them there: a block keeps no
tower references). Blocks never parse arguments, call collectives or special-case datasets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from torch import Tensor, nn

from vidlang.errors import ConfigError

IMAGE_TOWER_KINDS = ("clip", "timm")  # ImageTowerView.kind: vidlang's CLIP ViT, or a timm ViT trunk
VIDEO_MASK_KEY = "video_mask"  # HookContext.state key of the bool [B, T] frame mask (module docstring)


@dataclass(frozen=True)
class TowerSpec:
    """Shapes of the towers a block is built for (and the kind of image tower, see :class:`ImageTowerView`)."""

    width: int  # C, image tower width
    layers: int  # number of image transformer layers
    heads: int
    embed_dim: int  # E, joint embedding size
    grid: tuple[int, int]  # patch grid (h, w); N = h * w
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    context_length: int = 77
    vocab_size: int = 49408
    image_kind: str = "clip"  # ImageTowerView.kind
    rotary: bool = False  # ImageTowerView.rotary

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


class ImageTowerView(Protocol):
    """What a block may read of the image tower (in ``init_from_tower`` and as ``ctx.image_tower``)."""

    kind: str  # one of IMAGE_TOWER_KINDS
    grid: tuple[int, int]  # the patch grid of the tower's own image size

    @property
    def width(self) -> int: ...  # C

    @property
    def embed_dim(self) -> int: ...  # E

    @property
    def rotary(self) -> bool: ...  # attention uses rotary position embeddings: appended tokens are not covered

    def layer_list(self) -> nn.ModuleList: ...  # the transformer layers

    def class_position_embedding(self, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """The class embedding ``[C]`` and the position embedding ``[1+N, C]`` resampled to ``grid``."""
        ...


class TextTowerView(Protocol):
    """What a block may read of the text tower (in ``init_from_tower`` and as ``ctx.text_tower``)."""

    token_embedding: nn.Embedding  # [vocab, W]
    positional_embedding: nn.Parameter  # [context, W]

    def layer_list(self) -> nn.ModuleList: ...  # the transformer layers (vidlang's CLIP layers)

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """``[A, Lt]`` ids -> token + position embeddings ``[A, Lt, W]`` (the input of the first layer)."""
        ...


@dataclass
class HookContext:
    """Per-forward state handed to every hook. Blocks may keep scratch tensors in ``state``.

    ``image_tower`` / ``text_tower``: the model's towers for this forward (the one running the hooks, and for
    ``pool`` both); a block reads them here, at call time, instead of keeping references of its own.
    """

    batch: int  # B (videos) or A (captions) for the text tower
    frames: int  # T; 1 for the text tower
    grid: tuple[int, int] = (0, 0)
    training: bool = False
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    attention_mask: Tensor | None = None  # text only: [A, Lt] 1 = token, 0 = padding
    image_tower: ImageTowerView | None = None
    text_tower: TextTowerView | None = None


@dataclass
class VideoOutput:
    embeds: Tensor  # [B, E] video embedding (not normalised)
    frame_embeds: Tensor | None = None  # [B, T, E] projected per-frame embeddings
    tokens: Tensor | None = None  # [B, M, D] tokens for Q-former / chat consumers
    aux_losses: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class TextOutput:
    embeds: Tensor  # [A, E] projected EOT features (not normalised)
    tokens: Tensor | None = None  # [A, Lt, E] projected token features (Mug)
    mask: Tensor | None = None  # [A, Lt] bool, True for real tokens
    hidden: Tensor | None = None  # [A, Lt, W] output of the last text layer, before ln_final (M2-CLIP's MLM)
    aux_losses: dict[str, Tensor] = field(default_factory=dict)


class TemporalBlock(nn.Module):
    """Base class of every temporal block. Subclasses override the hooks they need.

    Declared attributes (read by the factory, the tasks and the chat encoder; never looked up with ``getattr``):

    - ``freeze_backbone``: the paper's freezing policy (``ModelConfig.freeze="auto"``: block only, or everything).
    - ``zero_init_identity``: True if the block starts as the identity (frame-mean CLIP), as the paper initialises it.
    - ``default_aux_weights``: weight of each auxiliary loss the block emits (unlisted ones weigh 1.0); a task's
      ``aux_loss_weights`` override them (:func:`vidlang.losses.aux.weigh_aux_losses`).
    - ``lr_mults``: the paper's learning-rate multipliers of the block's parameters, by parameter-name prefix
      relative to the block (``""`` = the whole block; the longest prefix wins), e.g. ``{"": 10.0}`` or
      ``{"": 10.0, "aggregate": 1.0}``; ``ModelConfig.lr_mults`` override them (as ``block.<prefix>``).
    - ``weight_decays``: weight decay by relative prefix (absent: the task's weight decay).
    - ``token_dim``: the width D of ``VideoOutput.tokens`` (None: the block outputs no tokens).
    - ``embed_head``: the module that turns the tokens into the pooled embedding (None if there is none), which a
      consumer of the tokens alone (the chat encoder) leaves untrained.
    - ``llm_head``: a trained projection of the tokens to an LLM's width (Video-LLaMA's ``llama_proj``) that the
      chat encoder starts its video projection from (None: the chat encoder initialises its own).
    - ``uses_video_mask``: True if ``pool`` honours ``ctx.state[VIDEO_MASK_KEY]`` (padded frames of short clips
      left out); blocks without it refuse a mask with padding.
    - ``supported_towers``: the image-tower kinds the block works on; :meth:`check_tower` refuses the others (and
      rotary towers for blocks that append image tokens, ``appends_image_tokens``) with a ConfigError.
    - ``conditions_text``: True if the block turns text (class) embeddings into video-specific ones,
      :meth:`condition_text` (X-CLIP's prompt generator); the recognition task then scores each video against its
      own class embeddings.
    - ``conditioning_parameters``: the trainable parameters only :meth:`condition_text` reaches (with the visual
      tokens made for it); a task that never calls it freezes them (under DDP a parameter without a gradient on
      every step fails the gradient synchronisation), as tasks other than the chat encoder freeze ``llm_head``.
    """

    IMAGE_HOOKS: ClassVar[tuple[str, ...]] = ("embed", "before_layer", "attn_input", "before_mlp", "after_layer")
    TEXT_HOOKS: ClassVar[tuple[str, ...]] = ("text_embed", "text_before_layer", "text_before_mlp", "text_after_layer")
    freeze_backbone: ClassVar[bool] = False
    zero_init_identity: ClassVar[bool] = False
    default_aux_weights: ClassVar[Mapping[str, float]] = {}
    lr_mults: ClassVar[Mapping[str, float]] = {"": 1.0}
    weight_decays: ClassVar[Mapping[str, float]] = {}
    uses_video_mask: ClassVar[bool] = False
    supported_towers: ClassVar[frozenset[str]] = frozenset(IMAGE_TOWER_KINDS)
    tower_requirement: ClassVar[str] = ""  # why a kind is not supported (part of check_tower's message)

    @property
    def conditions_text(self) -> bool:
        """True if :meth:`condition_text` makes class embeddings video-specific (per instance: a block option)."""
        return False

    def conditioning_parameters(self) -> list[nn.Parameter]:
        """The parameters only :meth:`condition_text` (and its visual tokens) use; empty by default."""
        return []

    @property
    def wants_caption_ids(self) -> bool:
        """True if training forwards need ``ctx.state["caption_ids"]`` (one caption per video, ``[B, Lt]``);
        the model's ``caption_state`` then provides them (Prompt Switch's captioning head)."""
        return False

    @property
    def token_dim(self) -> int | None:
        """D of ``VideoOutput.tokens [B, M, D]``; None if the block outputs no tokens."""
        return None

    @property
    def embed_head(self) -> nn.Module | None:
        """The module mapping the tokens to the pooled embedding (None: no such module)."""
        return None

    @property
    def llm_head(self) -> nn.Linear | None:
        """A trained ``Linear(token_dim -> LLM width)`` the chat encoder starts from (None: none)."""
        return None

    @property
    def appends_image_tokens(self) -> bool:
        """True if the hooks add tokens to the image sequence (prompts), which rotary towers cannot place."""
        return False

    def check_tower(self, spec: TowerSpec) -> None:
        """Raise :class:`ConfigError` (naming the reason) if the block cannot run on the image tower of ``spec``."""
        if spec.image_kind not in self.supported_towers:
            why = f": {self.tower_requirement}" if self.tower_requirement else ""
            supported = ", ".join(sorted(self.supported_towers))
            raise ConfigError(f"does not work on a {spec.image_kind} image tower (it supports: {supported}){why}")
        if spec.rotary and self.appends_image_tokens:
            raise ConfigError(
                "appends tokens to the image sequence, which the image tower's rotary position embeddings do not "
                "cover: use a tower without rotary embeddings, or other block arguments"
            )

    def __init__(self, spec: TowerSpec) -> None:
        super().__init__()
        self.spec = spec

    def implemented_hooks(self) -> frozenset[str]:
        """Names of the hooks this block overrides; the towers call only these."""
        names = self.IMAGE_HOOKS + self.TEXT_HOOKS
        return frozenset(n for n in names if getattr(type(self), n) is not getattr(TemporalBlock, n))

    def init_from_tower(self, image_tower: ImageTowerView, text_tower: TextTowerView | None) -> None:  # noqa: B027
        """Called once after pretrained weights are loaded (e.g. STAN copies CLIP layers); read the towers here,
        never keep them (the forward hands them over in ``ctx``)."""

    def bind_tokenizer(self, tokenizer: Any, text_tower: TextTowerView, fresh: bool) -> None:  # noqa: B027
        """Called by the tasks when training starts, with the tokenizer the captions / prompts are encoded with
        (a ``ClipTokenizer``). ``fresh``: the block's weights are newly built, not restored from a checkpoint
        (initialisations that depend on words, e.g. ViFi-CLIP's text context from "a photo of a", happen only
        then). Default: nothing."""

    # -- image hooks ---------------------------------------------------------------------------
    def embed(self, x: Tensor, ctx: HookContext) -> Tensor:
        return x

    def before_layer(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        return x

    def attn_input(self, i: int, h: Tensor, ctx: HookContext) -> Tensor:
        return h

    def before_mlp(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        return x

    def after_layer(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        return x

    # -- text hooks ----------------------------------------------------------------------------
    def text_embed(self, x: Tensor, ctx: HookContext) -> Tensor:
        return x

    def text_before_layer(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        return x

    def text_before_mlp(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        return x

    def text_after_layer(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        return x

    # -- video-specific text ----------------------------------------------------------------------
    def condition_text(self, text: Tensor, video: VideoOutput) -> Tensor:
        """Video-specific text embeddings: ``text [K, E]`` (unnormalised) and the output of ``B`` videos ->
        ``[B, K, E]`` (unnormalised). Only blocks that declare ``conditions_text`` implement it."""
        raise NotImplementedError(f"{type(self).__name__} does not condition text on the video (conditions_text)")

    # -- pooling ---------------------------------------------------------------------------------
    def pool(self, frame_tokens: Tensor, frame_embeds: Tensor, ctx: HookContext) -> VideoOutput:
        """Default: mean of the frame embeddings over T."""
        return VideoOutput(embeds=frame_embeds.mean(dim=1), frame_embeds=frame_embeds)

    def extra_param_count(self) -> int:
        return sum(p.numel() for p in self.parameters())
