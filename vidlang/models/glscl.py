"""GLSCL's retrieval similarity (Zhang et al., "Text-Video Retrieval with Global-Local Semantic Consistent
Learning", 2024; official code ``zchoi/GLSCL``, ``tvr/models/modeling.py``), a head of the retrieval task.

Inputs: a caption's projected EOT feature ``t [E]`` and word features ``w [Lt, E]`` (``TextOutput.embeds`` /
``tokens`` + ``mask``), a video's frame features ``f [T, E]`` (``VideoOutput.frame_embeds``; the paper recipe
takes them from CLIP4Clip's seqTransf, ``seq_transformer`` with ``normalize_frames: false``, unnormalised).

- **Global interaction (GIM)**, parameter free: the caption weighs the video's frames by
  ``softmax_T(t . f_j / tau)`` (raw dot products, ``tau`` = ``global_temperature`` 3), the weighted frame sum
  ``v_t`` is the caption-conditioned video, and the score is ``cos(t, v_t)``. :func:`global_similarity` never
  builds the ``[A, B, E]`` conditioned videos: ``t . v_t = sum_j w_j (t . f_j)`` and
  ``|v_t|^2 = w^T (F F^T) w`` with the video's ``[T, T]`` frame Gram matrix, so a block of ``a`` captions x ``b``
  videos holds ``[a, b, T]`` numbers.
- **Local interaction (LIM)**: ``M`` learnable queries (``queries``, init U[0, 1) as the code's ``torch.rand``)
  go through a post-norm transformer *decoder* (``layers`` 3 x PyTorch's ``TransformerDecoderLayer``: query
  self-attention, cross-attention to the memory, ReLU MLP ``ffn`` 2048, ``heads`` 8, dropout 0.1; the layers start
  as copies of one draw, as ``nn.TransformerDecoder`` makes them) whose memory is the caption's words or the
  video's frames; the *same* queries and decoder serve both modalities. The ``M`` outputs are L2-normalised
  "concepts" ``[M, E]`` per caption and per video; the local score is ``(1/M) sum_m cos(c_text_m, c_video_m)``,
  one matmul over a gallery since the concepts of a caption do not depend on the video.
- **Similarity** (training *and* evaluation, as the code's ``_run_on_single_gpu``): ``GIM + local_weight x LIM``
  (``local_weight`` 0.5); the task's InfoNCE scales it by CLIP's learnable ``logit_scale``.
- **Inter-consistency loss (ICL)** on the concepts of matched (caption, video) pairs: ``glscl_icl`` = MSE between
  the batch means of the video and the caption concepts ``[M, E]`` (weight 1), and ``glscl_icl_diag`` =
  ``sum_m (d_m - diag_target)^2`` with ``d_m = sum_pairs cos(c_video_m, c_text_m) / M`` (a sum over the pairs of
  the batch divided by the number of queries, as the code computes it; weight ``beta`` 0.02 of
  ``train_msrvtt.sh``, ``diag_target`` 0.75).
- **Intra-diversity loss (IDL)** ``glscl_idl`` on the video concepts only: ``G = mean_videos C C^T [M, M]``, and a
  margin ranking loss pushing each off-diagonal ``G_ij`` below ``G_ii`` and ``G_jj`` by ``margin`` 0.1, each of
  the two hinge sums divided by ``M (M - 1)`` (weight ``alpha`` 1e-4).

The code names the two regularisers the other way round (``Intra_Consistency`` / ``Inter_Diversity``); vidlang uses
the paper's names. Weights: :attr:`GLSCLSimilarity.default_aux_weights`, overridden by the task's
``aux_loss_weights``. The code computes the loss and both regularisers on the batch gathered over all GPUs; the
retrieval task gathers the concepts the same way (``contrastive.gather``).

Deviations from the code: padded words and padded frames are masked out of the decoder's cross-attention and of
the GIM softmax (the code attends to the padding tokens' features and to the embeddings of zero frames, and zeroes
padded frame weights *after* the softmax without renormalising); pairs of the regularisers follow
``caption_index`` (the code pairs row ``i`` with row ``i``, one caption per video); the unused modules of the
released model (``weight_fc``, the non-shared query / decoder copies of the ablations) are left out;
similarities are computed in fp32 under autocast.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vidlang.models.contract import TextOutput, VideoOutput

NORM_EPS = 1e-12  # the code divides by the norm without an epsilon; this only guards an exactly-zero vector

VideoFeatures = tuple[Tensor, Tensor, Tensor]  # frames [B, T, E], frame mask [B, T] (1 = real), concepts [B, M, E]
TextFeatures = tuple[Tensor, Tensor]  # EOT features [A, E], concepts [A, M, E]


def _fp32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _global_block(text: Tensor, frames: Tensor, gram: Tensor, mask: Tensor, tau: float) -> Tensor:
    """``text [a, E]``, ``frames [b, T, E]``, ``gram [b, T, T]``, bool ``mask [b, T]`` -> GIM cosines ``[a, b]``."""
    s = torch.einsum("ae,bte->abt", text, frames)  # [a, b, T] raw caption-frame dot products
    w = torch.softmax((s / tau).masked_fill(~mask[None], float("-inf")), dim=-1)  # [a, b, T] frame weights
    dot = (w * s).sum(-1)  # [a, b] t . v_t
    sq = (torch.einsum("abt,btu->abu", w, gram) * w).sum(-1)  # [a, b] |v_t|^2
    den = text.norm(dim=-1)[:, None].clamp_min(NORM_EPS) * sq.clamp_min(NORM_EPS**2).sqrt()
    return dot / den


def _check_chunks(chunk: int, video_chunk: int) -> None:
    if chunk < 1 or video_chunk < 1:
        raise ValueError(f"GLSCL similarity chunks must be >= 1, got chunk={chunk}, video_chunk={video_chunk}")


def _frame_mask(frames: Tensor, frame_mask: Tensor | None) -> Tensor:
    if frame_mask is None:
        return torch.ones(frames.shape[:2], dtype=torch.bool, device=frames.device)
    if frame_mask.shape != frames.shape[:2]:
        raise ValueError(f"frame_mask {tuple(frame_mask.shape)} does not match frames {tuple(frames.shape)}")
    mask = frame_mask.bool()
    if not bool(mask.any(-1).all()):
        raise ValueError("GLSCL similarity: every video needs at least one real frame in frame_mask")
    return mask


def global_similarity_rows(
    text: Tensor,  # [A, E] projected EOT features (not normalised)
    frames: Tensor,  # [B, T, E] frame features (not normalised)
    frame_mask: Tensor | None = None,  # [B, T] 1/True = real frame
    temperature: float = 3.0,
    chunk: int = 256,
    video_chunk: int = 1024,
) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(start, GIM[start:start + c] [c, B])`` caption-row blocks of :func:`global_similarity`."""
    _check_chunks(chunk, video_chunk)
    if text.ndim != 2 or frames.ndim != 3 or text.shape[1] != frames.shape[2]:
        raise ValueError(f"GLSCL global similarity expects text [A, E] and frames [B, T, E], got "
                         f"{tuple(text.shape)} and {tuple(frames.shape)}")  # fmt: skip
    device = frames.device.type
    with torch.autocast(device, enabled=False):
        text, frames = _fp32(text), _fp32(frames)
        mask = _frame_mask(frames, frame_mask)
        gram = frames @ frames.transpose(1, 2)  # [B, T, T]
    for i in range(0, text.shape[0], chunk):
        with torch.autocast(device, enabled=False):  # not around the yield: the caller keeps its autocast
            rows = [_global_block(text[i : i + chunk], frames[j : j + video_chunk], gram[j : j + video_chunk],
                                  mask[j : j + video_chunk], temperature)
                    for j in range(0, frames.shape[0], video_chunk)]  # fmt: skip
        yield i, torch.cat(rows, dim=1)


def global_similarity(
    text: Tensor, frames: Tensor, frame_mask: Tensor | None = None, temperature: float = 3.0, chunk: int = 256,
    video_chunk: int = 1024,
) -> Tensor:
    """GLSCL's parameter-free global interaction ``[A, B]`` (module docstring): ``cos(t, sum_j w_j f_j)`` with
    ``w = softmax_j(t . f_j / temperature)`` over the real frames. Differentiable; computed in fp32 (fp64 stays
    fp64) in blocks of ``chunk`` captions x ``video_chunk`` videos, which change neither values nor gradients."""
    return torch.cat([r for _, r in global_similarity_rows(text, frames, frame_mask, temperature, chunk,
                                                           video_chunk)], dim=0)  # fmt: skip


def local_similarity(text_concepts: Tensor, video_concepts: Tensor) -> Tensor:
    """``(1/M) sum_m cos(text_m, video_m)`` of normalised concepts ``[A, M, E]`` x ``[B, M, E]`` -> ``[A, B]``."""
    if text_concepts.shape[1:] != video_concepts.shape[1:]:
        raise ValueError(f"GLSCL concepts differ: text {tuple(text_concepts.shape)}, video "
                         f"{tuple(video_concepts.shape)}")  # fmt: skip
    m = text_concepts.shape[1]
    return _fp32(text_concepts).flatten(1) @ _fp32(video_concepts).flatten(1).t() / m


def margin_ranking(sim: Tensor, margin: float) -> Tensor:
    """The code's two-way hinge on a square ``sim [M, M]``: off-diagonal entries should be ``margin`` below both
    diagonal entries of their row and column; each direction's hinges summed and divided by ``M (M - 1)``."""
    m = sim.shape[0]
    diag = sim.diagonal()
    off = ~torch.eye(m, dtype=torch.bool, device=sim.device)
    by_row = (margin + sim - diag[:, None]).clamp_min(0)[off].sum()
    by_col = (margin + sim - diag[None, :]).clamp_min(0)[off].sum()
    return (by_row + by_col) / (m * (m - 1))


class GLSCLSimilarity(nn.Module):
    """GLSCL's similarity head (module docstring): shared queries + decoder, global + local scores, ICL / IDL."""

    default_aux_weights: ClassVar[Mapping[str, float]] = {"glscl_icl": 1.0, "glscl_icl_diag": 0.02, "glscl_idl": 1e-4}

    def __init__(
        self,
        embed_dim: int = 512,
        queries: int = 8,
        layers: int = 3,
        heads: int = 8,
        ffn: int = 2048,
        dropout: float = 0.1,
        global_temperature: float = 3.0,
        local_weight: float = 0.5,
        margin: float = 0.1,
        diag_target: float = 0.75,
    ) -> None:
        super().__init__()
        if queries < 2:
            raise ValueError(f"GLSCL needs at least 2 queries (the diversity loss compares them), got {queries}")
        if layers < 1 or ffn < 1:
            raise ValueError(f"GLSCL needs layers >= 1 and ffn >= 1, got layers={layers}, ffn={ffn}")
        if heads < 1 or embed_dim % heads:
            raise ValueError(f"GLSCL: embed dim {embed_dim} is not divisible by heads={heads}")
        if not global_temperature > 0:
            raise ValueError(f"GLSCL global_temperature must be > 0, got {global_temperature}")
        self.embed_dim = embed_dim
        self.global_temperature = float(global_temperature)
        self.local_weight = float(local_weight)
        self.margin = float(margin)
        self.diag_target = float(diag_target)
        self.queries = nn.Parameter(torch.rand(queries, embed_dim))  # [M, E], U[0, 1) as the code
        layer = nn.TransformerDecoderLayer(embed_dim, heads, ffn, dropout, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers)  # copies of one layer, as the code's decoder

    @property
    def num_queries(self) -> int:
        return self.queries.shape[0]

    def concepts(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x [N, L, E]`` (words or frames), ``mask [N, L]`` (True = real) -> normalised concepts ``[N, M, E]``."""
        if x.ndim != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"GLSCL concepts expect [N, L, {self.embed_dim}] features, got {tuple(x.shape)}")
        pad = None
        if mask is not None:
            if mask.shape != x.shape[:2]:
                raise ValueError(f"mask {tuple(mask.shape)} does not match features {tuple(x.shape)}")
            if not bool(mask.bool().any(-1).all()):
                raise ValueError("GLSCL concepts: every row needs at least one real token / frame in its mask")
            pad = ~mask.bool()  # True = left out of the cross-attention
        q = self.queries.to(x.dtype)[None].expand(x.shape[0], -1, -1)  # [N, M, E]
        out = self.decoder(q, x, memory_key_padding_mask=pad)  # [N, M, E]
        return F.normalize(out, dim=-1, eps=NORM_EPS)

    def features(self, video: VideoOutput, text: TextOutput, video_mask: Tensor | None) -> tuple[VideoFeatures,
                                                                                                    TextFeatures]:
        """The per-video and per-caption features the similarity needs (rows first, so the loss can gather them):
        ``(frames [B, T, E], frame mask [B, T] float, concepts [B, M, E])`` and ``(EOT [A, E], concepts [A, M, E])``."""
        if video.frame_embeds is None:
            raise ValueError("GLSCL similarity needs per-frame embeddings (VideoOutput.frame_embeds)")
        if text.tokens is None or text.mask is None:
            raise ValueError("GLSCL similarity needs the text tower's word features (TextOutput.tokens/mask)")
        frames = video.frame_embeds
        mask = torch.ones(frames.shape[:2], dtype=torch.bool, device=frames.device) if video_mask is None \
            else video_mask.to(frames.device).bool()  # fmt: skip
        video_feats = (frames, mask.to(frames.dtype), self.concepts(frames, mask))
        return video_feats, (text.embeds, self.concepts(text.tokens, text.mask))

    def similarity_rows(self, text: TextFeatures, video: VideoFeatures, chunk: int = 256
                        ) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(start, S[start:start + c] [c, B])`` blocks of :meth:`forward` (evaluation over a gallery)."""
        eot, text_concepts = text
        frames, mask, video_concepts = video
        for start, rows in global_similarity_rows(eot, frames, mask, self.global_temperature, chunk):
            with torch.autocast(frames.device.type, enabled=False):
                local = local_similarity(text_concepts[start : start + chunk], video_concepts)
            yield start, rows + self.local_weight * local

    def forward(self, text: TextFeatures, video: VideoFeatures) -> Tensor:
        """``GIM + local_weight x LIM`` ``[A, B]`` of :meth:`features`' outputs (unscaled)."""
        return torch.cat([rows for _, rows in self.similarity_rows(text, video)], dim=0)

    def aux_losses(self, video_concepts: Tensor, text_concepts: Tensor, caption_index: Tensor) -> dict[str, Tensor]:
        """The unweighted ``glscl_icl``, ``glscl_icl_diag`` and ``glscl_idl`` (module docstring) of a batch:
        ``video_concepts [B, M, E]``, ``text_concepts [A, M, E]``, ``caption_index [A]`` (video of each caption)."""
        with torch.autocast(video_concepts.device.type, enabled=False):
            video_concepts, text_concepts = _fp32(video_concepts), _fp32(text_concepts)
            m = video_concepts.shape[1]
            paired = video_concepts[caption_index.long()]  # [A, M, E] the video of each caption
            icl = F.mse_loss(paired.mean(0), text_concepts.mean(0))
            diag = (paired * text_concepts).sum(-1).sum(0) / m  # [M]
            icl_diag = (diag - self.diag_target).square().sum()
            gram = torch.einsum("bme,bne->mn", video_concepts, video_concepts) / video_concepts.shape[0]  # [M, M]
            idl = margin_ranking(gram, self.margin)
        return {"glscl_icl": icl, "glscl_icl_diag": icl_diag, "glscl_idl": idl}


__all__ = ["GLSCLSimilarity", "global_similarity", "global_similarity_rows", "local_similarity", "margin_ranking"]
