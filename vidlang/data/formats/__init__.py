"""Annotation formats users already have (docs/architecture.md; datasets/README.md), one registry :data:`FORMATS`.

Every reader is ``FORMATS.get(name)(**format_args) -> FormatIndex`` (entries + class names),
and validates its input: a malformed row raises :class:`FormatError` naming the file and line.
Every module of this package is imported here (:func:`vidlang.registry.import_submodules`), so a new
format is one new file that registers its reader with ``@FORMATS.register("name")``. The wrapper
formats ``few_shot`` (K per class) and ``class_subset`` (base / novel classes) of
:mod:`vidlang.data.formats.protocols` wrap any other format.
"""

from vidlang.data.formats.base import FORMATS, FormatError, build_index
from vidlang.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = ["FORMATS", "FormatError", "build_index"]
