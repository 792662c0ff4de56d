"""Plugin discovery: one helper imports every module of a plugin package (formats, blocks, commands, ...)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from vidlang.registry import Registry, import_submodules

ROOT = Path(__file__).resolve().parents[1]


def test_import_submodules_imports_every_module_and_skips(tmp_path, monkeypatch):
    pkg = tmp_path / "plugpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from tests_plug_registry import REG\n")
    for name in ("zeta", "alpha", "beta"):
        (pkg / f"{name}.py").write_text(f"from tests_plug_registry import REG\nREG.register({name!r})(object)\n")
    (pkg / "notes.txt").write_text("not a module\n")
    registry = Registry("plugin")
    module = type(sys)("tests_plug_registry")
    module.REG = registry
    monkeypatch.setitem(sys.modules, "tests_plug_registry", module)
    monkeypatch.syspath_prepend(str(tmp_path))
    import plugpkg

    try:
        assert import_submodules("plugpkg", plugpkg.__path__, skip=("beta",)) == ["alpha", "zeta"]
        assert registry.names() == ["alpha", "zeta"] and "plugpkg.beta" not in sys.modules
        assert import_submodules("plugpkg", plugpkg.__path__) == ["alpha", "beta", "zeta"]
        assert registry.names() == ["alpha", "beta", "zeta"]
    finally:
        for name in [m for m in sys.modules if m == "plugpkg" or m.startswith("plugpkg.")]:
            del sys.modules[name]


def _fresh(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_every_format_module_registers_without_side_effect_imports():
    """Importing the formats package (as the datamodule does) registers the wrapper formats of its protocols
    module: no other module has to import it for its side effect."""
    files = sorted(p.stem for p in (ROOT / "vidlang/data/formats").glob("*.py") if p.stem != "__init__")
    loaded = _fresh(
        "import sys\nfrom vidlang.data.formats import FORMATS\n"
        "print(','.join(sorted(m.rsplit('.', 1)[1] for m in sys.modules if m.startswith('vidlang.data.formats.'))))\n"
        "print(','.join(FORMATS.names()))")
    modules, formats = loaded.splitlines()
    assert modules.split(",") == files and "protocols" in files
    assert {"few_shot", "class_subset", "manifest", "kinetics", "webdataset"} <= set(formats.split(","))


def test_no_hand_written_discovery_loop_is_left():
    """Every plugin package discovers its modules through :func:`import_submodules` (one helper, not copies)."""
    users = []
    for path in sorted((ROOT / "vidlang").rglob("*.py")):
        text = path.read_text()
        assert "pkgutil" not in text or path.name == "registry.py", f"{path}: use vidlang.registry.import_submodules"
        if "import_submodules(__name__, __path__" in text:
            users.append(str(path.relative_to(ROOT / "vidlang").parent))
    assert {"data/formats", "models/temporal", "commands", "bench", "data/decoding"} <= set(users)

