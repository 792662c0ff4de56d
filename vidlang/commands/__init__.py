"""``vidlang`` subcommands.

Every module in this package registers one or more commands in :data:`COMMANDS`.
A command is a class with a ``help`` string, ``add_arguments(parser)`` and
``run(args) -> int`` (exit status). Modules must stay cheap to import: import
torch and friends inside ``run``. A command with ``passthrough = True`` receives
the raw argument list instead (used for the LightningCLI subcommands).
"""

from __future__ import annotations

import argparse
from typing import Protocol

from vidlang.registry import Registry, import_submodules


class Command(Protocol):
    help: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


COMMANDS: Registry[type] = Registry("command")


def load_all() -> Registry[type]:
    """Import every module of this package so that its commands register."""
    import_submodules(__name__, __path__)
    return COMMANDS
