"""``run_record.json`` (issue 15): every fit / validate / test of the CLI writes one beside its metrics, the metrics
JSON embeds the evaluation protocol, and ``vidlang compare`` names what differs between two runs and whether it can
move the metrics. Tiny runs on the synthetic corpus (a few seconds each)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from vidlang.cli import main
from vidlang.eval.protocols import get_protocol
from vidlang.eval.run_record import (
    RECORD_NAME,
    classify,
    diff_records,
    frame_indices_digest,
    keys_digest,
    load_record,
    sampler_fingerprint,
)

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo" / "tiny_retrieval.yaml"
FRAMES, SIZE, VIDEOS = 4, 32, 8


def write_data_yaml(path: Path, manifest: Path, tokenizer: Path, frames: int = FRAMES, eval_batch: int = 4) -> Path:
    path.write_text(
        "data:\n"
        + "".join(f"  {s}: {{format: manifest, path: {manifest}, split: {s}}}\n" for s in ("train", "val", "test"))
        + f"  sampling: {{num_frames: {frames}}}\n  transform: {{image_size: {SIZE}, crop_scale: [0.8, 1.0]}}\n"
        f"  loader: {{batch_size: 4, eval_batch_size: {eval_batch}, num_workers: 0, persistent_workers: false, "
        "pin_memory: false}\n"
        "trainer:\n  max_epochs: 1\n  enable_model_summary: false\n  log_every_n_steps: 1\n"
        f"model:\n  init_args:\n    tokenizer: {tokenizer}\n"
    )
    return path


def write_manifest(src: Path, out: Path, edit=None) -> Path:
    """The corpus manifest with every video in train, val and test (``edit(rows)`` may change the rows)."""
    with src.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["path"] = str((src.parent / r["path"]).resolve())
    if edit is not None:
        edit(rows)
    with out.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["key", "path", "split", "captions"], extrasaction="ignore")
        w.writeheader()
        for split in ("train", "val", "test"):
            w.writerows({**r, "split": split} for r in rows)
    return out


def lightning(sub: str, data_yaml: Path, root: Path, *extra: str) -> int:
    return main([sub, "--config", str(CONFIG), "--config", str(data_yaml), "--trainer.default_root_dir", str(root),
                 "--trainer.logger", "false", *extra])


def record_in(root: Path) -> dict:
    found = sorted(root.rglob(RECORD_NAME))
    assert len(found) == 1, found
    return json.loads(found[0].read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    from vidlang.data.synthetic import generate_corpus

    base = tmp_path_factory.mktemp("record")
    corpus = base / "corpus"
    generate_corpus(corpus, VIDEOS, seed=0, size=SIZE, frames=8, workers=1, progress=False)
    manifest = write_manifest(corpus / "manifest.csv", base / "all.csv")
    data = write_data_yaml(base / "data.yaml", manifest, corpus / "tokenizer")
    assert lightning("fit", data, base / "fit", "--seed_everything", "3") == 0
    ckpt = sorted((base / "fit").rglob("*.ckpt"))[0]
    test = ("--ckpt_path", str(ckpt), "--model.init_args.protocol", "msrvtt-1ka", "--seed_everything", "3")
    assert lightning("test", data, base / "test_a", *test) == 0
    assert lightning("test", data, base / "test_a2", *test) == 0  # the same run again, elsewhere

    # run B: 2 frames, another evaluation batch, one video corrupted and one missing
    bad_video = base / "corrupt.mp4"
    bad_video.write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")

    def damage(rows):
        rows[1]["path"] = str(bad_video)
        rows[2]["path"] = str(base / "gone.mp4")

    damaged = write_manifest(corpus / "manifest.csv", base / "damaged.csv", damage)
    data_b = write_data_yaml(base / "data_b.yaml", damaged, corpus / "tokenizer", frames=2, eval_batch=3)
    assert lightning("test", data_b, base / "test_b", *test, "--data.bad_samples.max_skip_rate", "0.5") == 0
    assert lightning("validate", data, base / "validate", "--ckpt_path", str(ckpt)) == 0
    return {"base": base, "ckpt": ckpt}


def test_fit_writes_the_record(runs):
    rec = record_in(runs["base"] / "fit")
    (path,) = sorted((runs["base"] / "fit").rglob(RECORD_NAME))
    assert (path.parent / "val_metrics.json").is_file()  # beside the metrics
    sw = rec["software"]
    for key in ("vidlang", "git_commit", "git_dirty", "python", "torch", "pytorch_lightning", "torchcodec",
                "ffmpeg_torchcodec", "ffmpeg_pyav", "cuda", "cudnn", "gpus"):
        assert key in sw, key
    import torch

    assert sw["torch"] == torch.__version__ and sw["git_commit"] and len(sw["git_commit"]) == 40
    assert isinstance(sw["git_dirty"], bool)
    run = rec["run"]
    assert run["command"] == "fit" and run["world_size"] == 1 and run["num_nodes"] == 1
    assert run["precision"] == "32-true" and run["seed"] == 3
    assert run["global_batch"] == {"train": 4, "eval": 4}
    assert rec["model"]["class"] == "vidlang.tasks.retrieval.RetrievalTask"
    assert rec["model"]["hparams"]["optim"]["lr"] == 1e-3 and len(rec["model"]["hparams_hash"]) == 16
    assert rec["protocol"] is None
    train, val = rec["data"]["train"], rec["data"]["val"]
    assert train["index"]["videos"] == VIDEOS and train["index"]["entries"] == VIDEOS
    assert train["index"]["hash"] == val["index"]["hash"]  # the same videos and captions in both splits
    assert train["missing"] == {"count": 0, "hash": None, "examples": []} and train["bad"]["count"] == 0
    assert "SegmentSampler(num_frames=4" in train["sampler"]["repr"]
    assert train["sampler"]["hash"] != val["sampler"]["hash"]  # random offsets in training, centres in evaluation
    assert val["evaluated_videos"] == VIDEOS and val["frame_indices"]["videos"] == VIDEOS
    assert rec["data"]["settings"]["sampling"]["num_frames"] == FRAMES
    history = (path.parent / "run_record_history.jsonl").read_text().splitlines()
    assert len(history) == 1 and json.loads(history[0])["run"]["command"] == "fit"


def test_test_and_validate_write_the_record_with_the_protocol(runs):
    p = get_protocol("msrvtt-1ka")
    rec = record_in(runs["base"] / "test_a")
    assert rec["run"]["command"] == "test" and rec["run"]["checkpoint"] == str(runs["ckpt"])
    assert rec["run"]["global_batch"] == {"eval": 4}
    assert rec["protocol"]["name"] == "msrvtt-1ka" and rec["protocol"]["hash"] == p.hash
    assert "frames: 4 != 12" in rec["protocol"]["sampling_differences"]  # the data does not follow the protocol
    assert set(rec["data"]) == {"settings", "seed", "test"}
    assert rec["data"]["test"]["frame_indices"]["videos"] == VIDEOS
    (metrics_file,) = sorted((runs["base"] / "test_a").rglob("test_metrics.json"))
    assert metrics_file.parent == sorted((runs["base"] / "test_a").rglob(RECORD_NAME))[0].parent
    metrics = json.loads(metrics_file.read_text())
    assert metrics["protocol"] == "msrvtt-1ka" and metrics["protocol_hash"] == p.hash
    assert metrics["comparable"] is False and "8 videos, official 1000" in metrics["comparable_reason"]
    val = record_in(runs["base"] / "validate")
    assert val["run"]["command"] == "validate" and set(val["data"]) == {"settings", "seed", "val"}
    assert val["data"]["val"]["evaluated_videos"] == VIDEOS


def test_bad_and_missing_videos_are_counted(runs):
    rec = record_in(runs["base"] / "test_b")
    test = rec["data"]["test"]
    assert test["missing"]["count"] == 1 and test["missing"]["hash"] is not None
    assert test["bad"]["count"] == 2  # the missing one and the corrupt one were skipped in evaluation
    assert test["evaluated_videos"] == VIDEOS - 2 and test["frame_indices"]["videos"] == VIDEOS - 2
    assert set(test["missing"]["examples"]) < set(test["bad"]["examples"])


def test_compare_same_run_twice_is_comparable(runs, capsys):
    a, b = runs["base"] / "test_a", runs["base"] / "test_a2"
    (ra,), (rb,) = sorted(a.rglob(RECORD_NAME)), sorted(b.rglob(RECORD_NAME))
    diffs = diff_records(load_record(ra), load_record(rb))
    assert not [d for d in diffs if d["moves_metrics"]], diffs  # deterministic frames, same data, same weights
    assert main(["compare", str(ra.parent), str(rb)]) == 0
    out = capsys.readouterr().out
    assert "numbers are comparable" in out


def test_compare_names_the_differences_that_move_metrics(runs, capsys):
    (ra,), (rb,) = sorted((runs["base"] / "test_a").rglob(RECORD_NAME)), sorted(
        (runs["base"] / "test_b").rglob(RECORD_NAME))
    diffs = {d["key"]: d for d in diff_records(load_record(ra), load_record(rb))}
    moving = {k for k, d in diffs.items() if d["moves_metrics"]}
    for key in ("data.settings.sampling.num_frames", "data.test.frame_indices.hash", "data.test.bad.count",
                "data.test.missing.count", "data.test.evaluated_videos",
                "data.test.sampler.hash", "protocol.sampling_differences"):
        assert key in moving, key
    for key in ("data.settings.loader.eval_batch_size", "run.global_batch.eval", "created", "data.test.description"):
        assert key in diffs and not diffs[key]["moves_metrics"], key
    assert "data.test.index.hash" not in diffs  # the same keys and captions: the index hash ignores where files are
    assert diffs["data.settings.sampling.num_frames"]["a"] == 4 and diffs["data.settings.sampling.num_frames"]["b"] == 2
    assert main(["compare", str(ra), str(rb)]) == 1
    out = capsys.readouterr().out
    assert "can move the metrics" in out and "data.settings.sampling.num_frames: A 4 | B 2" in out
    assert "NOT comparable" in out
    assert main(["compare", str(ra), str(rb), "--json"]) == 1
    listed = json.loads(capsys.readouterr().out)
    assert {d["key"] for d in listed} == set(diffs)


def test_compare_missing_record_is_a_one_line_error(tmp_path, capsys):
    assert main(["compare", str(tmp_path), str(tmp_path)]) == 2
    assert "no run_record.json there" in capsys.readouterr().err


# ---------------------------------------------------------------- units


def test_classify_rules():
    assert classify("software.torch") == (True, "library versions (decoding, kernels) can change frames and numerics")
    assert classify("software.python")[0] is False
    assert classify("data.settings.loader.num_workers")[0] is False
    assert classify("data.settings.loader.batch_size")[0] is True
    assert classify("data.val.description")[0] is False
    assert classify("data.val.missing.count")[0] is True
    assert classify("run.global_batch.train")[0] is True
    assert classify("model.hparams.write_plots")[0] is False
    assert classify("something.new") == (True, "not a known field: assume it matters")


def test_diff_records_orders_moving_first_and_treats_absent_as_none():
    a = {"created": "x", "run": {"seed": 1}, "data": {"val": {"index": {"hash": "1"}}}}
    b = {"created": "y", "run": {"seed": 1}, "data": {"val": {"index": {"hash": "2"}, "bad": {"count": 1}}}}
    diffs = diff_records(a, b)
    assert [d["key"] for d in diffs] == ["data.val.bad.count", "data.val.index.hash", "created"]
    assert diffs[0]["a"] is None and diffs[0]["b"] == 1
    assert diff_records(a, a) == []


def test_digests_are_order_free_and_sensitive():
    assert keys_digest(["b", "a", "a"]) == keys_digest(["a", "b"])
    assert keys_digest(["a", "b"])["count"] == 2 and keys_digest([])["hash"] is None
    assert keys_digest(["a"])["hash"] != keys_digest(["b"])["hash"]
    one = frame_indices_digest([("v1", [[0, 4]]), ("v2", [[1, 5]])])
    assert one == frame_indices_digest([("v2", [[1, 5]]), ("v1", [[0, 4]])])
    assert one["hash"] != frame_indices_digest([("v1", [[0, 4]]), ("v2", [[1, 6]])])["hash"]


def test_sampler_fingerprint_tells_samplers_apart():
    from vidlang.data.config import SamplingConfig

    seg = SamplingConfig(num_frames=8, sampler="segment").build(False)
    uni = SamplingConfig(num_frames=8, sampler="fps", sampler_args={"fps": 1.0}).build(False)
    assert sampler_fingerprint(seg, False) == sampler_fingerprint(seg, False)
    assert sampler_fingerprint(seg, False)["hash"] != sampler_fingerprint(uni, False)["hash"]


def test_identical_records_are_reported_comparable():
    from vidlang.commands.compare import format_diff

    assert "numbers are comparable" in format_diff([], "a", "b")  # two runs written within one second agree fully
