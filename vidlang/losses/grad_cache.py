"""Feature-cache gradient accumulation for contrastive losses (GradCache; open_clip's ``accum_freq``).

A contrastive loss needs every embedding of the batch at once, so plain gradient accumulation changes the loss
(each micro-batch only sees its own negatives). Here a batch of K micro-batches is processed in three passes:

1. **cache**: every micro-batch is encoded without autograd (activations freed at once); the embeddings are
   kept (``[B, E]`` + ``[A, E]``: small) with the RNG state each forward started from;
2. **loss**: the loss runs on the cached embeddings of the whole batch -- with the cross-rank gather of the loss
   (:class:`~vidlang.losses.contrastive.ContrastiveLoss`), so it sees all ``world x K x b`` negatives -- and
   backward gives the gradient of the loss w.r.t. each cached embedding (and the loss's own parameters, e.g.
   ``logit_scale``);
3. **replay**: each micro-batch is encoded again with autograd under its saved RNG state (dropout, drop-path
   and random masks repeat) and its embeddings are back-propagated with their cached gradients; parameter
   gradients accumulate over the micro-batches.

The parameter gradients then equal those of the loss over the full batch (the chain rule splits exactly; only
the order of floating-point sums differs), at the activation memory of one micro-batch and about one extra
forward pass of compute. ``no_sync`` (e.g. ``ddp_model.no_sync``) skips DDP's gradient all-reduce on every
replay but the last.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Encode = Callable[[Any], Tensor]


@dataclass
class _RngState:
    cpu: Tensor
    cuda: list[Tensor]

    @classmethod
    def capture(cls) -> _RngState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        return cls(torch.get_rng_state(), cuda)

    @contextlib.contextmanager
    def replay(self) -> Any:
        """Run the block from this state; the RNG continues afterwards as if the block had not run."""
        devices = list(range(len(self.cuda)))
        with torch.random.fork_rng(devices=devices, enabled=True):
            torch.set_rng_state(self.cpu)
            if self.cuda:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


def cached_contrastive_backward(
    micro_batches: Sequence[Any],
    encode_video: Encode,
    encode_text: Encode,
    loss_fn: Callable[[Tensor, Tensor, Tensor], Any],
    caption_index: Sequence[Tensor],
    no_sync: Callable[[], Any] | None = None,
) -> Any:
    """Backward of a contrastive loss over all ``micro_batches`` at once, holding the activations of one
    (module docstring). Returns ``loss_fn``'s output (its tensors detached); parameter gradients are
    accumulated into ``.grad`` like ``loss.backward()`` on the full batch would.

    ``encode_video(mb) -> [b_k, E]`` and ``encode_text(mb) -> [a_k, E]`` are the differentiable encoders of
    micro-batch ``mb``. ``caption_index[k]`` ``[a_k]``: video (within micro-batch k) of each caption.
    ``loss_fn(video [B, E], text [A, E], caption_index [A])``: the loss of the whole batch (B = sum b_k videos,
    A = sum a_k captions, indices offset to the batch), returning a tensor or an object with a ``loss``
    field (:class:`~vidlang.losses.contrastive.ContrastiveOutput`); bind ``logit_scale`` in it, e.g.
    ``lambda v, t, i: loss(v, t, i, model.logit_scale)``: its gradient comes from pass 2.
    """
    if not micro_batches:
        raise ValueError("cached_contrastive_backward: no micro-batches")
    if len(caption_index) != len(micro_batches):
        raise ValueError(f"{len(micro_batches)} micro-batches but {len(caption_index)} caption_index tensors")
    # 1. cache the embeddings (no autograd) and the RNG state each micro-batch started from
    states, videos, texts = [], [], []
    with torch.no_grad():
        for mb in micro_batches:
            states.append(_RngState.capture())
            videos.append(encode_video(mb).detach())
            texts.append(encode_text(mb).detach())
    # 2. the loss over the whole batch, on leaves standing for the embeddings
    offsets = torch.tensor([0] + [v.shape[0] for v in videos[:-1]]).cumsum(0).tolist()
    index = torch.cat([ci.to(videos[0].device) + off for ci, off in zip(caption_index, offsets, strict=True)])
    video = torch.cat(videos).requires_grad_(True)  # [B, E]
    text = torch.cat(texts).requires_grad_(True)  # [A, E]
    out = loss_fn(video, text, index)
    loss = out if isinstance(out, Tensor) else out.loss
    loss.backward()
    grad_v = video.grad.split([v.shape[0] for v in videos])
    grad_t = text.grad.split([t.shape[0] for t in texts])
    # 3. replay each micro-batch with autograd and push its embeddings' gradients through the encoders
    after = _RngState.capture()
    last = len(micro_batches) - 1
    for k, mb in enumerate(micro_batches):
        sync = contextlib.nullcontext() if no_sync is None or k == last else no_sync()
        with sync, states[k].replay():
            pairs = [(x, g) for x, g in ((encode_video(mb), grad_v[k]), (encode_text(mb), grad_t[k]))
                     if x.requires_grad]  # a frozen tower has nothing to back-propagate
            if pairs:
                torch.autograd.backward([x for x, _ in pairs], [g for _, g in pairs])
    torch.set_rng_state(after.cpu)  # the RNG ends where the cached pass left it (as after a plain forward)
    if after.cuda:
        torch.cuda.set_rng_state_all(after.cuda)
    return _detached(out)


def _detached(out: Any) -> Any:
    if isinstance(out, Tensor):
        return out.detach()
    if hasattr(out, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.replace(out, **{f: getattr(out, f).detach() for f in out.__dataclass_fields__
                                           if isinstance(getattr(out, f), Tensor)})
    return out
