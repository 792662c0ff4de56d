"""Recognition protocols: K-shot sampling, base/novel class splits, class subsets as wrapper formats."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from vidlang.data.formats import build_index
from vidlang.data.formats.protocols import (
    base_novel_split,
    few_shot_index,
    few_shot_indices,
    resolve_classes,
    subset_classes,
)

CLASSES = ["jump", "run", "swim", "walk", "throw"]


@pytest.fixture
def manifest(tmp_path):
    """A manifest of 5 classes with 6, 5, 4, 7, 3 videos (files need not exist to index them)."""
    counts = [6, 5, 4, 7, 3]
    rows = ["path,label,split"]
    for c, n in enumerate(counts):
        rows += [f"videos/{CLASSES[c]}_{i}.mp4,{c},train" for i in range(n)]
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return tmp_path / "manifest.csv"


def test_few_shot_exactly_k_per_class_and_seed_stable():
    labels = [i % 4 for i in range(40)] + [None, -1]
    pick = few_shot_indices(labels, 3, seed=7)
    assert Counter(labels[i] for i in pick) == {0: 3, 1: 3, 2: 3, 3: 3}
    assert pick == sorted(set(pick)) and pick == few_shot_indices(labels, 3, seed=7)
    others = {tuple(few_shot_indices(labels, 3, seed=s)) for s in range(6)}
    assert len(others) > 1  # the seed matters
    # the choice depends on the keys, not the order of the entries
    keys = [f"v{i:03d}" for i in range(len(labels))]
    order = list(range(len(labels)))
    random.Random(0).shuffle(order)
    a = {keys[i] for i in few_shot_indices(labels, 2, 5, keys=keys)}
    b = {keys[order[i]] for i in few_shot_indices([labels[j] for j in order], 2, 5, keys=[keys[j] for j in order])}
    assert a == b
    # growing K keeps the smaller choice's prefix property per class (permutation prefix)
    small, big = set(few_shot_indices(labels, 2, 9)), set(few_shot_indices(labels, 4, 9))
    assert small <= big


def test_few_shot_errors_when_a_class_is_too_small():
    with pytest.raises(ValueError, match=r"class 1 \('run'\) has only 2 items, fewer than 3 shots"):
        few_shot_indices([0, 0, 0, 1, 1], 3, class_names=["jump", "run"])
    with pytest.raises(ValueError, match="shots must be >= 1"):
        few_shot_indices([0], 0)


def test_few_shot_wrapper_format(manifest):
    src = {"format": "manifest", "path": str(manifest)}
    index = build_index("few_shot", source=src, shots=3, seed=1)
    assert Counter(e.label for e in index.entries) == dict.fromkeys(range(5), 3) and index.classes == CLASSES
    again = build_index("few_shot", source=src, shots=3, seed=1)
    assert [e.key for e in again.entries] == [e.key for e in index.entries]
    with pytest.raises(ValueError, match="'throw'.* has only 3 items, fewer than 4 shots"):
        build_index("few_shot", source=src, shots=4)
    direct = few_shot_index(build_index(**src), 2, seed=1)
    assert len(direct) == 10


def test_base_novel_split_is_deterministic():
    base, novel = base_novel_split(9)
    assert base == [0, 1, 2, 3, 4] and novel == [5, 6, 7, 8]
    b2, n2 = base_novel_split(10, base_ratio=0.5, seed=3)
    assert (b2, n2) == base_novel_split(10, base_ratio=0.5, seed=3)
    assert sorted(b2 + n2) == list(range(10)) and len(b2) == 5 and not set(b2) & set(n2)
    assert b2 != [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        base_novel_split(1)
    with pytest.raises(ValueError):
        base_novel_split(4, base_ratio=1.0)


def test_class_subset_relabels_and_renames(manifest):
    src = {"format": "manifest", "path": str(manifest)}
    novel = build_index("class_subset", source=src, classes="novel")
    assert novel.classes == ["walk", "throw"]
    assert Counter(e.label for e in novel.entries) == {0: 7, 1: 3}
    assert all(CLASSES[e.meta["original_label"]] == novel.classes[e.label] for e in novel.entries)
    picked = subset_classes(build_index(**src), resolve_classes(["swim", "jump"], CLASSES))
    assert picked.classes == ["swim", "jump"] and Counter(e.label for e in picked.entries) == {0: 4, 1: 6}
    assert resolve_classes("all", CLASSES) == [0, 1, 2, 3, 4] and resolve_classes([4, 0], CLASSES) == [4, 0]
    with pytest.raises(ValueError, match="'dance' is not one of"):
        resolve_classes(["dance"], CLASSES)
    with pytest.raises(ValueError, match="repeats"):
        resolve_classes(["run", 1], CLASSES)
    with pytest.raises(ValueError, match="'format'"):
        build_index("class_subset", source={"path": str(manifest)}, classes="base")
