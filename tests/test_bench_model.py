"""``vidlang bench model``: a tiny run of the tower and block timings, printed and written with ``--json``."""

from __future__ import annotations

import json


def test_tiny_model_benchmark_json(tmp_path, capsys):
    import torch

    from vidlang.bench.model import FP32_TOL
    from vidlang.cli import main

    out = tmp_path / "model.json"
    # no --threads: bench model sets the process's thread count, and the tests share the process
    argv = ["bench", "model", "--arch", "vit_tiny", "--batch", "1", "--frames", "2", "--iters", "1", "--warmup", "0",
            "--block-arch", "vit_tiny", "--blocks", "ila", "--block-batch", "1", "--block-iters", "1",
            "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["benchmark"] == "model" and data["args"]["arch"] == "vit_tiny"
    assert data["threads"] == torch.get_num_threads()
    (tower,) = data["towers"]
    assert tower["arch"] == "vit_tiny" and tower["parity"]["fp32"] <= FP32_TOL
    for key in ("fwd", "fwd_bwd"):
        assert tower[key]["vidlang"] > 0 and tower[key]["transformers"] > 0
    assert set(data["blocks_over_mean"]) == {"ila"} and data["blocks_over_mean"]["ila"] > 0
    assert f"x{data['blocks_over_mean']['ila']:.2f} of mean" in printed
