"""``maple``: coupled vision-language prompts (MaPLe, Khattak et al., CVPR 2023), a variant of ``vpt``; backbone frozen.

Official code: ``muzairkhattak/multimodal-prompt-learning`` (``trainers/maple.py`` ``MultiModalPromptLearner``,
``clip/model.py`` ``ResidualAttentionBlock_MaPLe`` / ``VisionTransformer_MaPLe``).

Only the text side has free prompts: ``n_ctx`` vectors for each of the first ``depth`` text layers
(``text_prompts [depth, n_ctx, W]``), placed exactly as ``vpt``'s text prompts (the hooks are inherited: layer 0's
vectors overwrite placeholder words after SOT with those positions' embeddings, layers ``1 .. depth-1`` replace
positions ``1..n_ctx`` without them). The vision prompts of the same layers are *projections* of the text prompts,
one ``Linear(W -> C)`` per layer (the paper's coupling functions): ``vision_prompt(i) = couplings[i](text_prompts[i])``
``[n_ctx, C]``. Layer 0's is appended after CLS + patches at the ``embed`` hook (after the position embedding,
before ``ln_pre``); before layers ``1 .. depth-1`` the last ``n_ctx`` tokens are replaced by that layer's
projection; the prompt tokens are removed after the last layer (pooling: the frame mean of the CLS embeddings).

Initialisation (official): text prompts N(0, 0.02); layer 0's become the token embeddings of ``ctx_init``
("a photo of a") when ``n_ctx <= 4`` (:meth:`DeepPrompts.init_text_context`, called by the tasks on a fresh
model); couplings are PyTorch's default ``Linear`` initialisation, layer 0's drawn on its own and layers
``1 .. depth-1`` all starting from one shared draw (the official code deep-copies one layer). Defaults
``n_ctx = 2``, ``depth = 9`` are the official configs (``vit_b16_c2_ep5_batch4_2ctx``).

Deviations from the official code:

- With ``n_ctx`` < the number of ``ctx_init`` words the official prompt keeps the remaining words as fixed tokens
  ("X X of a <class>."); here the caption (the task's class prompt) follows the ``n_ctx`` vectors directly.
- The official forward casts the prompts to fp16; here they take the activations' dtype. Over-long captions are cut
  keeping EOT (``vpt``'s overwrite placement).
- Widths come from the towers (the official code hard-codes 512 -> 768, i.e. ViT-B).
- Weight decay: ``VideoTextModel.param_groups`` never decays prompts; the couplings follow the task's weight decay.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from vidlang.models.contract import HookContext, TowerSpec
from vidlang.models.temporal.base import BLOCKS
from vidlang.models.temporal.vpt import DeepPrompts


def official_maple_keys(depth: int) -> dict[str, tuple[str, int]]:
    """Official MaPLe ``prompt_learner`` key -> (``text_prompts`` / ``couplings.weight`` / ``couplings.bias``,
    layer index)."""
    keys: dict[str, tuple[str, int]] = {"prompt_learner.ctx": ("text_prompts", 0)}
    keys["prompt_learner.proj.weight"] = ("couplings.weight", 0)
    keys["prompt_learner.proj.bias"] = ("couplings.bias", 0)
    for i in range(1, depth):
        keys[f"prompt_learner.compound_prompts_text.{i - 1}"] = ("text_prompts", i)
        keys[f"prompt_learner.compound_prompt_projections.{i - 1}.weight"] = ("couplings.weight", i)
        keys[f"prompt_learner.compound_prompt_projections.{i - 1}.bias"] = ("couplings.bias", i)
    return keys


@BLOCKS.register("maple")
class MultiModalPrompts(DeepPrompts):
    """MaPLe: text prompts in the first ``depth`` text layers; those layers' vision prompts are projected from them."""

    freeze_backbone = True

    def __init__(
        self,
        spec: TowerSpec,
        n_ctx: int = 2,
        depth: int | None = None,
        text_placement: str = "overwrite",
        ctx_init: str | None = "a photo of a",
    ) -> None:
        depth = min(9, spec.layers, spec.text_layers) if depth is None else depth
        if not 1 <= depth <= min(spec.layers, spec.text_layers):
            raise ValueError(
                f"maple depth {depth} must be in 1..{min(spec.layers, spec.text_layers)} (the prompts of a layer are "
                f"coupled across both towers: {spec.layers} image / {spec.text_layers} text layers)"
            )
        if n_ctx < 1:
            raise ValueError(f"maple n_ctx must be >= 1, got {n_ctx}")
        super().__init__(
            spec, n_vision=0, n_text=n_ctx, depth=0, text_depth=depth, text_placement=text_placement, ctx_init=ctx_init
        )
        self.n_ctx = n_ctx
        first = nn.Linear(spec.text_width, spec.width)
        deeper = nn.Linear(spec.text_width, spec.width)  # official: one layer deep-copied for every deeper layer
        self.couplings = nn.ModuleList([first] + [copy.deepcopy(deeper) for _ in range(depth - 1)])

    @property
    def appends_image_tokens(self) -> bool:
        return True

    @property
    def depths(self) -> tuple[int, int]:
        """(vision, text) prompt depth: the same layers on both sides."""
        return len(self.couplings), len(self.couplings)

    def vision_prompt(self, i: int) -> Tensor:
        """The vision prompts of layer ``i``: ``couplings[i](text_prompts[i])`` ``[n_ctx, C]``."""
        return self.couplings[i](self.text_prompts[i])

    # -- vision --------------------------------------------------------------------------------------
    def embed(self, x: Tensor, ctx: HookContext) -> Tensor:
        p = self.vision_prompt(0).to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([x, p], dim=1)  # [B*T, 1+N+n, C]

    def before_layer(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        if not 0 < i < len(self.couplings):
            return x
        p = self.vision_prompt(i).to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, : -self.n_ctx], p], dim=1)

    def after_layer(self, i: int, x: Tensor, ctx: HookContext) -> Tensor:
        if i != self.spec.layers - 1:
            return x
        return x[:, : -self.n_ctx]  # [B*T, 1+N, C]

    # -- official checkpoints ------------------------------------------------------------------------
    def _target(self, name: str, i: int) -> Tensor:
        if name == "text_prompts":
            return self.text_prompts[i]
        return getattr(self.couplings[i], name.split(".")[1])

    def official_state_dict(self) -> dict[str, Tensor]:
        """The prompts and couplings under the official MaPLe names (``prompt_learner.ctx``, ``.proj``, ...)."""
        return {k: self._target(*v).detach().clone() for k, v in official_maple_keys(len(self.couplings)).items()}

    def load_official_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load an official MaPLe checkpoint (its ``state_dict`` or the whole dict; ``module.`` dropped; class
        buffers such as ``token_prefix`` / ``token_suffix`` ignored). Every prompted layer must be present with its
        shape; deeper layers the block lacks are refused."""
        sd = state.get("state_dict", state) if isinstance(state, Mapping) else state
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
        keys = official_maple_keys(len(self.couplings))
        missing = [k for k in keys if k not in sd]
        extra = [k for k in sd if k.startswith(("prompt_learner.compound_", "prompt_learner.proj")) and k not in keys]
        if missing or extra:
            raise ValueError(
                f"maple: the official checkpoint does not match this block (depth {len(self.couplings)}): "
                f"missing {missing[:4]}, prompts the block lacks {extra[:4]}"
            )
        with torch.no_grad():
            for key, (name, i) in keys.items():
                target = self._target(name, i)
                if tuple(sd[key].shape) != tuple(target.shape):
                    raise ValueError(f"maple: {key} has shape {tuple(sd[key].shape)}, the block {tuple(target.shape)}")
                target.copy_(sd[key].to(target.dtype))
