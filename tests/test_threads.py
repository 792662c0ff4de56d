"""Torch threads beside decoding workers: the cores the workers leave, on every CPU run that has workers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.accelerators import CPUAccelerator

import vidlang.threads as T
from vidlang.threads import LoaderThreads, loader_workers, threads_beside


@pytest.fixture
def cores(monkeypatch):
    def set_cores(n: int) -> None:
        monkeypatch.setattr(T, "cpu_cores", lambda: n)

    for name in T.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    previous = torch.get_num_threads()
    yield set_cores
    torch.set_num_threads(previous)


def test_the_cores_the_workers_leave(cores):
    cores(16)
    assert threads_beside(4) == 12
    assert threads_beside(4, processes=2) == 4  # 8 cores per process
    assert threads_beside(0) == 16
    cores(2)
    assert threads_beside(2) == 1 and threads_beside(8) == 1  # never 0


def _trainer(workers: int | None, accelerator=None, devices: int = 1) -> SimpleNamespace:
    dm = SimpleNamespace(num_workers=workers) if workers is not None else None
    return SimpleNamespace(accelerator=accelerator or CPUAccelerator(), datamodule=dm, num_devices=devices)


def test_a_cpu_run_with_workers_takes_the_rest_and_gives_it_back(cores):
    cores(8)
    torch.set_num_threads(3)
    cb = LoaderThreads()
    cb.setup(_trainer(workers=2), None, "fit")
    assert torch.get_num_threads() == 6
    cb.setup(_trainer(workers=2), None, "validate")  # a second stage: the first count is what teardown restores
    cb.teardown(_trainer(workers=2), None, "fit")
    assert torch.get_num_threads() == 3


@pytest.mark.parametrize("case", ["user env", "no workers", "no data module", "accelerator not cpu"])
def test_left_alone(cores, monkeypatch, case):
    cores(8)
    torch.set_num_threads(3)
    trainer = _trainer(workers=2)
    if case == "user env":
        monkeypatch.setenv("OMP_NUM_THREADS", "5")
    elif case == "no workers":
        trainer = _trainer(workers=0)
    elif case == "no data module":
        trainer = _trainer(workers=None)
    else:
        trainer = _trainer(workers=2, accelerator=object())
    LoaderThreads().setup(trainer, None, "fit")
    assert torch.get_num_threads() == 3


def test_an_explicit_count_wins(cores, monkeypatch):
    cores(8)
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    LoaderThreads(threads=2).setup(_trainer(workers=0), None, "fit")
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="threads"):
        LoaderThreads(threads=0)


def test_workers_of_other_data_modules():
    assert loader_workers(SimpleNamespace(datamodule=SimpleNamespace(loader=SimpleNamespace(num_workers=3)))) == 3
    assert loader_workers(SimpleNamespace()) == 0


def test_the_demo_applies_it_and_fit_only_when_configured(fit_and_demo_trainers):
    fit, demo = fit_and_demo_trainers
    assert sum(isinstance(c, LoaderThreads) for c in demo.callbacks) == 1
    assert not any(isinstance(c, LoaderThreads) for c in fit.callbacks)  # compute-bound runs want every core


def test_a_fit_config_opts_in(make_fit_trainer):
    trainer = make_fit_trainer("--trainer.callbacks+=vidlang.threads.LoaderThreads")
    assert sum(isinstance(c, LoaderThreads) for c in trainer.callbacks) == 1
