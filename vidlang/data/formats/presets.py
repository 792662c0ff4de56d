"""Named recognition splits of published protocols, as presets of the ``class_subset`` / ``few_shot`` wrappers.

A preset is the split spec a paper's protocol implies, expanded from a few arguments::

    val: {format: preset, preset: k600-zeroshot, zs_split: 1, labels_dir: ViFi-CLIP/labels,
          source: {format: kinetics, csv: data/k600/validate.csv, video_root: data/k600/val}}
    train: {format: preset, preset: hmdb51-base2novel, part: train, seed: 1, labels_dir: ViFi-CLIP/labels,
            source: {format: hmdb51, split_dir: data/hmdb51/splits, video_root: data/hmdb51/videos, split: train}}

Presets (ViFi-CLIP, Rasheed et al. 2023; X-CLIP's Kinetics-600 protocol):

* ``k600-zeroshot`` (``zs_split`` 1, 2, 3): the 220 Kinetics-600 classes absent from Kinetics-400, evaluated in
  three random 160-class subsets; the class list of subset ``k`` is ``ZS_split{k}_K600.csv``.
* ``{k400,hmdb51,ucf101,ssv2}-base2novel``: classes split into base and novel halves by the label files
  ``{kinetics_400,hmdb_51,ucf_101,ssv2_174}_{base,novel}_labels.csv``; ``part: train`` is 16 shots per base
  class (``seed`` 1, 2, 3), ``part: base`` / ``novel`` the evaluation split of those classes.
* ``{hmdb51,ucf101,ssv2}-fewshot``: ``part: train`` is ``shots`` (2, 4, 8, 16) videos of every class,
  ``part: eval`` the whole evaluation split (fold 1).

Two ways to get the videos:

* ``source`` (your own annotation files, any format with class names): the preset becomes ``class_subset``
  (``classes_file`` = the preset's label file) and, for training parts, ``few_shot`` on top. The K-shot draw is
  vidlang's seeded draw, not ViFi-CLIP's: same protocol, other videos.
* ``splits_dir`` (ViFi-CLIP's ``datasets_splits`` folder) + ``video_root``: the exact video lists ViFi-CLIP
  trained and evaluated on (``path label`` lines, labels indexing the label file), read with the ``kinetics``
  list reader. Only these reproduce the published few-shot numbers video for video.

The label files (``labels_dir``) are ViFi-CLIP's ``labels/*.csv`` (``id,name``); class names are matched
loosely to the source's (``ride bike`` = ``ride_bike``). :func:`expand_preset` returns the spec a preset
stands for; the index carries the size of the split as published (``official``) when it is a fixed list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vidlang.data.formats.base import FORMATS, FormatError, build_index
from vidlang.data.sample import FormatIndex, Official

SOURCE = "ViFi-CLIP datasets_splits/ and labels/ (Rasheed et al. 2023)"
SHOTS = (2, 4, 8, 16)
SEEDS = (1, 2, 3)


@dataclass(frozen=True)
class Preset:
    """One named protocol split family (module docstring)."""

    name: str
    parts: tuple[str, ...]
    labels: dict[str, str]  # part -> label file name in labels_dir
    lists: dict[str, str]  # part -> list file (relative to splits_dir); "{seed}", "{shots}", "{zs}" filled in
    official: dict[str, int] = field(default_factory=dict)  # list file (after filling in) -> videos
    shots: int | None = None  # fixed K of a training part (base-to-novel: 16)
    classes: dict[str, int] = field(default_factory=dict)  # part -> number of classes


PRESETS: dict[str, Preset] = {}


def _add(p: Preset) -> None:
    PRESETS[p.name] = p


_add(Preset(
    "k600-zeroshot", ("eval",), {"eval": "ZS_split{zs}_K600.csv"}, {"eval": "k600_splits/ZS_split{zs}_K600_eval.txt"},
    {"k600_splits/ZS_split1_K600_eval.txt": 14083, "k600_splits/ZS_split2_K600_eval.txt": 13977,
     "k600_splits/ZS_split3_K600_eval.txt": 14135}, classes={"eval": 160},
))
_B2N = {  # dataset -> (label stem, ViFi-CLIP folder, base classes, novel classes, base val videos, novel val videos)
    "k400": ("kinetics_400", "k400_splits", 200, 200, 9944, 9933),
    "hmdb51": ("hmdb_51", "hmdb_splits", 26, 25, 780, 750),
    "ucf101": ("ucf_101", "ucf_splits", 51, 50, 2088, 1695),
    "ssv2": ("ssv2_174", "ssv2_splits", 87, 87, 17562, 7215),
}
for _ds, (_stem, _dir, _nb, _nn, _vb, _vn) in _B2N.items():
    _d = f"base2novel_splits/{_dir}"
    _add(Preset(
        f"{_ds}-base2novel", ("train", "base", "novel"),
        {"train": f"{_stem}_base_labels.csv", "base": f"{_stem}_base_labels.csv", "novel": f"{_stem}_novel_labels.csv"},
        {"train": f"{_d}/fs_base_s{{seed}}_train.txt", "base": f"{_d}/base_val.txt", "novel": f"{_d}/novel_val.txt"},
        {f"{_d}/base_val.txt": _vb, f"{_d}/novel_val.txt": _vn, **{f"{_d}/fs_base_s{s}_train.txt": 16 * _nb
                                                                  for s in SEEDS}},
        shots=16, classes={"train": _nb, "base": _nb, "novel": _nn},
    ))
_FS = {  # dataset -> (label file, ViFi-CLIP folder, eval list, classes, eval videos)
    "hmdb51": ("hmdb_51_labels.csv", "hmdb_splits", "val1.txt", 51, 1530),
    "ucf101": ("ucf_101_labels.csv", "ucf_splits", "val1.txt", 101, 3783),
    "ssv2": ("ssv2_labels.csv", "ssv2_splits", "validation.txt", 174, 24777),
}
for _ds, (_labels, _dir, _eval, _k, _ve) in _FS.items():
    _add(Preset(
        f"{_ds}-fewshot", ("train", "eval"), {"train": _labels, "eval": _labels},
        {"train": f"{_dir}/train1_few_shot_{{shots}}.txt", "eval": f"{_dir}/{_eval}"},
        {f"{_dir}/{_eval}": _ve, **{f"{_dir}/train1_few_shot_{k}.txt": k * _k for k in SHOTS}},
        classes={"train": _k, "eval": _k},
    ))


def _check(preset: Preset, part: str | None, seed: int, shots: int | None, zs_split: int) -> tuple[str, int | None]:
    part = part or preset.parts[0]
    if part not in preset.parts:
        raise FormatError("preset", f"{preset.name}: part must be one of {list(preset.parts)}, got {part!r}")
    if preset.name == "k600-zeroshot" and zs_split not in (1, 2, 3):
        raise FormatError("preset", f"k600-zeroshot: zs_split must be 1, 2 or 3, got {zs_split}")
    k = preset.shots if part == "train" else None
    if part == "train" and preset.shots is None:
        if shots not in SHOTS:
            raise FormatError("preset", f"{preset.name}: part train needs shots in {list(SHOTS)}, got {shots}")
        k = shots
    if part == "train" and preset.shots is not None and shots not in (None, preset.shots):
        raise FormatError("preset", f"{preset.name}: the training part is {preset.shots} shots, got shots={shots}")
    if part == "train" and seed not in SEEDS and preset.shots is not None:
        raise FormatError("preset", f"{preset.name}: seed must be one of {list(SEEDS)} (ViFi-CLIP's three draws)")
    return part, k


def expand_preset(
    name: str,
    part: str | None = None,
    labels_dir: str | None = None,
    source: dict[str, Any] | None = None,
    splits_dir: str | None = None,
    video_root: str | None = None,
    seed: int = 1,
    shots: int | None = None,
    zs_split: int = 1,
) -> tuple[dict[str, Any], Official | None]:
    """The split spec preset ``name`` stands for (module docstring) and the published size of its list (None for a
    seeded draw from ``source``)."""
    if name not in PRESETS:
        raise FormatError("preset", f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    preset = PRESETS[name]
    part, k = _check(preset, part, seed, shots, zs_split)
    if labels_dir is None:
        raise FormatError("preset", f"{name}: needs labels_dir (ViFi-CLIP's labels/ folder)")
    fill = {"seed": seed, "shots": k, "zs": zs_split}
    labels = str(Path(labels_dir) / preset.labels[part].format(**fill))
    if (source is None) == (splits_dir is None):
        raise FormatError("preset", f"{name}: give exactly one of source (your annotations) or splits_dir "
                                    "(ViFi-CLIP's datasets_splits/)")
    if splits_dir is not None:
        rel = preset.lists[part].format(**fill)
        spec = {"format": "kinetics", "list_file": str(Path(splits_dir) / rel), "classes": labels,
                "multi_label": False}
        if video_root is not None:
            spec["video_root"] = video_root
        videos = preset.official.get(rel)
        official = Official(f"{name} {part} ({rel})", videos, None, SOURCE) if videos else None
        return spec, official
    spec = {"format": "class_subset", "classes_file": labels, "source": source}
    if part == "train":
        spec = {"format": "few_shot", "shots": k, "seed": seed, "source": spec}
    return spec, None


@FORMATS.register("preset")
def read_preset(
    preset: str,
    part: str | None = None,
    labels_dir: str | None = None,
    source: dict[str, Any] | None = None,
    splits_dir: str | None = None,
    video_root: str | None = None,
    seed: int = 1,
    shots: int | None = None,
    zs_split: int = 1,
) -> FormatIndex:
    """Format wrapper: the split of preset ``preset`` (module docstring); checks its number of classes."""
    name = preset
    spec, official = expand_preset(name, part, labels_dir, source, splits_dir, video_root, seed, shots, zs_split)
    fmt = spec.pop("format")
    index = build_index(fmt, **spec)
    p = PRESETS[name]
    want = p.classes.get(part or p.parts[0])
    if want is not None and index.classes is not None and len(index.classes) != want:
        raise FormatError(spec.get("classes") or spec.get("classes_file") or name,
                          f"{name}: expected {want} classes, the label file gives {len(index.classes)}")
    index.official = official
    index.description = f"{name} {part or p.parts[0]}: {index.description}"
    return index
