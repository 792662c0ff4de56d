"""Text-video retrieval metrics, computed in bounded memory.

Similarity ``S [A texts, B videos]``; ``caption_index [A]`` gives each text's true video.

- text -> video: the rank of text i's true video. Ties are resolved with ``ties``:
  ``"pessimistic"`` (default): ``r = 1 + #{j != gt : S[i, j] >= S[i, gt]}``, so a tie with
  the ground truth never helps (a collapsed model with constant similarities gets the worst
  rank, not R@1 = 100); ``"optimistic"``: ``r = 1 + #{j : S[i, j] > S[i, gt]}`` (the textbook
  formula and the convention of CLIP4Clip-style evaluation code, under which
  ties *do* help). With real-valued embeddings exact ties are rare and both agree.
  NaN similarities raise ``ValueError``.
- video -> text: each video is a query, its captions are the positives; the video's rank
  is that of its best-ranked caption: with ``m = max_{a in captions(j)} S[a, j]``, it counts
  the *other* videos' captions scoring ``>= m`` (pessimistic) or ``> m`` (optimistic).
  Videos without a caption are not queries (they stay in the gallery for text -> video).
- video -> text, ``v2t="clip4clip"`` (the convention of CLIP4Clip's multi-sentence evaluation, which MSVD /
  VATEX / MSR-VTT-full numbers in papers use): each video's captions are first collapsed into one score per
  (caption owner, query video), ``M[i, j] = max_{a in captions(i)} S[a, j]``, and the query video ``j`` is
  ranked among the *videos* that have captions (a gallery of ``B'`` caption sets, not of ``A`` captions):
  ``r = 1 + #{i != j : M[i, j] >= M[j, j]}`` (pessimistic) or ``> M[j, j]`` (optimistic). The default
  ``"best_caption"`` is the rule above (ranked among all captions); the two agree when every video has one
  caption.
- R@K (K = 1, 5, 10) = percentage of queries with ``r <= K``; MdR = median rank (mean of the
  two middle ranks for an even count, like numpy); MnR = mean rank.
- DSL (dual softmax, optional): ``S' = S * softmax(S / tau, dim=0)`` for text -> video
  (the prior normalises each video's column over all texts) and the transposed form for
  video -> text (each text's row normalised over all videos). It uses the whole test set
  as a prior, so it is reported only under keys prefixed ``dsl_`` and never mixed into the
  plain keys.

Memory: similarities are produced ``chunk`` rows (texts) or columns (videos) at a time from
the embeddings, so no more than ``chunk x max(A, B)`` scores exist at once; 10k x 10k runs
in a few hundred MB.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

R = TypeVar("R")
RECALL_KS = (1, 5, 10)
TIE_MODES = ("pessimistic", "optimistic")
V2T_MODES = ("best_caption", "clip4clip")


def chunked_similarity(text_emb: Tensor, video_emb: Tensor, chunk: int = 1024) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(start, S[start:start + c] [c, B])`` text-row blocks of ``text_emb @ video_emb.T``."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    for start in range(0, text_emb.shape[0], chunk):
        yield start, text_emb[start : start + chunk] @ video_emb.t()


class _Similarity:
    """Source of similarity blocks: either a dense matrix or two embedding tables."""

    def __init__(self, text: Tensor | None, video: Tensor | None, sim: Tensor | None, chunk: int) -> None:
        self.text, self.video, self.sim, self.chunk = text, video, sim, chunk
        if sim is not None:
            self.num_texts, self.num_videos = sim.shape
            self.device = sim.device
        else:
            self.num_texts, self.num_videos = text.shape[0], video.shape[0]
            self.device = text.device

    def rows(self) -> Iterator[tuple[int, Tensor]]:
        """``(start, [c, B])`` blocks of text rows."""
        if self.sim is None:
            blocks = chunked_similarity(self.text, self.video, self.chunk)
        else:
            blocks = ((s, self.sim[s : s + self.chunk]) for s in range(0, self.num_texts, self.chunk))
        for start, block in blocks:
            yield start, _check_finite(block.float(), f"rows {start}..{start + block.shape[0] - 1}")

    def cols(self) -> Iterator[tuple[int, Tensor]]:
        """``(start, [A, c])`` blocks of video columns."""
        for start in range(0, self.num_videos, self.chunk):
            if self.sim is None:
                block = self.text @ self.video[start : start + self.chunk].t()
            else:
                block = self.sim[:, start : start + self.chunk]
            yield start, _check_finite(block.float(), f"columns {start}..{start + block.shape[1] - 1}")


def _check_finite(block: Tensor, where: str) -> Tensor:
    if torch.isnan(block).any():
        raise ValueError(f"retrieval similarity contains NaN in {where}; check the embeddings for NaN")
    return block


def _t2v_block_ranks(block: Tensor, gt: Tensor, pessimistic: bool) -> Tensor:
    """``block [c, B]``, ``gt [c]`` -> 1-based ranks ``[c]`` of the true videos."""
    true = block.gather(1, gt[:, None])  # [c, 1]
    if pessimistic:
        return (block >= true).sum(dim=1)  # 1 + #{j != gt: S >= S_gt}; the gt itself counts as the 1
    return 1 + (block > true).sum(dim=1)


def _v2t_block_ranks(block: Tensor, caption_index: Tensor, start: int, pessimistic: bool) -> tuple[Tensor, Tensor]:
    """``block [A, c]`` -> (1-based ranks [c] of each video's best caption, has_caption [c] bool)."""
    c = block.shape[1]
    inside = (caption_index >= start) & (caption_index < start + c)
    local = caption_index[inside] - start  # [a_in] column of each caption of these videos
    scores = block[inside.nonzero(as_tuple=True)[0], local]  # [a_in]
    best = torch.full((c,), float("-inf"), dtype=block.dtype, device=block.device)
    best = best.scatter_reduce(0, local, scores, reduce="amax", include_self=True)  # [c]
    has = torch.zeros(c, dtype=torch.bool, device=block.device)
    has[local] = True
    if not pessimistic:  # no positive can beat the best one: all strictly greater are negatives
        return 1 + (block > best[None, :]).sum(dim=0), has
    # negatives tied with the best caption count against it; the video's own captions never do
    tied_pos = torch.zeros(c, dtype=torch.long, device=block.device)
    tied_pos = tied_pos.scatter_add(0, local, (scores >= best[local]).long())  # [c]
    return 1 + (block >= best[None, :]).sum(dim=0) - tied_pos, has


def _v2t_clip4clip_block_ranks(
    block: Tensor, caption_index: Tensor, start: int, num_videos: int, pessimistic: bool
) -> tuple[Tensor, Tensor]:
    """``block [A, c]`` -> (1-based ranks [c] of each query video among the caption sets of all videos, has_caption
    [c] bool): captions collapsed by max per owning video (module docstring, ``v2t="clip4clip"``)."""
    a, c = block.shape
    owners = torch.full((num_videos, c), float("-inf"), dtype=block.dtype, device=block.device)
    owners = owners.scatter_reduce(0, caption_index[:, None].expand(a, c), block, reduce="amax", include_self=True)
    has_all = torch.zeros(num_videos, dtype=torch.bool, device=block.device)
    has_all[caption_index] = True  # [B] videos that own a caption set (the gallery)
    cols = torch.arange(c, device=block.device)
    own = owners[start + cols, cols]  # [c] the query's own caption set
    beats = (owners >= own[None, :]) if pessimistic else (owners > own[None, :])  # [B, c]
    beats &= has_all[:, None]
    beats[start + cols, cols] = False  # the query's own set never counts against it
    return 1 + beats.sum(dim=0), has_all[start : start + c]


def _dsl_priors(src: _Similarity, tau: float) -> tuple[Tensor, Tensor]:
    """Log-normalisers of ``S / tau``: over texts per video ``[B]`` and over videos per text ``[A]``."""
    col_lse = torch.full((src.num_videos,), float("-inf"), device=src.device)
    row_lse = torch.empty(src.num_texts, device=src.device)
    for start, block in src.rows():
        scaled = block / tau
        row_lse[start : start + block.shape[0]] = scaled.logsumexp(dim=1)
        col_lse = torch.logaddexp(col_lse, scaled.logsumexp(dim=0))
    return col_lse, row_lse


def _direction_ranks(
    blocks: Iterator[tuple[int, Tensor]], rank: Callable[[int, Tensor], R], log_prior: Tensor | None, tau: float
) -> tuple[list[R], list[R]]:
    """``rank(start, block)`` of every block, and of its dual-softmax form ``S * exp(S / tau - log_prior)``
    when ``log_prior`` (broadcastable to a block) is given."""
    plain: list[R] = []
    dual: list[R] = []
    for start, block in blocks:
        plain.append(rank(start, block))
        if log_prior is not None:
            dual.append(rank(start, block * torch.exp(block / tau - log_prior)))
    return plain, dual


def _all_ranks(src: _Similarity, caption_index: Tensor, opts: _Options) -> dict[str, Tensor]:
    idx = caption_index.long().to(src.device)
    tau, pess = opts.dsl_temperature, opts.ties == "pessimistic"
    col_lse, row_lse = _dsl_priors(src, tau) if opts.dsl else (None, None)
    t2v, dsl_t2v = _direction_ranks(  # prior: softmax over texts
        src.rows(),
        lambda start, block: _t2v_block_ranks(block, idx[start : start + block.shape[0]], pess),
        None if col_lse is None else col_lse[None, :],
        tau,
    )
    if opts.v2t == "clip4clip":
        def v2t_rank(start: int, block: Tensor) -> tuple[Tensor, Tensor]:
            return _v2t_clip4clip_block_ranks(block, idx, start, src.num_videos, pess)
    else:
        def v2t_rank(start: int, block: Tensor) -> tuple[Tensor, Tensor]:
            return _v2t_block_ranks(block, idx, start, pess)
    v2t, dsl_v2t = _direction_ranks(  # prior: softmax over videos; each rank is (ranks, has_caption)
        src.cols(),
        v2t_rank,
        None if row_lse is None else row_lse[:, None],
        tau,
    )
    queries = torch.cat([has for _, has in v2t])  # videos with a caption
    out = {"t2v": t2v, "v2t": [r for r, _ in v2t], "dsl_t2v": dsl_t2v, "dsl_v2t": [r for r, _ in dsl_v2t]}
    ranks = {k: torch.cat(v) for k, v in out.items() if v}
    for key in ("v2t", "dsl_v2t"):
        if key in ranks:
            ranks[key] = ranks[key][queries]
    return {k: v.cpu() for k, v in ranks.items()}


def summarize_ranks(ranks: Tensor, prefix: str) -> dict[str, float]:
    """R@1/5/10 (percent), MdR and MnR of 1-based ``ranks`` under ``{prefix}_...`` keys."""
    if ranks.numel() == 0:
        raise ValueError(f"{prefix}: no queries to evaluate")
    r = ranks.double().numpy()
    out = {f"{prefix}_R@{k}": float(100.0 * np.mean(r <= k)) for k in RECALL_KS}
    out[f"{prefix}_MdR"] = float(np.median(r))
    out[f"{prefix}_MnR"] = float(np.mean(r))
    return out


@dataclass
class RetrievalResult:
    metrics: dict[str, float]
    ranks: dict[str, Tensor] = field(default_factory=dict)  # "t2v" [A], "v2t" [B'], "dsl_t2v", "dsl_v2t"


def _check_index(caption_index: Tensor, num_texts: int, num_videos: int) -> None:
    if caption_index.shape != (num_texts,):
        raise ValueError(f"caption_index must have shape [{num_texts}], got {tuple(caption_index.shape)}")
    if num_texts == 0 or num_videos == 0:
        raise ValueError(f"retrieval needs at least one text and one video, got {num_texts} and {num_videos}")
    if caption_index.min() < 0 or caption_index.max() >= num_videos:
        raise ValueError(
            f"caption_index values must lie in [0, {num_videos}), got min "
            f"{int(caption_index.min())} max {int(caption_index.max())}"
        )


@dataclass(frozen=True)
class _Options:
    dsl: bool
    dsl_temperature: float
    ties: str
    v2t: str = "best_caption"

    def __post_init__(self) -> None:
        if self.ties not in TIE_MODES:
            raise ValueError(f"ties must be one of {TIE_MODES}, got {self.ties!r}")
        if self.v2t not in V2T_MODES:
            raise ValueError(f"v2t must be one of {V2T_MODES}, got {self.v2t!r}")
        if self.dsl and self.dsl_temperature <= 0:
            raise ValueError(f"dsl_temperature must be > 0, got {self.dsl_temperature}")


def _evaluate(src: _Similarity, caption_index: Tensor, opts: _Options) -> RetrievalResult:
    _check_index(caption_index, src.num_texts, src.num_videos)
    ranks = _all_ranks(src, caption_index, opts)
    metrics: dict[str, float] = {"num_texts": float(src.num_texts), "num_videos": float(src.num_videos)}
    for name, r in ranks.items():
        metrics.update(summarize_ranks(r, name))
    return RetrievalResult(metrics, ranks)


def evaluate_similarity(
    sim: Tensor,
    caption_index: Tensor,
    dsl: bool = False,
    dsl_temperature: float = 0.01,
    chunk: int = 1024,
    ties: str = "pessimistic",
    v2t: str = "best_caption",
) -> RetrievalResult:
    """Metrics and ranks from a dense similarity matrix ``sim [A, B]`` (``v2t``: the video -> text convention)."""
    if sim.ndim != 2:
        raise ValueError(f"similarity must be [texts, videos], got shape {tuple(sim.shape)}")
    opts = _Options(dsl, dsl_temperature, ties, v2t)
    return _evaluate(_Similarity(None, None, sim, chunk), caption_index, opts)


def evaluate_embeddings(
    text_emb: Tensor,
    video_emb: Tensor,
    caption_index: Tensor,
    dsl: bool = False,
    dsl_temperature: float = 0.01,
    chunk: int = 1024,
    ties: str = "pessimistic",
    normalize: bool = True,
    v2t: str = "best_caption",
) -> RetrievalResult:
    """Metrics and ranks from ``text_emb [A, E]`` and ``video_emb [B, E]`` (cosine similarity
    when ``normalize``), never holding more than ``chunk x max(A, B)`` similarities."""
    if text_emb.ndim != 2 or video_emb.ndim != 2 or text_emb.shape[1] != video_emb.shape[1]:
        shapes = f"{tuple(text_emb.shape)} and {tuple(video_emb.shape)}"
        raise ValueError(f"expected text [A, E] and video [B, E], got {shapes}")
    text_emb, video_emb = text_emb.float(), video_emb.float()
    if normalize:
        text_emb, video_emb = F.normalize(text_emb, dim=-1), F.normalize(video_emb, dim=-1)
    src = _Similarity(text_emb, video_emb, None, chunk)
    return _evaluate(src, caption_index, _Options(dsl, dsl_temperature, ties, v2t))


def retrieval_metrics(
    sim: Tensor,
    caption_index: Tensor,
    dsl: bool = False,
    dsl_temperature: float = 0.01,
    chunk: int = 1024,
    ties: str = "pessimistic",
    v2t: str = "best_caption",
) -> dict[str, float]:
    """``{t2v,v2t}_{R@1,R@5,R@10,MdR,MnR}`` (+ ``dsl_...`` when ``dsl``) from ``sim [A, B]``."""
    return evaluate_similarity(sim, caption_index, dsl, dsl_temperature, chunk, ties, v2t).metrics


def chance_levels(caption_index: Tensor, num_videos: int) -> dict[str, float]:
    """Expected R@K (percent) of a random ranking, for reading results: text->video ``K / B``;
    video->text ``1 - C(A - n, K) / C(A, K)`` averaged over videos with ``n >= 1`` captions."""
    counts = torch.bincount(caption_index.long().cpu(), minlength=num_videos).tolist()
    num_texts = int(caption_index.numel())
    out: dict[str, float] = {}
    for k in RECALL_KS:
        out[f"t2v_R@{k}"] = 100.0 * min(1.0, k / num_videos)
        if k >= num_texts:
            out[f"v2t_R@{k}"] = 100.0
            continue
        hits = [1.0 - math.comb(num_texts - n, k) / math.comb(num_texts, k) for n in counts if n > 0]
        out[f"v2t_R@{k}"] = 100.0 * float(np.mean(hits))
    return out
