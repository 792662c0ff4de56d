"""docs/recipes.md's recipe table against configs/papers/: every preset has a column (and every column a preset),
and every `vidlang value` of the table is the value of the preset as vidlang's LightningCLI parses it."""

from __future__ import annotations

import math
import re
import sys
from functools import cache
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import yaml
from jsonargparse import Namespace

from vidlang.cli.lightning import VidlangCLI

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "docs/recipes.md"
PRESETS = sorted((ROOT / "configs/papers").glob("*.yaml"))
CPU = ["--trainer.accelerator", "cpu", "--trainer.logger", "false"]
NO_WEIGHTS = {"model": {"init_args": {"model": {"pretrained": None}}}}  # the placeholder path is not a file here


def split_row(line: str) -> list[str]:
    """``| a | b \\| c |`` -> ``["a", "b | c"]`` (escaped pipes stay in their cell)."""
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [c.strip().replace("\\|", "|") for c in cells]


def read_table(text: str) -> tuple[list[str], list[tuple[str, str, list[str]]]]:
    """The recipe table: (preset names, rows of (field, config key, one cell per preset))."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| field | config key |"))
    header = split_row(lines[start])
    presets = [h.strip("`") for h in header[2:]]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = split_row(line)
        assert len(cells) == len(header), f"docs/recipes.md: row {cells[0]!r} has {len(cells)} cells, not {len(header)}"
        rows.append((cells[0], cells[1].strip("`"), cells[2:]))
    return presets, rows


TABLE_PRESETS, TABLE_ROWS = read_table(RECIPES.read_text())


def vidlang_value(cell: str) -> tuple[bool, Any]:
    """The cell's vidlang value: the last backticked literal after the arrow (YAML), or (False, None) for n/a."""
    if "→" not in cell:
        return False, None
    found = re.findall(r"`([^`]*)`", cell.split("→")[-1])
    assert found, f"cell {cell!r} has an arrow but no `vidlang value`"
    return True, yaml.safe_load(found[-1])


@cache
def parsed(name: str) -> Namespace:
    """The preset's full parsed config (defaults filled in), built like ``vidlang fit --config`` on the meta device."""
    path = ROOT / "configs/papers" / f"{name}.yaml"
    args = ["--config", str(path), *CPU]
    with mock.patch.object(sys, "argv", ["vidlang"]), torch.device("meta"):
        cli = VidlangCLI(args=[*args, "--config", _no_weights()], run=False)
    assert type(cli.model).__name__ in ("RetrievalTask", "RecognitionTask")  # the preset builds its task
    return cli.config


@cache
def _no_weights() -> str:
    import tempfile

    out = Path(tempfile.mkdtemp(prefix="vidlang_recipes_")) / "no_weights.yaml"
    out.write_text(yaml.safe_dump(NO_WEIGHTS))
    return str(out)


def plain(value: Any) -> Any:
    """Namespaces -> dicts, tuples -> lists, numeric strings -> floats (recursively)."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, str):
        try:
            return float(value) if re.fullmatch(r"[-+]?\d*\.?\d+[eE][-+]?\d+", value) else value
        except ValueError:
            return value
    return value


def same(a: Any, b: Any) -> bool:
    a, b = plain(a), plain(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) | isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=0.0)
    return a == b


def effective(cfg: Namespace, key: str) -> Any:
    """The preset's value of a table row: a dotted config key, or a ``derived.*`` quantity."""
    if key == "derived.global_batch":
        return cfg["data.loader.batch_size"] * cfg["trainer.devices"] * cfg["trainer.accumulate_grad_batches"]
    if key == "derived.effective_lr":
        base = cfg["model.init_args.optim.base_batch_size"]
        lr = cfg["model.init_args.optim.lr"]
        return lr if base is None else lr * effective(cfg, "derived.global_batch") / base
    if key == "derived.callbacks":
        given = {}
        for cb in cfg.get("trainer.callbacks") or []:
            cb = plain(cb)
            given[cb["class_path"].rsplit(".", 1)[-1]] = cb.get("init_args") or {}
        return given
    assert key in cfg, f"docs/recipes.md names config key {key!r}, which the parsed preset does not have"
    return cfg[key]


def test_table_and_presets_list_the_same_files():
    assert PRESETS, "configs/papers holds no preset"
    assert sorted(TABLE_PRESETS) == [p.stem for p in PRESETS]
    assert len(set(TABLE_PRESETS)) == len(TABLE_PRESETS)
    assert len(TABLE_ROWS) >= 30  # the recipe: model, optimizer, schedule, batch, frames, augmentation, loss


def test_every_preset_names_its_source_and_target():
    sources = dict(zip(TABLE_PRESETS, next(r for r in TABLE_ROWS if r[0].startswith("source"))[2], strict=True))
    for path in PRESETS:
        header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
        commit = re.search(r"@ ([0-9a-f]{7})", sources[path.stem])
        assert commit and commit.group(1) in header, f"{path.name}: header lacks the commit {sources[path.stem]!r}"
        assert "Official source:" in header and "Target:" in header, path.name
        raw = yaml.safe_load(path.read_text())
        assert "REPLACE" in raw["model"]["init_args"]["model"]["pretrained"], f"{path.name}: weights placeholder"


@pytest.mark.parametrize("preset", TABLE_PRESETS)
def test_preset_matches_the_table(preset: str):
    column = TABLE_PRESETS.index(preset)
    cfg = parsed(preset)
    checked, wrong = 0, []
    for field, key, cells in TABLE_ROWS:
        if key == "—":
            continue
        present, want = vidlang_value(cells[column])
        if not present:
            continue
        have = effective(cfg, key)
        checked += 1
        if not same(have, want):
            wrong.append(f"{field} ({key}): table {want!r}, preset {plain(have)!r}")
    assert not wrong, f"{preset}: " + "; ".join(wrong)
    assert checked >= 25


def test_table_check_fails_on_a_wrong_value():
    """The comparison is not vacuous: a changed number, list or string differs."""
    cfg = parsed("ila_k400_b32_8f")
    assert same(effective(cfg, "model.init_args.optim.lr"), 8.0e-6)
    assert not same(effective(cfg, "model.init_args.optim.lr"), 8.0e-5)
    assert not same(effective(cfg, "model.init_args.optim.betas"), [0.9, 0.999])
    assert not same(effective(cfg, "model.init_args.model.block"), "mean")
    assert effective(cfg, "derived.global_batch") == 256
    assert effective(cfg, "derived.callbacks") == {"ILAAlignDecay": {"start_epoch": 30}}
