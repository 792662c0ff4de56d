"""The import graph of ``vidlang/models``: no upward arrow (issue 13, item 3).

Tiers, bottom to top: the contract, and shared layers / configs (0, two groups); towers, temporal blocks
and the audio tower (1, each its own group); the models built from them (2). An import goes down a tier, or
stays inside its own group of the same tier: blocks never import towers (nor towers blocks), the contract
imports nothing of vidlang.models, and nothing in ``vidlang/models`` imports data, tasks, serving or commands.
Every ``import`` statement counts, also the ones inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "vidlang" / "models"

CONTRACT = "vidlang.models.contract"  # tier 0 on its own: imports nothing of vidlang.models
# tier 0: what both towers and blocks build on
BASE = {
    "vidlang.models.clip.layers",
    "vidlang.models.clip.configs",
    "vidlang.models.clip.pickle_scan",
    "vidlang.models.clip.tokenizer",
    "vidlang.models.qformer",
    "vidlang.models.optim",
    "vidlang.models.audio.frontend",
}
# tier 1: (group, module prefix)
MIDDLE = (("towers", "vidlang.models.clip."), ("blocks", "vidlang.models.temporal"), ("audio", "vidlang.models.audio."))
# vidlang modules outside vidlang.models that models may use (utilities, no upward arrow)
UTILITIES = {"vidlang.errors", "vidlang.registry", "vidlang.io", "vidlang.progress"}


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def tier(module: str) -> tuple[int, str]:
    """``(tier, group)`` of a module of vidlang.models."""
    if module == CONTRACT:
        return 0, "contract"
    if module in BASE:
        return 0, "base"
    for group, prefix in MIDDLE:
        if module.startswith(prefix) or module == prefix.rstrip("."):
            return 1, group
    return 2, "models"


def imports_of(path: Path) -> set[str]:
    """Every vidlang module ``path`` imports (absolute imports anywhere in the file)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            names = [node.module or ""]
            # "from vidlang.models.temporal import base" imports the submodule
            names += [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {n for n in names if n.startswith("vidlang") and _is_module(n)}
    return out


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(MODELS.rglob("*.py"))}


def violations(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, deps in edges.items():
        for dst in sorted(deps):
            if not dst.startswith("vidlang.models"):
                if dst not in UTILITIES:
                    bad.append(f"{src} -> {dst} (models import only vidlang.models and {sorted(UTILITIES)})")
                continue
            (ts, gs), (td, gd) = tier(src), tier(dst)
            if td > ts or (td == ts and gs != gd):
                bad.append(f"{src} [{ts}:{gs}] -> {dst} [{td}:{gd}]")
    return bad


def test_models_import_graph_has_no_upward_arrow():
    edges = graph()
    assert "vidlang.models.contract" in edges and "vidlang.models.temporal.stan" in edges
    assert not violations(edges), "\n".join(violations(edges))


def test_contract_imports_nothing_of_vidlang_models():
    assert {d for d in graph()["vidlang.models.contract"] if d.startswith("vidlang.models")} == set()


@pytest.mark.parametrize(
    "edge",
    [
        ("vidlang.models.clip.tower_base", "vidlang.models.temporal.base"),  # a tower importing the blocks
        ("vidlang.models.temporal.qformer", "vidlang.models.clip.convert"),  # a block importing a converter
        ("vidlang.models.contract", "vidlang.models.clip.layers"),  # the contract is the bottom
        ("vidlang.models.clip.image", "vidlang.models.video_clip"),  # a tower importing the model
        ("vidlang.models.factory", "vidlang.data.transforms"),  # models importing data
        ("vidlang.models.video_clip", "vidlang.tasks.base"),
    ],
)
def test_checker_flags_upward_arrows(edge):
    src, dst = edge
    edges = graph()
    assert dst not in edges[src]
    assert violations({**edges, src: edges[src] | {dst}}), edge
