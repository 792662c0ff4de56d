"""``vpt``: deep vision and text prompts (ViFi-CLIP's "bridge and prompt", vision-language prompting), backbone frozen.

Official code: ``muzairkhattak/ViFi-CLIP`` (``trainers/vificlip.py`` ``VLPromptLearner``, ``clip/model.py``).

Vision: ``n_vision`` learned tokens are appended after CLS + patches at the ``embed`` hook (after the position
embedding, before ``ln_pre``), replaced by fresh per-layer tokens before layers ``1 .. depth-1`` and removed
after the last layer, so pooling sees the original ``1+N`` tokens (pooling: the frame mean).

Text (``text_placement``):

- ``"overwrite"`` (official, default): the prompt is ``SOT, ctx_1..ctx_n, caption words, EOT`` as if the caption
  had been tokenised behind ``n`` placeholder words whose embeddings the learned vectors overwrite: the vectors
  sit at positions ``1..n`` *with* those positions' embeddings, and the words move ``n`` positions on (their
  position embeddings re-indexed). The sequence keeps at most the tower's context length: a caption whose words
  do not fit loses its last words, EOT kept. Official prompt checkpoints load with
  :meth:`DeepPrompts.load_official_state_dict` (and :meth:`DeepPrompts.official_state_dict` writes one).
- ``"insert"``: the vectors are inserted after SOT without position embeddings; the words keep their own positions.

In both, the attention mask grows by ``n``, per-layer vectors replace positions ``1..n`` before layers
``1 .. text_depth-1`` (without position embeddings, as official) and the prompt tokens are removed after the last
layer, so the tower pools the caption's own EOT.

Initialisation (official rule): all prompts N(0, 0.02); the first-layer text vectors take the token embeddings of
``ctx_init`` ("a photo of a") only when ``n_text <= 4``. That needs the tokenizer, so it is a call made once on a
freshly built model: :meth:`DeepPrompts.init_text_context`. Defaults ``n_vision = n_text = 10``, ``depth =
text_depth = 12`` are the official few-shot prompting configs; the base-to-novel configs use 16 / 16 and depth 9.

Deviations from the official code:

- The official forward casts the vision prompts and the deeper text prompts to fp16 (``.half()``); here they take
  the activations' dtype.
- Overwrite placement moves the words by re-indexing their position embeddings (``x_j - pos_j + pos_{j+n}``):
  equal to embedding the shifted sequence up to float rounding. Over-long captions are cut (official
  ``clip.tokenize`` raises).
- ``"insert"`` placement is vidlang's own.
- Weight decay: official AdamW decays the prompts (1e-3); ``VideoTextModel.param_groups`` never decays prompts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from vidlang.models.contract import HookContext, TemporalBlock, TextTowerView, TowerSpec
from vidlang.models.temporal.base import BLOCKS

TEXT_PLACEMENTS = ("overwrite", "insert")
MAX_INIT_CTX = 4  # official: ctx_init words are used only for n_ctx <= 4


class PromptTokenizer(Protocol):
    """``tokenizer(texts, context_length) -> (input_ids [A, L], attention_mask [A, L])`` with BOS first."""

    def __call__(self, texts: list[str], context_length: int | None = None) -> tuple[Tensor, Tensor]: ...


def _prompts(depth: int, n: int, width: int) -> nn.Parameter | None:
    if n <= 0 or depth <= 0:
        return None
    p = nn.Parameter(torch.empty(depth, n, width))  # [depth, n, C]
    nn.init.normal_(p, std=0.02)
    return p


def official_prompt_keys(depth: int, text_depth: int) -> dict[str, tuple[str, int]]:
    """Official ViFi-CLIP state-dict key -> (``vision_prompts`` / ``text_prompts``, layer index)."""
    keys: dict[str, tuple[str, int]] = {}
    if depth > 0:
        keys["image_encoder.VPT"] = ("vision_prompts", 0)
        keys.update({f"image_encoder.transformer.resblocks.{i}.VPT_shallow": ("vision_prompts", i)
                     for i in range(1, depth)})  # fmt: skip
    if text_depth > 0:
        keys["prompt_learner.ctx"] = ("text_prompts", 0)
        keys.update({f"text_encoder.transformer.resblocks.{i}.VPT_shallow": ("text_prompts", i)
                     for i in range(1, text_depth)})  # fmt: skip
    return keys


@BLOCKS.register("vpt")
class DeepPrompts(TemporalBlock):
    freeze_backbone = True

    def __init__(
        self,
        spec: TowerSpec,
        n_vision: int = 10,
        n_text: int = 10,
        depth: int | None = None,
        text_depth: int | None = None,
        text_placement: str = "overwrite",
        ctx_init: str | None = "a photo of a",
    ) -> None:
        super().__init__(spec)
        depth = min(12, spec.layers) if depth is None else depth
        text_depth = min(12, spec.text_layers) if text_depth is None else text_depth
        if not 0 <= depth <= spec.layers or not 0 <= text_depth <= spec.text_layers:
            raise ValueError(
                f"vpt depth {depth}/{text_depth} exceeds the towers' {spec.layers}/{spec.text_layers} layers"
            )
        if text_placement not in TEXT_PLACEMENTS:
            raise ValueError(f"vpt text_placement must be one of {', '.join(TEXT_PLACEMENTS)}, got {text_placement!r}")
        if text_placement == "overwrite" and n_text > 0 and n_text + 2 > spec.context_length:
            raise ValueError(f"vpt: {n_text} text prompts + SOT + EOT exceed the context length {spec.context_length}")
        self.n_vision, self.n_text = n_vision, n_text
        self.text_placement = text_placement
        self.ctx_init = ctx_init
        self.vision_prompts = _prompts(depth, n_vision, spec.width)  # [depth, n_vision, C]
        self.text_prompts = _prompts(text_depth, n_text, spec.text_width)  # [text_depth, n_text, W]

    @property
    def appends_image_tokens(self) -> bool:
        return self.vision_prompts is not None

    @property
    def depths(self) -> tuple[int, int]:
        """(vision, text) prompt depth."""
        return tuple(0 if p is None else p.shape[0] for p in (self.vision_prompts, self.text_prompts))

    # -- initialisation and official checkpoints ------------------------------------------------------------
    def bind_tokenizer(self, tokenizer: Any, text_tower: TextTowerView, fresh: bool) -> None:
        """The contract's hook: on a freshly built block, the official text-context initialisation
        (:meth:`init_text_context`); trained or restored prompts are left alone."""
        if fresh:
            self.init_text_context(tokenizer, text_tower)

    def init_text_context(self, tokenizer: PromptTokenizer, text_tower: TextTowerView) -> bool:
        """Official rule: with ``ctx_init`` and ``n_text <= 4`` the first-layer text vectors become the token
        embeddings of the first ``n_text`` tokens of ``ctx_init`` (positions ``1..n`` of its tokenisation);
        otherwise they stay N(0, 0.02). Call once on a freshly built model (never after loading trained prompts).
        Returns True if the vectors were set."""
        if self.text_prompts is None or not self.ctx_init or self.n_text > MAX_INIT_CTX:
            return False
        n = self.n_text
        ids, _ = tokenizer([self.ctx_init.replace("_", " ")], n + 2)  # [1, n+2]: BOS, first n tokens, EOT
        with torch.no_grad():
            emb = text_tower.token_embedding(ids[0, 1 : 1 + n].to(text_tower.token_embedding.weight.device))
            self.text_prompts[0].copy_(emb.to(self.text_prompts.dtype))
        return True

    def official_state_dict(self) -> dict[str, Tensor]:
        """The prompts under the official ViFi-CLIP parameter names (``prompt_learner.ctx``, ``*.VPT``, ...)."""
        keys = official_prompt_keys(*self.depths)
        return {key: getattr(self, name)[i].detach().clone() for key, (name, i) in keys.items()}

    def load_official_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load the prompts of an official ViFi-CLIP checkpoint (its ``model`` dict or the file's whole dict;
        a DDP ``module.`` prefix is dropped; tower weights and class buffers are ignored). Every prompt this block
        has must be present with its shape; prompts the block does not have are refused."""
        sd = state.get("model", state) if isinstance(state, Mapping) else state
        sd = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items()}
        keys = official_prompt_keys(*self.depths)
        missing = [k for k in keys if k not in sd]
        extra = [k for k in sd if (k.endswith(".VPT_shallow") or k in ("image_encoder.VPT", "prompt_learner.ctx"))
                 and k not in keys]  # fmt: skip
        if missing or extra:
            raise ValueError(
                f"vpt: the official checkpoint does not match this block (vision depth {self.depths[0]}, text depth "
                f"{self.depths[1]}): missing {missing[:4]}, prompts the block lacks {extra[:4]}"
            )
        with torch.no_grad():
            for key, (name, i) in keys.items():
                target = getattr(self, name)[i]
                if tuple(sd[key].shape) != tuple(target.shape):
                    raise ValueError(f"vpt: {key} has shape {tuple(sd[key].shape)}, the block {tuple(target.shape)}")
                target.copy_(sd[key].to(target.dtype))

    # -- vision --------------------------------------------------------------------------------------
    def embed(self, x: Tensor, ctx: HookContext) -> Tensor:
        if self.vision_prompts is None:
            return x
        p = self.vision_prompts[0].to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([x, p], dim=1)  # [B*T, 1+N+n, C]

    def before_layer(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        if self.vision_prompts is None or not 0 < i < self.vision_prompts.shape[0]:
            return x
        p = self.vision_prompts[i].to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, : -self.n_vision], p], dim=1)

    def after_layer(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        if self.vision_prompts is None or i != self.spec.layers - 1:
            return x
        return x[:, : -self.n_vision]  # [B*T, 1+N, C]

    # -- text ------------------------------------------------------------------------------------------
    def text_embed(self, x: Tensor, ctx: HookContext) -> Tensor:
        if self.text_prompts is None:
            return x
        if self.text_placement == "overwrite":
            return self._overwrite(x, ctx)
        p = self.text_prompts[0].to(x.dtype).expand(x.shape[0], -1, -1)
        if ctx.attention_mask is not None:
            m = ctx.attention_mask
            ones = torch.ones(m.shape[0], self.n_text, dtype=m.dtype, device=m.device)
            ctx.attention_mask = torch.cat([m[:, :1], ones, m[:, 1:]], dim=1)  # [A, Lt+n]
        return torch.cat([x[:, :1], p, x[:, 1:]], dim=1)  # [A, Lt+n, W]

    def _overwrite(self, x: Tensor, ctx: HookContext) -> Tensor:
        """``x [A, Lt, W]`` (token + position embeddings) -> ``[A, L, W]``, ``L = min(Lt + n, context)``:
        ``SOT, ctx + pos[1..n], words at positions + n``; rows that do not fit keep their EOT last."""
        if ctx.text_tower is None:
            raise RuntimeError("vpt: the overwrite text placement needs ctx.text_tower (the text tower passes it)")
        a, lt, w = x.shape
        n = self.n_text
        pos = ctx.text_tower.positional_embedding.to(x.dtype)  # [context, W]
        mask = ctx.attention_mask
        if mask is None:
            mask = torch.ones(a, lt, dtype=torch.bool, device=x.device)
        length = min(lt + n, pos.shape[0])
        real = mask.bool().sum(-1)  # [A] SOT + words + EOT
        q = torch.arange(n + 1, length, device=x.device)  # new positions after the prompts
        src = (q - n).expand(a, -1).clone()  # [A, L-n-1] the original position each one takes
        cut = real + n > length  # the words do not all fit: EOT takes the last position
        src[cut, -1] = real[cut] - 1
        words = x.gather(1, src[..., None].expand(-1, -1, w)) - pos[src] + pos[q]  # [A, L-n-1, W]
        ctx.state["vpt_text_source"] = (x, src)
        ones = torch.ones(a, n, dtype=mask.dtype, device=mask.device)
        ctx.attention_mask = torch.cat([mask[:, :1], ones, mask.gather(1, src)], dim=1)  # [A, L]
        p = (self.text_prompts[0].to(x.dtype) + pos[1 : 1 + n]).expand(a, -1, -1)
        return torch.cat([x[:, :1], p, words], dim=1)

    def text_before_layer(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        if self.text_prompts is None or not 0 < i < self.text_prompts.shape[0]:
            return x
        p = self.text_prompts[i].to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :1], p, x[:, 1 + self.n_text :]], dim=1)

    def text_after_layer(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        if self.text_prompts is None or i != self.spec.text_layers - 1:
            return x
        if self.text_placement == "insert":
            return torch.cat([x[:, :1], x[:, 1 + self.n_text :]], dim=1)  # [A, Lt, W]
        # overwrite: each output goes back to its caption position; positions that had no place in the prompt
        # (padding beyond the context, cut words) keep their input embedding
        source, src = ctx.state["vpt_text_source"]
        out = source.to(x.dtype).scatter(1, src[..., None].expand(-1, -1, x.shape[-1]), x[:, 1 + self.n_text :])
        return torch.cat([x[:, :1], out[:, 1:]], dim=1)  # [A, Lt, W]
