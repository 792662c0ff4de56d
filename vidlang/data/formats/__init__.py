"""Annotation formats users already have (DESIGN.md §7), one registry :data:`FORMATS`.

Every reader is ``FORMATS.get(name)(**format_args) -> FormatIndex`` (entries + class names),
and validates its input: a malformed row raises :class:`FormatError` naming the file and line.
The wrapper formats ``few_shot`` (K per class) and ``class_subset`` (base / novel classes) of
:mod:`vidlang.data.protocols` wrap any other format.
"""

from vidlang.data import protocols  # noqa: F401  (registers the wrapper formats)
from vidlang.data.formats import howtocaption, kinetics, manifest, msrvtt, ucf_hmdb, webdataset, webvid  # noqa: F401
from vidlang.data.formats.base import FORMATS, FormatError, build_index

__all__ = ["FORMATS", "FormatError", "build_index"]
