"""Which Python objects a pickle stream would import, read without unpickling anything.

Used to explain why a checkpoint was refused: a pickle that imports anything beyond tensor
rebuilding needs arbitrary code to load (``os.system``, an attacker's class, ``builtins.exec``...),
while one that imports nothing unusual but still fails is merely broken. The opcodes are walked
with :mod:`pickletools`; nothing is imported or called.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickletools
from collections.abc import Iterable

__all__ = ["PickleScan", "allowed_torch_globals", "scan_pickles"]

_STRING_OPS = {
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
    "UNICODE",
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_NO_PUSH_OPS = {"STOP", "FRAME", "PROTO", "MARK", "MEMOIZE"}


class PickleScan:
    """Result of :func:`scan_pickles`: ``imports`` (``"module.name"``, in order) and ``error`` (or ``None``)."""

    def __init__(self, imports: list[str], error: str | None, pickles: int) -> None:
        self.imports = imports
        self.error = error
        self.pickles = pickles  # complete pickle streams read

    def disallowed(self, allowed: Iterable[str], allowed_prefixes: tuple[str, ...] = ()) -> list[str]:
        """Imports not in ``allowed`` (and not starting with one of ``allowed_prefixes``), first occurrence order."""
        ok = set(allowed)
        out: list[str] = []
        for name in self.imports:
            if name not in ok and not name.startswith(allowed_prefixes) and name not in out:
                out.append(name)
        return out


def scan_pickles(data: bytes, max_pickles: int = 8) -> PickleScan:
    """Imports of up to ``max_pickles`` consecutive pickle streams in ``data`` (a legacy torch file holds several).

    ``STACK_GLOBAL`` (protocol 4+) takes module and name from the two strings pushed before it (memo
    included); when they cannot be traced it is reported as ``"<STACK_GLOBAL>"``.
    """
    stream = io.BytesIO(data)
    imports: list[str] = []
    done = 0
    while done < max_pickles and stream.tell() < len(data):
        strings: list[str | None] = []  # values pushed, strings only traced
        memo: dict[int, str | None] = {}
        try:
            for op, arg, _pos in pickletools.genops(stream):
                name = op.name
                if name in ("GLOBAL", "INST"):
                    imports.append(_py3_name(*str(arg).split(" ", 1)))
                elif name == "STACK_GLOBAL":
                    mod, attr = (strings[-2], strings[-1]) if len(strings) >= 2 else (None, None)
                    imports.append(f"{mod}.{attr}" if mod is not None and attr is not None else "<STACK_GLOBAL>")
                elif name in _STRING_OPS:
                    strings.append(arg if isinstance(arg, str) else None)
                elif name in _GET_OPS:
                    strings.append(memo.get(int(arg)))
                elif name in _PUT_OPS:
                    memo[int(arg)] = strings[-1] if strings else None
                elif name == "MEMOIZE":
                    memo[len(memo)] = strings[-1] if strings else None
                elif name not in _NO_PUSH_OPS:
                    strings.append(None)
        except Exception as e:  # a broken stream is a finding, not a crash
            return PickleScan(imports, f"{type(e).__name__}: {e}".splitlines()[0], done)
        done += 1
    return PickleScan(imports, None, done)


def _py3_name(module: str, name: str) -> str:
    """``module.name`` with protocol <= 2's Python-2 names (``__builtin__.set``) mapped to Python 3's, as
    :mod:`pickle` and torch's weights-only unpickler do on load."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    else:
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module}.{name}"


_BASE_ALLOWED = {
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "torch.Size",
    "torch.device",
}


def allowed_torch_globals() -> set[str]:
    """The names ``torch.load(weights_only=True)`` accepts (its allow-list, plus any registered safe globals)."""
    allowed = set(_BASE_ALLOWED)
    try:
        from torch import _weights_only_unpickler as wou

        allowed.update(str(k) for k in wou._get_allowed_globals())
    except Exception:  # private API; the base set stays
        pass
    try:
        from torch.serialization import get_safe_globals

        for obj in get_safe_globals():
            if isinstance(obj, tuple):  # (stand-in, "module.Name"): torch allows the pickle's name
                allowed.add(str(obj[1]))
            else:
                allowed.add(f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}")
    except Exception:
        pass
    return allowed
