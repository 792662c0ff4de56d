"""A small, real video-text corpus generated offline (``vidlang synth``).

Videos of coloured shapes with a motion from a fixed vocabulary -- including
order-dependent pairs that are exact time reversals of each other -- and a sound,
encoded as H.264 + AAC ``.mp4``, with caption paraphrases, a motion label, a
stratified split and generic / WebVid-style manifests. See :mod:`.corpus` for the
folder layout.
"""

from vidlang.data.synthetic.corpus import (
    MANIFEST_COLUMNS,
    WEBVID_COLUMNS,
    CorpusInfo,
    encode_video,
    generate_corpus,
    iso_duration,
    video_relpath,
)
from vidlang.data.synthetic.render import render_audio, render_video, shape_mask
from vidlang.data.synthetic.spec import (
    COLORS,
    LABEL_NAMES,
    MOTIONS,
    REVERSE_PAIRS,
    SHAPES,
    SOUNDS,
    ShapeSpec,
    VideoSpec,
    make_specs,
)

__all__ = [
    "COLORS",
    "LABEL_NAMES",
    "MANIFEST_COLUMNS",
    "MOTIONS",
    "REVERSE_PAIRS",
    "SHAPES",
    "SOUNDS",
    "WEBVID_COLUMNS",
    "CorpusInfo",
    "ShapeSpec",
    "VideoSpec",
    "encode_video",
    "generate_corpus",
    "iso_duration",
    "make_specs",
    "render_audio",
    "render_video",
    "shape_mask",
    "video_relpath",
]
