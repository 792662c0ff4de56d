"""``vidlang bench gpu`` and ``tools/gpu_check.sh`` without a GPU: the benchmark's code runs on the CPU (tiny
settings) and writes its JSON, so that the one GPU run a session may get does not fail on a bug found only there;
the script stops at once, with its reason, where there is no CUDA machine."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="the real-shaped clips need the ffmpeg CLI")
def test_bench_gpu_runs_on_the_cpu_and_writes_json(tmp_path, capsys):
    from vidlang.cli import main

    argv = ["bench", "gpu", "--device", "cpu", "--arch", "vit_tiny", "--batch", "1", "--frames", "2", "--rounds", "1",
            "--steps", "1", "--clip-seconds", "1", "--json", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    data = json.loads((tmp_path / "gpu_bench.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert data["device"] == "cpu" and data["decode_clips_per_s"]["vidlang torchcodec cpu"] > 0
    tower = data["tower_bf16"]
    assert tower["arch"] == "vit_tiny" and tower["parity"]["fp32"] <= 1e-5 and tower["parity"]["bf16_vidlang"] <= 5e-2
    assert tower["fwd_ms"]["vidlang"] > 0 and tower["fwd_bwd_ms"]["transformers"] > 0
    step = data["train_step"]
    assert step["clips_per_s"] > 0 and 0 < step["data_wait_share"] < 1 and step["peak_cuda_mb"] is None
    assert "ratio" in printed and "peak CUDA memory" not in printed


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a CUDA machine: the script would run for real")
def test_gpu_check_stops_without_a_cuda_machine(tmp_path):
    out = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), str(tmp_path / "out")], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2 and "nvidia-smi not found" in out.stderr
    assert (tmp_path / "out").is_dir() and not (tmp_path / "out" / "setup.log").exists()  # nothing installed
