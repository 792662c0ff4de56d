"""Progress outside a terminal: plain lines, no carriage returns (issue 12, item 11)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

REPO = Path(__file__).resolve().parents[1]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_interactive_follows_the_stream_and_the_override(monkeypatch):
    from vidlang.progress import interactive

    monkeypatch.delenv("VIDLANG_PROGRESS", raising=False)
    assert interactive(_Tty()) and not interactive(io.StringIO())
    monkeypatch.setenv("VIDLANG_PROGRESS", "lines")
    assert not interactive(_Tty())
    monkeypatch.setenv("VIDLANG_PROGRESS", "bars")
    assert interactive(io.StringIO())


def test_line_progress_prints_every_ten_percent(capsys, monkeypatch):
    from vidlang.progress import LineProgress, progress

    monkeypatch.setenv("VIDLANG_PROGRESS", "lines")
    bar = progress(total=50, desc="synth", unit="video")
    assert isinstance(bar, LineProgress)
    for _ in range(50):
        bar.update()
    bar.close()
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err
    assert [int(m) for m in re.findall(r"\((\d+)%", err)] == [10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert lines[0] == lines[0].strip() and lines[0].startswith("synth: 5/50 video (10%")
    assert lines[-1].startswith("synth: 50/50 video done in") and len(lines) == 10


def test_line_progress_wraps_iterables_and_can_be_disabled(capsys, monkeypatch):
    from vidlang.progress import progress

    monkeypatch.setenv("VIDLANG_PROGRESS", "lines")
    assert list(progress(range(4), desc="x")) == [0, 1, 2, 3]
    assert "x: 4/4 it done" in capsys.readouterr().err
    assert list(progress(range(3), desc="quiet", disable=True)) == [0, 1, 2]
    assert capsys.readouterr().err == ""


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = self.net(batch[0]).pow(2).mean()
        self.log("loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.net(batch[0]).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_line_progress_bar_one_line_per_epoch(tmp_path, capfd):
    from vidlang.cli.progress_bar import LineProgressBar

    data = DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=4)  # 4 batches per epoch
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[LineProgressBar(every=50, min_interval_s=0)])
    trainer.fit(_Tiny(), data, data)
    err = capfd.readouterr().err
    assert "\r" not in err
    for epoch in (1, 2, 3):
        assert re.search(rf"^epoch {epoch}/3: 4 batches in [\d.]+ s loss=", err, re.M), err
        assert re.search(rf"^epoch {epoch}/3: 50% \(2/4 batches", err, re.M), err
        assert re.search(rf"^validation \(epoch {epoch}/3\) in [\d.]+ s val/loss=", err, re.M), err
    assert "Sanity" not in err


def test_demo_log_file_has_no_carriage_returns(tmp_path):
    """`vidlang demo > log 2>&1` (not a TTY): progress is plain lines, one per epoch, no carriage return."""
    log = tmp_path / "demo.log"
    env = {k: v for k, v in os.environ.items() if k != "VIDLANG_PROGRESS"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    with open(log, "wb") as f:
        proc = subprocess.run([sys.executable, "-m", "vidlang.cli", "demo", "--corpus", str(tmp_path / "corpus"),
                               "--out", str(tmp_path / "run"), "--videos", "20", "--epochs", "2", "--batch-size", "8",
                               "--workers", "0"], stdout=f, stderr=subprocess.STDOUT, env=env, timeout=600)
    text = log.read_bytes()
    assert proc.returncode == 0, text.decode(errors="replace")[-3000:]
    assert text.count(b"\r") == 0
    lines = text.decode().splitlines()
    assert [ln.split(":")[0] for ln in lines if re.match(r"epoch \d+/2: \d+ batches in", ln)] == ["epoch 1/2",
                                                                                                  "epoch 2/2"]
    assert any(ln.startswith("synth: 20/20 video done in") for ln in lines)
    assert any(ln.startswith("test in ") and "test/t2v_R@1=" in ln for ln in lines)
    # the demo's own steps stay in order around the progress lines
    order = [next(i for i, ln in enumerate(lines) if ln.startswith(p)) for p in ("[1/4]", "[2/4]", "epoch 1/2",
                                                                               "[3/4]", "test in", "[4/4]")]
    assert order == sorted(order)


def test_cli_trainer_gets_the_line_bar_outside_a_tty(tmp_path, monkeypatch):
    from vidlang.cli.lightning import VidlangCLI
    from vidlang.cli.progress_bar import LineProgressBar

    monkeypatch.delenv("VIDLANG_PROGRESS", raising=False)
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  class_path: vidlang.tasks.retrieval.RetrievalTask\n  init_args:\n"
                      "    model: {image: vit_tiny, block: mean}\n"
                      "trainer:\n  accelerator: cpu\n  logger: false\n")
    cli = VidlangCLI(args=["--config", str(config)], run=False)
    bars = [c for c in cli.trainer.callbacks if isinstance(c, pl.callbacks.ProgressBar)]
    assert len(bars) == 1 and isinstance(bars[0], LineProgressBar)
    # a bar chosen in the config wins
    cli = VidlangCLI(args=["--config", str(config), "--trainer.callbacks+=TQDMProgressBar"], run=False)
    bars = [c for c in cli.trainer.callbacks if isinstance(c, pl.callbacks.ProgressBar)]
    assert len(bars) == 1 and type(bars[0]).__name__ == "TQDMProgressBar"
