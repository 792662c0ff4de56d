"""A tiny typed registry shared by every pluggable family (decoders, blocks, commands, ...)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

from vidlang.errors import ConfigError

T = TypeVar("T")


class UnknownNameError(KeyError, ConfigError):
    """A name that is not registered (names usually come from configs: a user error, reported on one line)."""


class Registry(Generic[T]):
    """Maps names to classes or factories; ``build`` instantiates by name.

    Example::

        BLOCKS: Registry[type[TemporalBlock]] = Registry("temporal block")

        @BLOCKS.register("mean")
        class MeanPool(TemporalBlock): ...
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            key = name or getattr(obj, "__name__", None)
            if not key:
                raise ValueError(f"cannot infer a {self.kind} name for {obj!r}")
            if key in self._items and self._items[key] is not obj:
                raise KeyError(f"{self.kind} {key!r} is already registered")
            self._items[key] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; registered: {known}") from None

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """``self.get(name)(*args, **kwargs)``; arguments the target does not take (usually a typo in a config's
        ``*_args``) raise :class:`ConfigError` naming them and what the target accepts."""
        target = self.get(name)
        try:
            return target(*args, **kwargs)  # type: ignore[operator]
        except TypeError:  # arguments that do not bind never reach the target: name them (else re-raise)
            check_arguments(target, f"{self.kind} {name!r}", args, kwargs)
            raise

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def check_arguments(target: Any, what: str, args: tuple = (), kwargs: dict[str, Any] | None = None) -> None:
    """Raise :class:`ConfigError` if ``target(*args, **kwargs)`` would fail to bind its arguments."""
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):  # builtins and the like: nothing to check
        return
    try:
        sig.bind(*args, **(kwargs or {}))
    except TypeError as e:
        accepted = [p.name for p in sig.parameters.values()
                    if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)][len(args):]
        raise ConfigError(f"{what}: {e}; it takes {', '.join(accepted) or 'no arguments'}") from None


def import_submodules(package: str, path: Iterable[str], skip: Iterable[str] = ()) -> list[str]:
    """Import every module of a package (by name order) so that its entries register; returns their names.

    Called at the end of a package's ``__init__`` as ``import_submodules(__name__, __path__)``: a new block,
    format or command is a new file in that folder, listed nowhere else. ``skip``: module names to leave out.
    """
    skipped = set(skip)
    names = sorted(info.name for info in pkgutil.iter_modules(list(path)) if info.name not in skipped)
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names
