"""The README's front door: ``vidlang demo`` end to end (real files, data module, Lightning, search)."""

from __future__ import annotations

import json

import pytest

from vidlang.cli import main
from vidlang.demo import DemoConfig, run_demo


def test_demo_end_to_end_fast(tmp_path, capsys):
    # A few real synthetic videos, a few training steps, evaluation, the table and a query: the CI-sized run.
    cfg = DemoConfig(corpus=str(tmp_path / "corpus"), out=str(tmp_path / "run"), videos=40, epochs=2, batch_size=8,
                     workers=0)  # fmt: skip
    result = run_demo(cfg)
    out = capsys.readouterr().out
    metrics = result["metrics"]
    assert metrics["num_videos"] >= 4 and metrics["num_texts"] == 5 * metrics["num_videos"]
    for key in ("t2v_R@1", "t2v_R@5", "v2t_R@10", "t2v_MdR"):
        assert key in metrics
    assert 0 <= metrics["t2v_R@1"] <= 100
    assert "text->video" in out and "video->text" in out and f'query: "{cfg.query}"' in out
    assert result["checkpoint"].is_file()
    assert (result["checkpoint"].parent / "test_metrics.json").is_file()
    assert (result["checkpoint"].parent / "test_recall_at_k.png").is_file()
    report = json.loads(result["report"].read_text())
    assert report["metrics"] == metrics and report["chance"]["t2v_R@1"] == pytest.approx(100 / metrics["num_videos"])
    # a second run reuses the corpus instead of regenerating it
    run_demo(DemoConfig(**{**cfg.__dict__, "epochs": 1, "out": str(tmp_path / "run2")}))
    assert "reusing" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_default_learns_well_above_chance(tmp_path):
    """The README's numbers: the default demo (512 videos, 30 epochs) must be far above chance."""
    assert main(["demo", "--corpus", str(tmp_path / "c"), "--out", str(tmp_path / "r")]) == 0
    report = json.loads((tmp_path / "r" / "demo_results.json").read_text())
    m, chance = report["metrics"], report["chance"]
    assert m["t2v_R@1"] > 8 * chance["t2v_R@1"] and m["v2t_R@1"] > 8 * chance["v2t_R@1"]
