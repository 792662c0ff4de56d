"""Annotation formats users already have (DESIGN.md §7), one registry :data:`FORMATS`.

Every reader is ``FORMATS.get(name)(**format_args) -> FormatIndex`` (entries + class names),
and validates its input: a malformed row raises :class:`FormatError` naming the file and line.
"""

from vidlang.data.formats import howtocaption, kinetics, manifest, msrvtt, ucf_hmdb, webdataset, webvid  # noqa: F401
from vidlang.data.formats.base import FORMATS, FormatError, build_index

__all__ = ["FORMATS", "FormatError", "build_index"]
