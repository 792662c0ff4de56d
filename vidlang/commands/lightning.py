"""``vidlang fit | validate | test | predict``: LightningCLI over vidlang's tasks and data.

The task is chosen in the YAML (``model.class_path``: ``vidlang.tasks.RetrievalTask``, ...), the
data through ``data`` (a :class:`~vidlang.data.datamodule.VideoDataModule`). The resolved config
is written next to the logs and embedded in every checkpoint (``checkpoint["vidlang_config"]``).
"""

from __future__ import annotations

from collections.abc import Sequence

from vidlang.commands import COMMANDS

SUBCOMMANDS = ("fit", "validate", "test", "predict")


def run_lightning(argv: Sequence[str]) -> int:
    import sys

    from vidlang.cli.lightning import VidlangCLI

    saved = sys.argv
    sys.argv = ["vidlang", *argv]  # LightningCLI reads sys.argv (passing args too only warns); prog "vidlang fit"
    try:
        VidlangCLI()
    finally:
        sys.argv = saved
    return 0


def _make(sub: str) -> type:
    class _LightningCommand:
        help = f"LightningCLI {sub} (e.g. vidlang {sub} --config configs/retrieval/mean.yaml)"
        passthrough = True

        def run_argv(self, argv: Sequence[str]) -> int:
            return run_lightning([sub, *argv])

    _LightningCommand.__name__ = f"{sub.capitalize()}Command"
    return _LightningCommand


for _sub in SUBCOMMANDS:
    COMMANDS.register(_sub)(_make(_sub))
