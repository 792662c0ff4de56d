"""Recognition protocols on top of any format: few-shot K-shot subsets, base/novel class splits and
label-set switches (zero-shot transfer).

Pure functions work on label lists / :class:`FormatIndex`; the same operations are registered as
*wrapper formats* in :data:`vidlang.data.formats.FORMATS`, so a datamodule split can use them directly::

    data:
      train: {format: few_shot, shots: 4, seed: 0,
              source: {format: manifest, path: corpus/manifest.csv, split: train}}
      val:   {format: class_subset, classes: novel, base_ratio: 0.5,
              source: {format: manifest, path: corpus/manifest.csv, split: val}}

- ``few_shot``: exactly ``shots`` videos of every class (error naming the class if it has fewer),
  chosen with ``seed``; the choice depends only on (seed, the entries' keys), not on their order.
- ``class_subset``: keep the classes ``classes`` = ``"base"`` / ``"novel"`` (of
  :func:`base_novel_split`) or a list of names or indices, or those named in ``classes_file`` (names match
  loosely: case, ``_`` and ``-`` aside); labels are renumbered 0..k-1 in that
  order and the class names become the subset (the label-set switch for zero-shot transfer).
  Multi-label entries (label tuples) keep the labels of the subset, renumbered; an entry left
  with none of them is dropped.

Few-shot subsets are defined for single-label data only (a multi-label index is refused).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from vidlang.data.formats.base import FORMATS, FormatError, build_index, read_class_names
from vidlang.data.sample import FormatIndex, VideoEntry


def few_shot_indices(
    labels: Sequence[int | None], shots: int, seed: int = 0, keys: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
) -> list[int]:
    """Positions of exactly ``shots`` items per class (classes = the labels that occur), sorted.

    Seed-stable: within a class, candidates are ordered by ``keys`` (default: position) and then
    permuted by a generator seeded with ``(seed, class)``. Unlabelled items (None/-1) are skipped.
    """
    if shots < 1:
        raise ValueError(f"few-shot: shots must be >= 1, got {shots}")
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, lab in enumerate(labels):
        if lab is not None and lab >= 0:
            by_class[int(lab)].append(i)
    if not by_class:
        raise ValueError("few-shot: no labelled items")
    chosen: list[int] = []
    for c in sorted(by_class):
        items = by_class[c]
        if len(items) < shots:
            name = f" ({class_names[c]!r})" if class_names is not None and c < len(class_names) else ""
            raise ValueError(f"few-shot: class {c}{name} has only {len(items)} items, fewer than {shots} shots")
        if keys is not None:
            items = sorted(items, key=lambda i: keys[i])
        g = torch.Generator().manual_seed(_class_seed(seed, c))
        order = torch.randperm(len(items), generator=g)[:shots].tolist()
        chosen.extend(items[j] for j in order)
    return sorted(chosen)


def _class_seed(seed: int, cls: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{cls}".encode()).digest()[:8], "little") % (2**63)


def base_novel_split(
    num_classes: int, base_ratio: float = 0.5, seed: int | None = None
) -> tuple[list[int], list[int]]:
    """Deterministic split of class indices into (base, novel).

    ``seed=None`` (default): the first ``ceil(K * base_ratio)`` classes in label order are base, the
    rest novel (the CoOp / ViFi-CLIP convention on a fixed class order). With a seed, the classes are
    permuted by that seed first; both lists come back sorted.
    """
    if num_classes < 2:
        raise ValueError(f"base-to-novel needs at least 2 classes, got {num_classes}")
    if not 0.0 < base_ratio < 1.0:
        raise ValueError(f"base_ratio must lie in (0, 1), got {base_ratio}")
    n_base = min(num_classes - 1, max(1, math.ceil(num_classes * base_ratio - 1e-9)))
    order = list(range(num_classes))
    if seed is not None:
        order = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[:n_base]), sorted(order[n_base:])


def resolve_classes(spec: str | Sequence[str | int], names: Sequence[str], base_ratio: float = 0.5,
                    split_seed: int | None = None) -> list[int]:
    """Class indices from ``"base"`` / ``"novel"`` / ``"all"`` or a list of names or indices."""
    if isinstance(spec, str):
        if spec == "all":
            return list(range(len(names)))
        if spec not in ("base", "novel"):
            raise ValueError(f"classes must be 'base', 'novel', 'all' or a list, got {spec!r}")
        base, novel = base_novel_split(len(names), base_ratio, split_seed)
        return base if spec == "base" else novel
    lookup = {n: i for i, n in enumerate(names)}
    loose: dict[str, list[int]] = defaultdict(list)
    for i, n in enumerate(names):
        loose[loose_name(n)].append(i)
    out: list[int] = []
    for c in spec:
        if isinstance(c, int):
            if not 0 <= c < len(names):
                raise ValueError(f"class index {c} outside the {len(names)} classes")
            out.append(c)
        elif c in lookup:
            out.append(lookup[c])
        elif len(loose.get(loose_name(c), [])) == 1:  # "ride bike" (a label file) vs "ride_bike" (HMDB folders)
            out.append(loose[loose_name(c)][0])
        else:
            raise ValueError(f"class {c!r} is not one of the data's classes ({len(names)}: {list(names)[:8]} ...)")
    if len(set(out)) != len(out):
        raise ValueError(f"class list repeats a class: {list(spec)}")
    return out


def loose_name(name: str) -> str:
    """A class name compared loosely: case, ``_`` / ``-`` and runs of spaces do not matter."""
    return " ".join(re.sub(r"[_\-]+", " ", name).lower().split())


def subset_classes(index: FormatIndex, keep: Sequence[int]) -> FormatIndex:
    """Entries of the classes ``keep`` only, relabelled ``keep[j] -> j``; class names follow."""
    if index.classes is None:
        raise ValueError(f"{index.description}: has no class names; cannot select classes")
    remap = {c: j for j, c in enumerate(keep)}
    entries = []
    for e in index.entries:
        if isinstance(e.label, tuple):
            kept = tuple(remap[c] for c in e.label if c in remap)
            if kept:
                entries.append(_relabel(e, kept))
        elif e.label is not None and e.label in remap:
            entries.append(_relabel(e, remap[e.label]))
    names = [index.classes[c] for c in keep]
    return FormatIndex(entries, names, f"{index.description} [classes {len(keep)} of {len(index.classes)}]")


def _relabel(entry: VideoEntry, label: int | tuple[int, ...]) -> VideoEntry:
    from dataclasses import replace

    return replace(entry, label=label, meta={**entry.meta, "original_label": entry.label})


def few_shot_index(index: FormatIndex, shots: int, seed: int = 0) -> FormatIndex:
    """The K-shot subset of ``index`` (see :func:`few_shot_indices`); single-label data only."""
    if any(isinstance(e.label, tuple) for e in index.entries):
        raise ValueError(f"few-shot: {index.description} is multi-label (label sets); K-shot sampling needs one "
                         "label per video")
    pick = few_shot_indices([e.label for e in index.entries], shots, seed, keys=[e.key for e in index.entries],
                            class_names=index.classes)
    entries = [index.entries[i] for i in pick]
    return FormatIndex(entries, index.classes, f"{index.description} [{shots}-shot, seed {seed}]")


def _source(source: dict[str, Any], wrapper: str) -> FormatIndex:
    if not isinstance(source, dict) or "format" not in source:
        raise FormatError(wrapper, "needs 'source': a split spec with a 'format' key")
    spec = dict(source)
    return build_index(spec.pop("format"), **spec)


@FORMATS.register("few_shot")
def read_few_shot(source: dict[str, Any], shots: int, seed: int = 0) -> FormatIndex:
    """Format wrapper: the ``shots``-per-class subset of ``source`` chosen with ``seed``."""
    return few_shot_index(_source(source, "few_shot"), shots, seed)


@FORMATS.register("class_subset")
def read_class_subset(
    source: dict[str, Any], classes: str | list[str | int] | None = None, base_ratio: float = 0.5,
    split_seed: int | None = None, classes_file: str | None = None,
) -> FormatIndex:
    """Format wrapper: only the classes ``classes`` of ``source`` (see module docstring), or the classes named in
    ``classes_file`` (a class-name file or an ``id,name`` label CSV, e.g. ViFi-CLIP's base / novel labels), in
    that file's order."""
    if (classes is None) == (classes_file is None):
        raise FormatError("class_subset", "give exactly one of 'classes' or 'classes_file'")
    index = _source(source, "class_subset")
    if index.classes is None:
        raise FormatError(index.description, "class_subset needs class names (e.g. a classes file)")
    if classes_file is not None:
        try:
            keep = resolve_classes(read_class_names(classes_file), index.classes)
        except ValueError as e:
            if isinstance(e, FormatError):
                raise
            raise FormatError(classes_file, str(e)) from None
    else:
        keep = resolve_classes(classes, index.classes, base_ratio, split_seed)
    return subset_classes(index, keep)
