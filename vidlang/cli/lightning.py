"""vidlang's LightningCLI: tasks chosen by ``class_path``, the resolved config kept with checkpoints.

Checkpoints given with ``--ckpt_path`` are read safely first (:func:`vidlang.checkpoints.read_checkpoint`: a
missing, unsafe or foreign file is a one-line error) and their task is detected, so the checkpoints of every
vidlang producer -- ``vidlang fit``, ``vidlang demo``, a plain ``pl.Trainer`` -- rebuild their model from their
own hyper-parameters (which take precedence over the config, as in Lightning). A checkpoint of another task
than the config's ``model.class_path`` is refused. Parse errors raise :class:`~vidlang.errors.ConfigError`
(one line) instead of printing the usage. Outside a terminal the progress bar prints lines (no ``\\r``).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from vidlang.errors import CheckpointError, ConfigError

LIGHTNING_CKPT_KEYWORDS = ("best", "last", "hpc", "registry")
EVAL_CHOICES = ("protocol",)  # task hyper-parameters the config sets over a --ckpt_path checkpoint's
FRAME_LINKS = (  # data -> model: one frame setting (ModelConfig carries it for inference)
    ("data.sampling.num_frames", "model.init_args.model.num_frames"),
    ("data.sampling.eval_num_frames", "model.init_args.model.eval_num_frames"),
)


class ConfigInCheckpoint(SaveConfigCallback):
    """Writes ``config.yaml`` to the log dir (Lightning's default) and embeds the same resolved
    YAML in every checkpoint under ``checkpoint["vidlang_config"]``."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint["vidlang_config"] = self.parser.dump(self.config, skip_none=False)


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _user_error_in(err: BaseException, depth: int = 10) -> BaseException | None:
    """The first user error (:func:`vidlang.cli.is_user_error`) in ``err``'s cause/context chain."""
    from vidlang.cli import is_user_error

    seen: BaseException | None = err
    for _ in range(depth):
        if seen is None:
            return None
        if is_user_error(seen):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def check_frames_not_set(args: Any) -> None:
    """Refuse a model frame count given on the command line or in a ``--config`` file: it follows
    ``data.sampling`` (:data:`FRAME_LINKS`), and a value set there would be silently replaced."""
    import yaml

    argv = [str(a) for a in args] if isinstance(args, (list, tuple)) else []
    for source, target in FRAME_LINKS:
        given = any(a == f"--{target}" or a.startswith(f"--{target}=") for a in argv)
        for i, a in enumerate(argv):
            path = argv[i + 1] if a == "--config" and i + 1 < len(argv) else a[len("--config="):]
            if (a == "--config" or a.startswith("--config=")) and os.path.isfile(path):
                try:
                    with open(path, encoding="utf-8") as fh:
                        doc = yaml.safe_load(fh) or {}
                except yaml.YAMLError:
                    continue  # jsonargparse reports the file's syntax error itself
                node: Any = doc
                for part in target.split("."):
                    node = node.get(part) if isinstance(node, dict) else None
                given = given or node is not None
        if given:
            raise ConfigError(f"{target} follows {source} (the number of frames is one setting): set {source} "
                              "instead")


def check_task_groups(model: Any) -> None:
    """Raise :class:`ConfigError` for a task group given as a plain value (e.g. the old ``m2clip: true``), which
    jsonargparse lets through (:func:`vidlang.config.check_parsed_groups`)."""
    from vidlang.config import check_parsed_groups
    from vidlang.tasks.base import VideoTask
    from vidlang.tasks.config import TASK_MOVED

    task_class = _import(str(model.get("class_path"))) if model is not None and hasattr(model, "get") else None
    if isinstance(task_class, type) and issubclass(task_class, VideoTask):
        groups = {name: type(default) for name, default in task_class.config_groups().items()}
        check_parsed_groups(model.get("init_args"), groups, "model.init_args", TASK_MOVED)


class VidlangCLI(LightningCLI):
    """``vidlang fit|validate|test|predict --config configs/...yaml``."""

    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        from vidlang.data.datamodule import VideoDataModule

        kwargs.setdefault("save_config_callback", ConfigInCheckpoint)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            model_class=pl.LightningModule,
            datamodule_class=VideoDataModule,
            subclass_mode_model=True,
            subclass_mode_data=False,
            args=args,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """The number of frames is one setting: the model's training / evaluation frame counts follow
        ``data.sampling`` (the model section of a config does not set them)."""
        for source, target in FRAME_LINKS:
            parser.link_arguments(source, target, apply_on="parse")

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("exit_on_error", False)  # parse errors raise; parse_arguments makes them one line
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        from jsonargparse import ArgumentError

        from vidlang.data.config import DATA_MOVED
        from vidlang.data.datamodule import check_parsed_groups
        from vidlang.models.factory import removed_key_hint
        from vidlang.tasks.config import TASK_MOVED

        check_frames_not_set(sys.argv[1:] if args is None else args)
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            hint = removed_key_hint(str(err))  # a key of older configs: name what replaced it
            moved = DATA_MOVED.hint(str(err)) + TASK_MOVED.hint(str(err))  # a flat key of before the groups
            raise ConfigError(f"{hint}. {err}{moved}" if hint else f"{err}{moved}") from err
        sub = self.config.get("subcommand")
        section = self.config[sub] if sub else self.config
        check_parsed_groups(section.get("data"))
        check_task_groups(section.get("model"))

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:  # jsonargparse wraps what a class raises: surface a user error inside
            user = _user_error_in(err)
            if user is None:
                raise
            raise user from None

    def _parse_ckpt_path(self) -> None:
        """Rebuild the model from the checkpoint's hyper-parameters (see the module docstring)."""
        from vidlang.checkpoints import TASK_CLASSES, checkpoint_task, read_checkpoint
        from vidlang.tasks.base import VideoTask

        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt_path or str(ckpt_path) in LIGHTNING_CKPT_KEYWORDS or str(ckpt_path).startswith("registry:"):
            return
        ckpt = read_checkpoint(ckpt_path)  # one-line errors: missing, unsafe, not a checkpoint
        hparams = dict(ckpt.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        for key in EVAL_CHOICES:  # how to evaluate is this run's choice, not the checkpoint's
            hparams.pop(key, None)
        class_path = hparams.pop("_class_path", None)  # written by LightningCLI; else a vidlang task's weights
        if class_path is None:
            class_path = TASK_CLASSES[checkpoint_task(ckpt, ckpt_path)]
        model = self.config[sub].get("model")
        wanted = model.get("class_path") if model is not None and hasattr(model, "get") else None
        if wanted and _import(wanted) is not _import(class_path):
            short = class_path.rsplit(".", 1)[-1]
            raise CheckpointError(f"{ckpt_path}: a {short} checkpoint, but the config's model is {wanted}; use "
                                  f"a {short} config (the checkpoint's hyper-parameters fill in its model)")
        if not hparams:
            return
        task_class = _import(class_path)
        if isinstance(task_class, type) and issubclass(task_class, VideoTask):
            # keys of older versions mapped (flat task keys into their groups, the ModelConfig's renames), keys the
            # task no longer takes dropped: the one place, VideoTask.hparams_from_checkpoint
            hparams = task_class.hparams_from_checkpoint(hparams)
        elif task_class is not None:  # as Lightning's load_from_checkpoint: keys the task no longer takes are dropped
            params = inspect.signature(task_class.__init__).parameters
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
                hparams = {k: v for k, v in hparams.items() if k in params}
        update = {sub: {"model": {"class_path": class_path, "dict_kwargs": hparams}}}
        try:
            self.config = self.parser.parse_object(update, self.config)
        except Exception as err:  # jsonargparse's ArgumentError (exit_on_error is off)
            raise CheckpointError(f"{ckpt_path}: its hyper-parameters do not fit {class_path}: {err}") from err

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> pl.Trainer:
        from pytorch_lightning.callbacks import ProgressBar

        from vidlang.cli.progress_bar import default_progress_bar

        given = list(callbacks) + list(config.get("callbacks") or [])
        bar = default_progress_bar()
        if bar is not None and config.get("enable_progress_bar", True) is not False and \
                not any(isinstance(c, ProgressBar) for c in given):  # fmt: skip
            callbacks = [*callbacks, bar]
        from vidlang.eval.run_record import RunRecordCallback

        if not any(isinstance(c, RunRecordCallback) for c in given):  # run_record.json beside the metrics
            callbacks = [*callbacks, RunRecordCallback()]
        return super()._instantiate_trainer(config, callbacks)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """The configured trainer, saving checkpoints atomically unless a checkpoint IO is configured."""
        from vidlang.io import with_atomic_checkpoint_io

        trainer_cfg = self._get(self.config_init, "trainer", default={})
        kwargs.setdefault("plugins", with_atomic_checkpoint_io(trainer_cfg.get("plugins"), trainer_cfg.get("strategy")))
        return super().instantiate_trainer(**kwargs)
