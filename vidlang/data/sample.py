"""The sample contract shared by every format, dataset and loader.

Index entries (what format readers produce, cheap, no decoding)::

    VideoEntry(source, key, captions, window, label, ...)
        source:   str path of a video file, or a TarMember (bytes inside a shard, read lazily)
        captions: list[str]  (may be empty for pure recognition data)
        window:   (start_s, end_s) | None  (timestamped captions)
        label:    int | None   (class index; class names live in FormatIndex.classes)
                  | tuple[int, ...]  (multi-label data: the class indices present, maybe none)

Decoded samples (what a dataset returns, one per item)::

    VideoSample
        video:    uint8 [V, T, C, H, W]   V views (1 usually), T frames, RGB
        key:      str
        captions: list[str]                the captions this item contributes to the batch
        window:   (start_s, end_s) | None
        label:    int | None
        audio:    float32 [S] | None       mono at the dataset's sample rate (None = no audio track)
        path:     str                      where the video came from (for reports)
        frame_mask: bool [V, T] | None     False = padding slot of a short clip (sampling ``short_video: mask``)
        frame_indices: int64 [V', T] | None  the frame indices decoded (V' temporal views; the run record hashes them)
        meta:     dict                     the entry's ``meta`` (e.g. a conversation or a question, chat data)

Batches (see :mod:`vidlang.data.collate`)::

    video:         uint8 [B, T, C, H, W]     (or [B, V, T, C, H, W] when V > 1)
    captions:      list[str]                 all captions of the batch, flattened, length A
    caption_index: int64 [A]                 which video of the batch each caption belongs to
    label:         int64 [B]                 -1 where a sample has no label
    key:           list[str]                 length B
    audio:         float32 [B, S]            (only when decoded) zero-padded to the longest
    audio_lengths: int64 [B]                 valid samples per row
    audio_mask:    bool [B]                  False = the video has no audio track
    video_mask:    bool [B, T]               (only with ``short_video: mask``) False = padding slot
    frame_indices: int64 [B, V', T]          (when every sample knows them) the decoded frame indices
    meta:          list[dict]                (when any sample has one) each sample's entry ``meta``
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Window = tuple[float, float]
EvalCaptions = Literal["all", "first"]


@dataclass(frozen=True)
class TarMember:
    """A file stored inside a (uncompressed) tar shard: read by seeking, never extracted."""

    tar: str
    offset: int  # byte offset of the member's data in the tar file
    size: int
    name: str

    def read(self) -> bytes:
        with open(self.tar, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.tar}: member {self.name} truncated ({len(data)} of {self.size} bytes)")
        return data

    def __str__(self) -> str:
        return f"{self.tar}::{self.name}"


@dataclass
class VideoEntry:
    """One item of an index: where the video is and what goes with it (no decoding)."""

    source: str | TarMember
    key: str
    captions: list[str] = field(default_factory=list)
    window: Window | None = None
    label: int | tuple[int, ...] | None = None  # a tuple in multi-label data
    eval_captions: EvalCaptions = "all"  # "first": captions are alternatives of one item (HowToCaption)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return str(self.source)

    def open_source(self) -> str | bytes:
        """A path (checked to exist) or the bytes of a shard member."""
        if isinstance(self.source, TarMember):
            return self.source.read()
        if not os.path.exists(self.source):
            raise FileNotFoundError(f"{self.source}: video file not found (key {self.key})")
        return self.source


@dataclass(frozen=True)
class Official:
    """The size of a split as published (what a paper's number was measured on), for ``vidlang data check`` and
    the run record: ``videos`` distinct videos and ``captions`` texts (None: not a caption split, or unknown)."""

    name: str
    videos: int
    captions: int | None = None
    source: str = ""


@dataclass
class FormatIndex:
    """What a format reader returns: entries plus the class names (recognition data), and the official size of
    the split when the reader knows which published split it read (``official``).

    ``still_images``: the entries are still images (``image_captions``): the data module reads them with the
    ``image`` decoding backend as one-frame videos, whatever ``data.sampling`` says (Frozen in Time's joint
    image + video training)."""

    entries: list[VideoEntry]
    classes: list[str] | None = None
    description: str = ""
    official: Official | None = None
    still_images: bool = False

    def __len__(self) -> int:
        return len(self.entries)


@dataclass
class VideoSample:
    """One decoded item (shapes in the module docstring)."""

    video: torch.Tensor  # uint8 [V, T, C, H, W]
    key: str
    captions: list[str]
    window: Window | None = None
    label: int | tuple[int, ...] | None = None
    audio: torch.Tensor | None = None  # float32 [S]
    path: str = ""
    has_audio: bool = False
    frame_mask: torch.Tensor | None = None  # bool [V, T]
    frame_indices: torch.Tensor | None = None  # int64 [V', T] frame indices decoded (before spatial crops)
    meta: dict[str, Any] = field(default_factory=dict)  # the entry's meta (conversations, questions: chat data)

    def __post_init__(self) -> None:
        if self.video.ndim != 5:
            raise ValueError(f"{self.key}: video must be [V, T, C, H, W], got shape {tuple(self.video.shape)}")
        if self.frame_mask is not None:
            views, t = self.video.shape[:2]
            m = self.frame_mask
            if m.ndim != 2 or m.shape[1] != t or views % m.shape[0]:
                raise ValueError(
                    f"{self.key}: frame_mask {tuple(m.shape)} does not fit video {tuple(self.video.shape)}"
                )
            # the sampled views' mask spreads over their spatial crops (ThreeCrop: V -> 3V, a view's crops adjacent)
            self.frame_mask = m.bool().repeat_interleave(views // m.shape[0], dim=0)
