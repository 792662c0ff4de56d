"""``vidlang bench train``: the loader's fetches are timed directly (data wait), apart from the loop's overhead."""

from __future__ import annotations

import time

from vidlang.bench.train import TimedLoader, measure


def test_timed_loader_times_each_fetch_and_yields_everything():
    class Slow:
        def __len__(self) -> int:
            return 3

        def __iter__(self):
            for i in range(3):
                time.sleep(0.02 * i)
                yield i

    timed = TimedLoader(Slow())
    assert len(timed) == 3 and list(timed) == [0, 1, 2]
    assert len(timed.waits) == 3 and timed.waits[2] >= 0.04 > timed.waits[0]


def test_a_tiny_run_reports_clips_per_second_and_the_shares(tmp_path):
    from vidlang.data.synthetic import generate_corpus

    generate_corpus(tmp_path, 24, seed=0, size=32, frames=8, workers=1, progress=False)
    r = measure("tiny", tmp_path, steps=3, warmup=1, batch=4, frames=4, workers=0)
    assert r["steps"] == 3 and r["clips_per_s"] > 0
    # no workers: every fetch decodes 4 clips in the training process, so the data wait is real and measured
    assert 0 < r["data_wait_share"] < 1 and 0 <= r["loop_share"] < 1


def test_threads_per_setting(monkeypatch):
    import vidlang.threads as T
    from vidlang.bench.train import SETTINGS, setting_threads

    monkeypatch.setattr(T, "cpu_cores", lambda: 8)
    assert setting_threads("tiny", workers=2) == 6  # data-bound: the cores the workers leave
    assert setting_threads("vit_b32", workers=2) == 8  # compute-bound: every core
    assert all(setting_threads(name, workers=2, threads=3) == 3 for name in SETTINGS)  # --threads wins


def test_json_has_every_setting_and_its_threads(tmp_path, monkeypatch, capsys):
    """``--json``: one row per setting, with the threads it ran with (``measure`` stubbed: no training here)."""
    import json

    import vidlang.bench.train as T
    from vidlang.cli import main

    def fake(name, corpus, steps, warmup, batch, frames, workers):
        return {"setting": name, "image": "x", "steps": steps, "clips_per_s": 1.0, "step_ms": 1.0,
                "data_wait_share": 0.01, "loop_share": 0.0, "peak_rss_mb": 1.0}  # fmt: skip

    monkeypatch.setattr(T, "measure", fake)
    (tmp_path / "manifest.csv").write_text("path,caption\n")  # an existing corpus: none is generated
    out = tmp_path / "train.json"
    assert main(["bench", "train", "--corpus", str(tmp_path), "--settings", "tiny,vit_b32", "--threads", "3",
                 "--steps", "2", "--json", str(out)]) == 0  # fmt: skip
    data = json.loads(out.read_text())
    assert [r["setting"] for r in data["rows"]] == ["tiny", "vit_b32"] and data["data_wait_target"] == 0.05
    assert all(r["threads"] == 3 and r["steps"] == 2 for r in data["rows"])
    assert data["args"]["settings"] == "tiny,vit_b32"
