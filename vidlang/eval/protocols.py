"""Named evaluation protocols: what a published number is measured on, in one registered, hashed object.

A protocol fixes everything that moves a benchmark number besides the model::

    split        which videos and texts (and their official count: a copy with missing videos is not comparable)
    captions     single caption / several per video / a paragraph per video (sentences joined with one space,
                 in file order), the video -> text convention (``best_caption``: a video is ranked by its
                 best-ranked caption among all captions; ``clip4clip``: captions collapsed by max per video and
                 ranked among videos, see :mod:`vidlang.eval.retrieval`), duplicate captions (kept: each one is
                 a query), and the text length in tokens
    sampling     frames and sampler at test time (views, crops)
    ties         the tie rule of the ranks (``pessimistic``: a tie never helps)
    dsl          off: headline numbers are plain; dual softmax is reported separately under ``dsl_`` keys
    metric       retrieval R@K / MdR / MnR; top-1 / top-5; mAP (base / novel / harmonic mean: combine_base_novel)

``protocol.hash`` is the SHA-256 (16 hex digits) of the canonical JSON of that definition plus the version of the
metric code (:data:`METRIC_VERSION`): two numbers with the same protocol hash were computed the same way. Every
metrics dict a protocol returns embeds ``protocol`` and ``protocol_hash``, the counts evaluated and whether they
match the official split (``comparable``).

Using a protocol (the task calls these; see :meth:`EvalProtocol.evaluate`)::

    p = get_protocol("msvd")
    index = p.prepare_index(index)                       # paragraph joining (paragraph protocols), else as is
    metrics = p.evaluate(text_emb, video_emb, caption_index)   # retrieval: dict with protocol, hash, metrics
    metrics = p.evaluate_logits(logits, labels)          # recognition: logits [N, V, K], labels [N] or [N, K]

Protocols of several splits (K600 zero-shot, HMDB / UCF zero-shot folds) are one protocol per split plus
:func:`combine_splits` (mean and standard deviation); base-to-novel is evaluated per part and combined with
:func:`combine_base_novel` (harmonic mean).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from torch import Tensor

from vidlang.data.formats.base import join_paragraph
from vidlang.data.sample import FormatIndex, Official
from vidlang.registry import Registry

METRIC_VERSION = 1
"""Bump when the metric code changes in a way that can move a number (every protocol hash changes with it)."""

TASKS = ("retrieval", "recognition")
CAPTION_MODES = ("single", "multi", "paragraph")
METRICS = ("retrieval", "top1", "mAP")
PROSE = ("name", "dataset", "split", "notes")


@dataclass(frozen=True)
class CaptionSpec:
    """How texts enter a retrieval protocol (module docstring)."""

    mode: str = "single"  # single | multi | paragraph
    video_to_text: str = "best_caption"  # best_caption | clip4clip
    paragraph_sep: str = " "
    duplicates: str = "keep"  # duplicate captions stay, each one a query
    max_text_tokens: int = 32  # text length (tokens, start / end included), as the papers' max_words

    def __post_init__(self) -> None:
        from vidlang.eval.retrieval import V2T_MODES

        if self.mode not in CAPTION_MODES:
            raise ValueError(f"caption mode must be one of {CAPTION_MODES}, got {self.mode!r}")
        if self.video_to_text not in V2T_MODES:
            raise ValueError(f"video_to_text must be one of {V2T_MODES}, got {self.video_to_text!r}")
        if self.duplicates != "keep":
            raise ValueError(f"duplicates: only 'keep' is defined, got {self.duplicates!r}")


@dataclass(frozen=True)
class SamplingSpec:
    """Frames at test time, in the names of ``data.sampling`` / ``data.transform``."""

    num_frames: int
    sampler: str = "segment"
    sampler_args: tuple[tuple[str, Any], ...] = ()  # sorted (key, value) pairs
    views: int = 1  # temporal views (the multiview sampler around ``sampler`` when > 1)
    three_crop: bool = False
    short_video: str = "repeat"

    @property
    def args(self) -> dict[str, Any]:
        return dict(self.sampler_args)

    def as_data_config(self) -> dict[str, Any]:
        """The ``data.sampling`` / ``data.transform`` settings of this protocol's evaluation."""
        if self.views > 1:
            sampler, args = "multiview", {"sampler": self.sampler, "num_views": self.views, **self.args}
        else:
            sampler, args = self.sampler, self.args
        return {"sampling": {"eval_num_frames": self.num_frames, "eval_sampler": sampler, "eval_sampler_args": args,
                             "short_video": self.short_video},
                "transform": {"three_crop": self.three_crop}}


@dataclass(frozen=True)
class EvalProtocol:
    """One named protocol (module docstring)."""

    name: str
    task: str
    dataset: str
    split: str  # in words: which annotation file / list
    data: tuple[tuple[str, Any], ...]  # the reader and its split arguments (paths aside), sorted pairs
    sampling: SamplingSpec
    official: Official | None = None
    captions: CaptionSpec | None = None
    ties: str = "pessimistic"
    dsl: bool = False
    metric: str = "retrieval"
    fuse: str = "softmax"
    notes: str = ""

    def __post_init__(self) -> None:
        from vidlang.eval.retrieval import TIE_MODES

        if self.task not in TASKS:
            raise ValueError(f"{self.name}: task must be one of {TASKS}")
        if self.metric not in METRICS:
            raise ValueError(f"{self.name}: metric must be one of {METRICS}")
        if self.ties not in TIE_MODES:
            raise ValueError(f"{self.name}: ties must be one of {TIE_MODES}")
        if (self.task == "retrieval") != (self.captions is not None):
            raise ValueError(f"{self.name}: a retrieval protocol needs a caption spec, a recognition one none")

    # ---------------------------------------------------------------- identity
    def definition(self) -> dict[str, Any]:
        """Everything that defines the protocol (plain JSON values), plus :data:`METRIC_VERSION`."""
        d = asdict(self)
        d["data"] = dict(self.data)
        d["sampling"]["sampler_args"] = dict(self.sampling.sampler_args)
        d["metric_version"] = METRIC_VERSION
        return json.loads(json.dumps(d))  # tuples -> lists: what the JSON holds

    def hashed_definition(self) -> dict[str, Any]:
        """:meth:`definition` without its prose (name, dataset and split descriptions, notes, the official split's
        name and source): what the hash covers, so that rewording a description keeps the hash."""
        d = self.definition()
        for key in PROSE:
            d.pop(key)
        if d["official"] is not None:
            d["official"] = {k: v for k, v in d["official"].items() if k in ("videos", "captions")}
        return d

    @property
    def hash(self) -> str:
        """SHA-256 of the canonical JSON of :meth:`hashed_definition` (16 hex digits)."""
        text = json.dumps(self.hashed_definition(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def header(self) -> dict[str, Any]:
        return {"protocol": self.name, "protocol_hash": self.hash}

    # ---------------------------------------------------------------- data side
    def prepare_captions(self, sentences: Sequence[str]) -> list[str]:
        """A video's texts as this protocol evaluates them: a paragraph protocol joins them (none -> none)."""
        if self.captions is None:
            return list(sentences)
        if self.captions.mode == "paragraph":
            text = join_paragraph(list(sentences), self.captions.paragraph_sep)
            return [text] if text else []
        return list(sentences)

    def prepare_index(self, index: FormatIndex) -> FormatIndex:
        """``index`` with each entry's captions as :meth:`prepare_captions` makes them (idempotent)."""
        entries = [replace(e, captions=self.prepare_captions(e.captions)) for e in index.entries]
        return FormatIndex(entries, index.classes, index.description, index.official)

    def check_counts(self, num_videos: int, num_texts: int | None = None) -> tuple[bool, str]:
        """Whether an evaluation of ``num_videos`` videos (``num_texts`` texts) is the official split."""
        if self.official is None:
            return True, "no official count recorded"
        problems = []
        if num_videos != self.official.videos:
            problems.append(f"{num_videos} videos, official {self.official.videos}")
        if num_texts is not None and self.official.captions is not None and num_texts != self.official.captions:
            problems.append(f"{num_texts} texts, official {self.official.captions}")
        if problems:
            return False, f"{self.official.name}: " + "; ".join(problems) + ": not comparable with published numbers"
        return True, f"{self.official.name}: official size"

    def check_sampling(self, sampling: Any, transform: Any = None) -> list[str]:
        """Differences between a data config's evaluation settings (``SamplingConfig`` / ``TransformConfig``) and
        this protocol's (empty: they agree)."""
        want = self.sampling.as_data_config()
        got_frames = sampling.eval_num_frames or sampling.num_frames
        got_sampler = sampling.eval_sampler or sampling.sampler
        got_args = dict(sampling.eval_sampler_args if sampling.eval_sampler else sampling.sampler_args)
        out = []
        ws = want["sampling"]
        if got_frames != ws["eval_num_frames"]:
            out.append(f"frames: {got_frames} != {ws['eval_num_frames']}")
        if got_sampler != ws["eval_sampler"]:
            out.append(f"sampler: {got_sampler} != {ws['eval_sampler']}")
        got_args.pop("num_frames", None)
        got_args.pop("max_frames", None)
        if got_args != ws["eval_sampler_args"]:
            out.append(f"sampler args: {got_args} != {ws['eval_sampler_args']}")
        if sampling.short_video != ws["short_video"]:
            out.append(f"short_video: {sampling.short_video} != {ws['short_video']}")
        if transform is not None and bool(transform.three_crop) != want["transform"]["three_crop"]:
            out.append(f"three_crop: {transform.three_crop} != {want['transform']['three_crop']}")
        return out

    # ---------------------------------------------------------------- metrics
    def evaluate(
        self,
        text_emb: Tensor,
        video_emb: Tensor,
        caption_index: Tensor,
        *,
        dsl: bool = False,
        dsl_temperature: float = 0.01,
        chunk: int = 1024,
        normalize: bool = True,
    ) -> dict[str, Any]:
        """Retrieval metrics of ``text_emb [A, E]`` against ``video_emb [B, E]`` (``caption_index [A]``: each text's
        video) under this protocol: its video -> text convention and tie rule. ``dsl`` adds the dual-softmax
        numbers under ``dsl_`` keys only (the protocol's own numbers never use it). Returns
        ``{protocol, protocol_hash, num_videos, num_texts, comparable, comparable_reason, metrics}``."""
        from vidlang.eval.retrieval import evaluate_embeddings

        self.require("retrieval")
        res = evaluate_embeddings(text_emb, video_emb, caption_index, dsl=dsl, dsl_temperature=dsl_temperature,
                                  chunk=chunk, ties=self.ties, normalize=normalize,
                                  v2t=self.captions.video_to_text)  # fmt: skip
        return self._wrap(res.metrics, video_emb.shape[0], text_emb.shape[0])

    def evaluate_similarity(self, sim: Tensor, caption_index: Tensor, *, dsl: bool = False) -> dict[str, Any]:
        """:meth:`evaluate` from a dense similarity ``sim [A, B]``."""
        from vidlang.eval.retrieval import evaluate_similarity

        self.require("retrieval")
        res = evaluate_similarity(sim, caption_index, dsl=dsl, ties=self.ties, v2t=self.captions.video_to_text)
        return self._wrap(res.metrics, sim.shape[1], sim.shape[0])

    def evaluate_logits(self, logits: Tensor, labels: Tensor) -> dict[str, Any]:
        """Recognition metrics of ``logits [N, V, K]`` (or ``[N, K]``) against ``labels [N]`` (or 0/1 ``[N, K]`` for
        a multi-label protocol), views fused with the protocol's ``fuse``."""
        from vidlang.eval.classification import evaluate_views

        self.require("recognition")
        if (self.metric == "mAP") != (labels.ndim == 2):
            raise ValueError(f"{self.name}: {'multi-hot targets [N, K]' if self.metric == 'mAP' else 'labels [N]'} "
                             f"expected, got shape {tuple(labels.shape)}")
        res = evaluate_views(logits, labels, fuse=self.fuse)
        return self._wrap(res.metrics, logits.shape[0], None)

    def require(self, task: str) -> EvalProtocol:
        """``self`` if this is a ``task`` protocol, else a :class:`~vidlang.errors.ConfigError`."""
        if self.task != task:
            from vidlang.errors import ConfigError

            raise ConfigError(f"protocol {self.name!r} is a {self.task} protocol, not {task}")
        return self

    def report_fields(self, num_videos: int, num_texts: int | None = None) -> dict[str, Any]:
        """What a metrics JSON embeds: ``{protocol, protocol_hash, comparable, comparable_reason}``."""
        ok, why = self.check_counts(num_videos, num_texts)
        return {**self.header(), "comparable": ok, "comparable_reason": why}

    def _wrap(self, metrics: dict[str, float], num_videos: int, num_texts: int | None) -> dict[str, Any]:
        out: dict[str, Any] = {**self.header(), "num_videos": int(num_videos)}
        if num_texts is not None:
            out["num_texts"] = int(num_texts)
        out.update(self.report_fields(num_videos, num_texts))
        out["metrics"] = dict(metrics)
        return out


PROTOCOLS: Registry[EvalProtocol] = Registry("evaluation protocol")


def register(p: EvalProtocol) -> EvalProtocol:
    PROTOCOLS.register(p.name)(p)
    return p


def get_protocol(name: str) -> EvalProtocol:
    return PROTOCOLS.get(name)


def protocol_of(hparams: Any) -> EvalProtocol | None:
    """The protocol a task's hyper-parameters name (``hparams["protocol"]``), or None."""
    name = (hparams or {}).get("protocol")
    return None if name is None else get_protocol(name)


def _pairs(**kw: Any) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(kw.items()))


def combine_splits(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and (population) standard deviation over the splits of a multi-split protocol (K600 zero-shot,
    zero-shot folds): ``{protocols, protocol_hashes, metrics: {key: mean}, std: {key: std}, splits}``."""
    if not results:
        raise ValueError("combine_splits: no results")
    keys = [k for k, v in results[0]["metrics"].items() if isinstance(v, (int, float))]
    mean, std = {}, {}
    for k in keys:
        vals = [float(r["metrics"][k]) for r in results]
        m = sum(vals) / len(vals)
        mean[k], std[k] = m, math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals))
    return {"protocols": [r["protocol"] for r in results], "protocol_hashes": [r["protocol_hash"] for r in results],
            "splits": len(results), "comparable": all(r["comparable"] for r in results), "metrics": mean, "std": std}


def combine_base_novel(base: dict[str, Any], novel: dict[str, Any]) -> dict[str, Any]:
    """Base-to-novel: top-1 on the base classes, on the novel classes, and their harmonic mean."""
    from vidlang.eval.classification import harmonic_mean

    b, n = base["metrics"]["top1"], novel["metrics"]["top1"]
    return {"protocols": [base["protocol"], novel["protocol"]],
            "protocol_hashes": [base["protocol_hash"], novel["protocol_hash"]],
            "comparable": base["comparable"] and novel["comparable"],
            "metrics": {"base_top1": b, "novel_top1": n, "hm_top1": harmonic_mean(b, n)}}


# ---------------------------------------------------------------- the protocols

_CLIP4CLIP = SamplingSpec(12, "fps", _pairs(fps=1.0))  # CLIP4Clip: 1 frame / s, at most 12, spread evenly
_LONG = SamplingSpec(64, "fps", _pairs(fps=1.0))  # paragraph retrieval on long videos: 1 frame / s, at most 64
_MULTI = CaptionSpec("multi", "clip4clip", max_text_tokens=32)  # published multi-caption numbers use clip4clip
_PARAGRAPH = CaptionSpec("paragraph", "best_caption", max_text_tokens=64)

register(EvalProtocol(
    "msrvtt-1ka", "retrieval", "MSR-VTT", "1k-A test: MSRVTT_JSFUSION_test.csv (1,000 videos, one caption each)",
    _pairs(format="msrvtt"), _CLIP4CLIP, Official("MSR-VTT 1k-A test", 1000, 1000, "JSFusion (Yu et al. 2018)"),
    CaptionSpec("single", "best_caption", max_text_tokens=32)))
register(EvalProtocol(
    "msrvtt-full", "retrieval", "MSR-VTT", "full test: the official 2,990 test videos, all 20 captions each "
    "(MSRVTT_test.full.csv + MSRVTT_data.json)", _pairs(format="msrvtt"), _CLIP4CLIP,
    Official("MSR-VTT full test", 2990, 59800, "MSR-VTT (Xu et al. 2016)"), _MULTI))
register(EvalProtocol(
    "msvd", "retrieval", "MSVD", "test: test_list.txt (670 videos) with all captions of raw-captions.pkl",
    _pairs(format="msvd", split="test"), _CLIP4CLIP, Official("MSVD test", 670, 27763, "S2VT split"), _MULTI))
register(EvalProtocol(
    "didemo-paragraph", "retrieval", "DiDeMo", "test_data.json: paragraph-to-video, descriptions joined per video",
    _pairs(format="didemo", paragraph=True, split="test"), _LONG,
    Official("DiDeMo test (paragraphs)", 1004, 1004, "LocalizingMoments"), _PARAGRAPH))
register(EvalProtocol(
    "anet-paragraph", "retrieval", "ActivityNet Captions", "val_1.json: paragraph-to-video, sentences joined per "
    "video (long videos: the sampler above is part of the number)", _pairs(format="activitynet", paragraph=True,
                                                                           split="val_1"), _LONG,
    Official("ActivityNet Captions val_1 (paragraphs)", 4917, 4917, "ActivityNet Captions"), _PARAGRAPH))
register(EvalProtocol(
    "lsmdc", "retrieval", "LSMDC", "public test: LSMDC16_challenge_1000_publictect.csv (1,000 clips)",
    _pairs(format="lsmdc", split="test"), _CLIP4CLIP, Official("LSMDC public test (1k)", 1000, 1000, "LSMDC 2016"),
    CaptionSpec("single", "best_caption", max_text_tokens=32)))
register(EvalProtocol(
    "vatex", "retrieval", "VATEX", "test: the 1,500-video half of the official validation set (HGR split), 10 "
    "English captions each", _pairs(format="vatex", split="test"), _CLIP4CLIP,
    Official("VATEX test (1.5k)", 1500, 15000, "HGR (Chen et al. 2020)"), _MULTI))

register(EvalProtocol(
    "kinetics", "recognition", "Kinetics-400", "validation set (ViFi-CLIP val.txt: 19,877 videos)",
    _pairs(format="kinetics"), SamplingSpec(8, "segment", views=4, three_crop=True),
    Official("Kinetics-400 val", 19877, None, "ViFi-CLIP datasets_splits/k400_splits/val.txt"),
    metric="top1", notes="4 temporal views x 3 crops, softmax per view, averaged"))
register(EvalProtocol(
    "charades", "recognition", "Charades", "Charades_v1_test.csv, whole videos, multi-label",
    _pairs(format="charades", split="test"), SamplingSpec(16, "segment"),
    Official("Charades test", 1863, None, "Charades v1"), metric="mAP", fuse="sigmoid",
    notes="mAP over the classes with a positive video"))
_K600 = {1: 14083, 2: 13977, 3: 14135}
for _s, _n in _K600.items():
    register(EvalProtocol(
        f"k600-zeroshot-{_s}", "recognition", "Kinetics-600 (220 new classes)",
        f"ViFi-CLIP / X-CLIP zero-shot split {_s}: 160 of the 220 classes not in Kinetics-400",
        _pairs(format="preset", preset="k600-zeroshot", zs_split=_s), SamplingSpec(32, "segment"),
        Official(f"K600 zero-shot split {_s}", _n, None, "ViFi-CLIP ZS_split{s}_K600_eval.txt"),
        metric="top1", notes="single view; report the mean and std over the three splits (combine_splits)"))
for _ds, _folds in (("hmdb51", (1530, 1530, 1530)), ("ucf101", (3783, 3734, 3696))):
    for _f, _n in enumerate(_folds, 1):
        register(EvalProtocol(
            f"{_ds}-zeroshot-{_f}", "recognition", _ds.upper(), f"test list of fold {_f}, all classes",
            _pairs(format=_ds, fold=_f, split="test"), SamplingSpec(32, "segment"),
            Official(f"{_ds.upper()} fold {_f} test", _n, None, "official split files"), metric="top1",
            notes="single view; report the mean and std over the three folds (combine_splits)"))
for _ds, (_b, _n) in {"k400": (9944, 9933), "hmdb51": (780, 750), "ucf101": (2088, 1695),
                      "ssv2": (17562, 7215)}.items():
    for _part, _count in (("base", _b), ("novel", _n)):
        register(EvalProtocol(
            f"{_ds}-base2novel-{_part}", "recognition", _ds, f"ViFi-CLIP base-to-novel: {_part} classes' "
            "evaluation list", _pairs(format="preset", preset=f"{_ds}-base2novel", part=_part),
            SamplingSpec(32, "segment"), Official(f"{_ds} base-to-novel {_part}", _count, None, "ViFi-CLIP"),
            metric="top1", notes="16-shot training on base classes (3 seeds); combine_base_novel for the HM"))
for _ds, _count in {"hmdb51": 1530, "ucf101": 3783, "ssv2": 24777}.items():
    register(EvalProtocol(
        f"{_ds}-fewshot", "recognition", _ds, "ViFi-CLIP few-shot: the full evaluation list of fold 1",
        _pairs(format="preset", preset=f"{_ds}-fewshot", part="eval"), SamplingSpec(32, "segment"),
        Official(f"{_ds} few-shot eval", _count, None, "ViFi-CLIP"), metric="top1",
        notes="K = 2, 4, 8, 16 shots of every class in training"))

__all__ = ["METRIC_VERSION", "PROTOCOLS", "CaptionSpec", "EvalProtocol", "SamplingSpec", "combine_base_novel",
           "combine_splits", "get_protocol", "register"]
