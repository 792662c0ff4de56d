"""Typed settings groups, shared by the data module (:mod:`vidlang.data.config`) and the tasks
(:mod:`vidlang.tasks.config`).

A group is a frozen dataclass: one YAML mapping and one group of LightningCLI options (``--data.loader.batch_size
4``, ``--model.init_args.optim.lr 1e-4``). This module builds a group from what a caller or a YAML file gives
(:func:`as_group`), checks values (:func:`check_min`), refuses a plain value given where a group belongs
(:func:`check_parsed_groups`: jsonargparse lets it through) and, for configs written before the groups, knows where
each flat key went (:class:`MovedKeys`): the one-line hint of a parse error, and the mapping of the flat
hyper-parameters of older checkpoints into their groups.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from vidlang.errors import ConfigError

C = TypeVar("C")


def check_min(where: str, low: float, **values: float | None) -> None:
    """``ConfigError`` naming ``{where}.{key}`` for the first value below ``low`` (None = not set, allowed)."""
    for key, value in values.items():
        if value is not None and value < low:
            raise ConfigError(f"{where}.{key} must be >= {low}, got {value}")


@dataclass(frozen=True)
class MovedKeys:
    """The flat keys of a config section before its groups -> where each lives now.

    Args:
        section: the option prefix of the section, e.g. ``data`` or ``model.init_args``.
        label: how the hint names the section's settings (``"data settings"``).
        moved: flat key -> its place now, relative to the section (``"num_frames": "sampling.num_frames"``).
        also: more patterns that name an old key in a parse error (``KEY`` stands for the key), looked for only in
            messages that match ``context``.
        context: a pattern a message must match for ``also`` to apply.
    """

    section: str
    label: str
    moved: Mapping[str, str]
    also: tuple[str, ...] = ()
    context: str = ""

    def named_in(self, message: str) -> list[str]:
        """The old keys ``message`` names (``{section}.{key}``, or one of the ``also`` patterns)."""
        patterns = [rf"(?<![\w.]){re.escape(self.section)}\.KEY(?![\w.])"]
        if self.also and re.search(self.context, message):
            patterns += list(self.also)
        return [k for k in self.moved if any(re.search(p.replace("KEY", re.escape(k)), message) for p in patterns)]

    def hint(self, message: str) -> str:
        """For an error message that names old flat keys: where they are now (``" (... are grouped: ...)"``),
        else ``""``."""
        old = self.named_in(message)
        if not old:
            return ""
        s = self.section
        return f" ({self.label} are grouped: " + ", ".join(f"{s}.{k} is now {s}.{self.moved[k]}" for k in old) + ")"

    def upgrade(self, flat: Mapping[str, Any]) -> dict[str, Any]:
        """``flat`` (e.g. an older checkpoint's hyper-parameters) with its moved keys put into their groups; a group
        already given as a mapping keeps its values (a flat key fills a field it lacks). Other keys are kept."""
        out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in flat.items() if self._stays(k, v)}
        for key, value in flat.items():
            if not self._stays(key, value):
                group, field = self.moved[key].split(".", 1)
                if not isinstance(out.get(group), dict):
                    out[group] = {}
                out[group].setdefault(field, value)
        return out

    def _stays(self, key: str, value: Any) -> bool:
        """Not a moved key, or the group itself given as a mapping (``m2clip: {...}`` where ``m2clip`` was a flag)."""
        return key not in self.moved or isinstance(value, Mapping) and self.moved[key].split(".", 1)[0] == key


def as_group(cls: type[C], value: C | Mapping[str, Any] | None, where: str, default: C | None = None,
             moved: MovedKeys | None = None) -> C:
    """``value`` as a ``cls`` group: an instance as is; a mapping of its fields over ``default`` (the class defaults
    when None), e.g. loaded from YAML; None for ``default``. Anything else, or an unknown key, raises
    :class:`ConfigError` naming ``where`` (with ``moved``'s hint when ``where`` was a flat key before)."""
    if value is None:
        return default if default is not None else cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        hint = moved.hint(where) if moved is not None else ""
        raise ConfigError(f"{where} must be a {cls.__name__} or a mapping of its fields, got {value!r}{hint}")
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; it takes {', '.join(names)}")
    return dataclasses.replace(default, **value) if default is not None else cls(**value)


def check_parsed_groups(section: Any, groups: Mapping[str, type], where: str, moved: MovedKeys | None = None) -> None:
    """Raise :class:`ConfigError` for a group given as a plain value in a parsed config section (e.g. the old
    ``data.streaming: true``): jsonargparse lets it through, and instantiation would fail with a bare TypeError."""
    from jsonargparse import Namespace

    for group, cls in groups.items():
        value = section.get(group) if section is not None else None
        if not isinstance(value, Namespace):
            as_group(cls, value, f"{where}.{group}", moved=moved)  # None and mappings pass; else the one-line error
