"""User errors print one line and exit 2 (issue 12, item 9); ``--debug`` / ``VIDLANG_DEBUG=1`` show the traceback.

Each bad invocation goes through ``vidlang.cli.main`` in-process (fast); a few also through ``python -m vidlang.cli``.
Unsafe checkpoints carry a payload that would create a marker file: it must never run.
"""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vidlang.cli import main
from vidlang.serve.testing import synthetic_videos, tiny_recognition_checkpoint, tiny_retrieval_checkpoint

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo" / "tiny_retrieval.yaml"
RECOGNITION_CONFIG = REPO / "configs" / "recognition" / "synthetic.yaml"
MARKER_NAME = "PAYLOAD_RAN"
RETRIEVAL_TASK = "vidlang.tasks.retrieval.RetrievalTask"


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _UserClass:  # an ordinary class a careless script might pickle into a checkpoint
    def __init__(self) -> None:
        self.value = 1


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("cli_errors")
    marker = base / MARKER_NAME
    f: dict[str, Path] = {"base": base, "marker": marker}
    f["retrieval"] = tiny_retrieval_checkpoint(base / "ret")
    f["recognition"] = tiny_recognition_checkpoint(base / "rec")
    f["videos"] = synthetic_videos(base / "corpus", 4)
    f["video"] = sorted(f["videos"].rglob("*.mp4"))[0]
    f["manifest"] = base / "corpus" / "manifest.csv"
    ok = torch.load(f["retrieval"], map_location="cpu", weights_only=True)
    f["frames_yaml"] = base / "frames.yaml"  # a model section that sets a frame count (linked from the data)
    f["frames_yaml"].write_text("model:\n  init_args:\n    model:\n      eval_num_frames: 16\n")
    f["cli_retrieval"] = base / "cli_retrieval.ckpt"  # what `vidlang fit` adds to the hyper-parameters
    torch.save({**ok, "hyper_parameters": {**ok["hyper_parameters"], "_class_path": RETRIEVAL_TASK,
                                           "_instantiator": "pytorch_lightning.cli.instantiate_module"}},
               f["cli_retrieval"])
    # unsafe files: each needs arbitrary code (a global outside torch's weights-only allowlist) to load
    f["evil_zip"] = base / "evil_zip.ckpt"
    torch.save({**ok, "extra": _Payload(marker)}, f["evil_zip"])
    f["evil_legacy"] = base / "evil_legacy.ckpt"
    torch.save({**ok, "extra": _Payload(marker)}, f["evil_legacy"], _use_new_zipfile_serialization=False)
    f["evil_pickle"] = base / "evil_pickle.ckpt"
    f["evil_pickle"].write_bytes(pickle.dumps({"state_dict": {}, "x": _Payload(marker)}, protocol=4))
    f["evil_namespace"] = base / "namespace.ckpt"  # old Lightning style: hparams as an argparse.Namespace
    torch.save({**ok, "hyper_parameters": argparse.Namespace(lr=1.0)}, f["evil_namespace"])
    f["evil_class"] = base / "user_class.ckpt"
    torch.save({**ok, "extra": _UserClass()}, f["evil_class"])
    # files that are not (vidlang) checkpoints
    f["text"] = base / "notes.ckpt"
    f["text"].write_text("hello, this is not a checkpoint\n")
    f["empty"] = base / "empty.ckpt"
    f["empty"].write_bytes(b"")
    f["truncated"] = base / "truncated.ckpt"
    data = f["retrieval"].read_bytes()
    f["truncated"].write_bytes(data[: len(data) // 2])
    f["plain_state"] = base / "plain_state.pt"  # a bare state dict (not a Lightning checkpoint)
    torch.save({"weight": torch.zeros(2)}, f["plain_state"])
    f["foreign"] = base / "foreign.ckpt"  # a Lightning checkpoint of some other model
    torch.save({"state_dict": {"net.weight": torch.zeros(2)}, "hyper_parameters": {"hidden": 3}}, f["foreign"])
    f["chat"] = base / "chat.ckpt"  # the shape of a ChatEncoderTask checkpoint (kind detection only)
    torch.save({"state_dict": {"encoder.proj.weight": torch.zeros(2)}, "hyper_parameters": {"llm": "x"}}, f["chat"])
    f["data_yaml"] = base / "data.yaml"
    f["data_yaml"].write_text(
        "data:\n"
        f"  train: {{format: manifest, path: {f['manifest']}, split: train}}\n"
        f"  val: {{format: manifest, path: {f['manifest']}, split: train}}\n"
        f"  test: {{format: manifest, path: {f['manifest']}, split: train}}\n"
        "  sampling: {num_frames: 4}\n  transform: {image_size: 32}\n  loader: {batch_size: 2, num_workers: 0}\n"
        "trainer:\n  max_epochs: 1\n  enable_model_summary: false\n"
        f"  default_root_dir: {base / 'runs'}\n"
        "model:\n  init_args:\n"
        f"    tokenizer: {base / 'ret' / 'tokenizer'}\n"
        "    model: {image: vit_tiny, block_args: {layers: 1}}\n"
    )
    return f


def lightning(sub: str, f: dict[str, Path], *extra: str) -> list[str]:
    return [sub, "--config", str(DEMO_CONFIG), "--config", str(f["data_yaml"]), *extra]


def yaml_file(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# (id, argv from the fixture files, substrings the one error line must contain)
CASES = [
    ("missing-ckpt-search", lambda f: ["search", "--ckpt", str(f["base"] / "nope.ckpt"), "--videos",
                                       str(f["videos"]), "red"], ["nope.ckpt", "not found"]),
    ("unsafe-zip-search", lambda f: ["search", "--ckpt", str(f["evil_zip"]), "--videos", str(f["videos"]), "red"],
     ["evil_zip.ckpt", "arbitrary code", "refused"]),
    ("unsafe-legacy-search", lambda f: ["search", "--ckpt", str(f["evil_legacy"]), "--videos", str(f["videos"]),
                                        "x"], ["evil_legacy.ckpt", "arbitrary code", "refused"]),
    ("unsafe-pickle-serve", lambda f: ["serve", "--ckpt", str(f["evil_pickle"]), "--port", "0"],
     ["evil_pickle.ckpt", "arbitrary code", "refused"]),
    ("unsafe-namespace-classify", lambda f: ["classify", "--ckpt", str(f["evil_namespace"]), str(f["video"])],
     ["namespace.ckpt", "arbitrary code", "argparse.Namespace"]),
    ("unsafe-class-classify", lambda f: ["classify", "--ckpt", str(f["evil_class"]), str(f["video"]), "--labels",
                                         "a,b"], ["user_class.ckpt", "arbitrary code", "refused"]),
    ("unsafe-test", lambda f: lightning("test", f, "--ckpt_path", str(f["evil_zip"])),
     ["evil_zip.ckpt", "arbitrary code", "refused"]),
    ("missing-ckpt-fit", lambda f: lightning("fit", f, "--ckpt_path", str(f["base"] / "gone.ckpt")),
     ["gone.ckpt", "not found"]),
    ("text-file", lambda f: ["search", "--ckpt", str(f["text"]), "--videos", str(f["videos"]), "x"],
     ["notes.ckpt", "not a"]),
    ("empty-file", lambda f: ["serve", "--ckpt", str(f["empty"])], ["empty.ckpt", "empty"]),
    ("truncated", lambda f: ["search", "--ckpt", str(f["truncated"]), "--videos", str(f["videos"]), "x"],
     ["truncated.ckpt", "truncated or corrupt"]),
    ("plain-state-dict", lambda f: ["search", "--ckpt", str(f["plain_state"]), "--videos", str(f["videos"]), "x"],
     ["plain_state.pt", "not a Lightning checkpoint"]),
    ("foreign-lightning", lambda f: ["classify", "--ckpt", str(f["foreign"]), str(f["video"]), "--labels", "a,b"],
     ["foreign.ckpt", "not a vidlang checkpoint"]),
    ("recognition-to-search", lambda f: ["search", "--ckpt", str(f["recognition"]), "--videos", str(f["videos"]),
                                         "x"], ["tiny_recognition.ckpt", "RecognitionTask", "retrieval"]),
    ("recognition-to-serve", lambda f: ["serve", "--ckpt", str(f["recognition"]), "--port", "0"],
     ["tiny_recognition.ckpt", "RecognitionTask"]),
    ("chat-to-search", lambda f: ["search", "--ckpt", str(f["chat"]), "--videos", str(f["videos"]), "x"],
     ["chat.ckpt", "ChatEncoderTask"]),
    ("chat-to-classify", lambda f: ["classify", "--ckpt", str(f["chat"]), str(f["video"]), "--labels", "a,b"],
     ["chat.ckpt", "ChatEncoderTask"]),
    ("retrieval-classify-no-labels", lambda f: ["classify", "--ckpt", str(f["retrieval"]), str(f["video"])],
     ["tiny.ckpt", "--labels"]),
    ("cli-retrieval-classify-no-labels", lambda f: ["classify", "--ckpt", str(f["cli_retrieval"]), str(f["video"])],
     ["cli_retrieval.ckpt", "--labels"]),
    ("recognition-ckpt-retrieval-config", lambda f: lightning("test", f, "--ckpt_path", str(f["recognition"])),
     ["tiny_recognition.ckpt", "RecognitionTask", "RetrievalTask"]),
    ("negative-batch-size", lambda f: lightning("fit", f, "--data.loader.batch_size", "-1"),
     ["batch_size", "-1"]),
    ("zero-frames", lambda f: lightning("fit", f, "--data.sampling.num_frames", "0"),
     ["num_frames", "0"]),
    ("model-frames-set", lambda f: lightning("validate", f, "--model.init_args.model.num_frames", "0"),
     ["model.init_args.model.num_frames", "follows data.sampling.num_frames"]),
    ("model-frames-in-yaml", lambda f: lightning("validate", f, "--config", str(f["frames_yaml"])),
     ["model.init_args.model.eval_num_frames", "data.sampling.eval_num_frames"]),
    ("typo-in-data-group", lambda f: lightning("fit", f, "--data.loader.batch_sise", "4"), ["batch_sise"]),
    ("typo-in-data-group-yaml", lambda f: lightning("fit", f, "--config", yaml_file(
        f["base"] / "typo.yaml", "data:\n  sampling: {num_frame: 4}\n")), ["num_frame"]),
    ("flat-data-key", lambda f: lightning("fit", f, "--data.num_frames", "4"),
     ["data.num_frames", "data.sampling.num_frames"]),
    ("flat-data-key-yaml", lambda f: lightning("fit", f, "--config", yaml_file(
        f["base"] / "flat.yaml", "data:\n  bad_sample_dir: runs/bad\n")),
     ["data.bad_sample_dir", "data.bad_samples.report_dir"]),
    ("data-group-as-a-value", lambda f: lightning("fit", f, "--config", yaml_file(
        f["base"] / "streaming.yaml", "data:\n  streaming: true\n")),
     ["data.streaming", "StreamingConfig", "data.streaming.enabled"]),
    ("flat-task-key", lambda f: lightning("fit", f, "--model.init_args.lr", "1e-3"),
     ["model.init_args.lr", "model.init_args.optim.lr"]),
    ("flat-task-key-yaml", lambda f: lightning("fit", f, "--config", yaml_file(
        f["base"] / "flat_task.yaml", "model:\n  init_args:\n    write_plots: false\n")),
     ["model.init_args.write_plots", "model.init_args.evaluation.write_plots"]),
    ("task-group-as-a-value", lambda f: ["fit", "--config", str(RECOGNITION_CONFIG), "--config", str(f["data_yaml"]),
                                         "--config", yaml_file(f["base"] / "m2clip.yaml",
                                                               "model:\n  init_args:\n    m2clip: true\n")],
     ["model.init_args.m2clip", "M2ClipConfig", "model.init_args.m2clip.enabled"]),
    ("typo-in-task-group", lambda f: lightning("fit", f, "--model.init_args.optim.lrr", "1"), ["lrr"]),
    ("non-int-batch-size", lambda f: lightning("fit", f, "--data.loader.batch_size", "abc"),
     ["data.loader.batch_size", "abc"]),
    ("missing-config", lambda f: ["fit", "--config", str(f["base"] / "nope.yaml")], ["nope.yaml"]),
    ("unknown-block", lambda f: lightning("validate", f, "--model.init_args.model.block", "no_such_block"),
     ["no_such_block", "temporal block"]),
    ("unknown-format", lambda f: lightning("validate", f, "--data.val.format", "no_such_format"),
     ["no_such_format"]),
    ("bad-block-arg", lambda f: lightning("validate", f, "--model.init_args.model.block_args", "{layer: 2}"),
     ["seq_transformer", "layer", "layers"]),
    ("demo-zero-batch", lambda f: ["demo", "--batch-size", "0", "--corpus", str(f["base"] / "demo_corpus"),
                                  "--videos", "20", "--workers", "0"],
     ["batch", "0"]),
    ("demo-zero-frames", lambda f: ["demo", "--num-frames", "0", "--corpus", str(f["base"] / "demo_corpus"),
                                  "--videos", "20", "--workers", "0"],
     ["num", "frames", "0"]),
    ("demo-zero-epochs", lambda f: ["demo", "--epochs", "0", "--corpus", str(f["base"] / "demo_corpus"),
                                  "--videos", "20", "--workers", "0"],
     ["epochs", "0"]),
    ("demo-too-few-videos", lambda f: ["demo", "--videos", "8", "--corpus", str(f["base"] / "demo_corpus")],
     ["--videos", "8"]),
    ("synth-zero-videos", lambda f: ["synth", "--out", str(f["base"] / "synth"), "--videos", "0"],
     ["--videos", "0"]),
    ("missing-tokenizer-dir", lambda f: lightning("validate", f, "--model.init_args.tokenizer",
                                                  str(f["base"] / "no_tokenizer")), ["no_tokenizer", "tokenizer"]),
    ("search-topk-zero", lambda f: ["search", "--ckpt", str(f["retrieval"]), "--videos", str(f["videos"]),
                                    "--topk", "0", "x"], ["--topk", "0"]),
    ("classify-missing-labels-value", lambda f: ["classify", "--ckpt", str(f["retrieval"]), str(f["video"]),
                                                 "--labels", "a,,b"], ["--labels", "empty"]),
    ("unknown-command", lambda f: ["no-such-command"], ["no-such-command"]),
]


def run_in_process(argv: list[str], capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse / jsonargparse exits are part of what is being tested
        code = exit_.code
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize(("argv", "expect"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_error_is_one_line_exit_2(files, capsys, monkeypatch, argv, expect):
    monkeypatch.delenv("VIDLANG_DEBUG", raising=False)
    monkeypatch.chdir(files["base"])
    code, lines = run_in_process(argv(files), capsys)
    assert code == 2, lines
    assert len(lines) == 1, "\n".join(lines)
    line = lines[0]
    assert "Traceback" not in line
    assert "weights_only=False" not in line and "weights_only` set to `False" not in line
    for part in expect:
        assert part in line, line
    assert not files["marker"].exists(), "an unsafe checkpoint ran its payload"


def test_debug_flag_and_env_show_the_traceback(files, capsys, monkeypatch):
    argv = ["search", "--ckpt", str(files["evil_zip"]), "--videos", str(files["videos"]), "x"]
    monkeypatch.delenv("VIDLANG_DEBUG", raising=False)
    code, lines = run_in_process(["--debug", *argv], capsys)
    assert code == 2 and lines[0].startswith("Traceback") and "UnsafeCheckpointError" in "\n".join(lines)
    assert "arbitrary code" in lines[-1]
    monkeypatch.setenv("VIDLANG_DEBUG", "1")
    code, lines = run_in_process(argv, capsys)
    assert code == 2 and any(line.startswith("Traceback") for line in lines)
    assert not files["marker"].exists()


def test_internal_errors_keep_their_traceback(files, monkeypatch):
    # a genuine bug (not a user error) must not be hidden behind a one-liner
    import vidlang.serve.inference as inference

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(inference, "load_bundle", broken)
    with pytest.raises(ZeroDivisionError):
        main(["search", "--ckpt", str(files["retrieval"]), "--videos", str(files["videos"]), "x"])


def run_subprocess(argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "VIDLANG_DEBUG"}
    environ.update(PYTHONPATH=str(REPO), PYTHONWARNINGS="default", **env)
    return subprocess.run([sys.executable, "-m", "vidlang.cli", *argv], capture_output=True, text=True, cwd=cwd,
                          env=environ, timeout=300)


@pytest.mark.parametrize("case", ["unsafe-pickle-serve", "unsafe-test"])
def test_user_error_subprocess(files, case):
    argv, expect = next(c[1:] for c in CASES if c[0] == case)
    proc = run_subprocess(argv(files), files["base"])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert all(part in lines[0] for part in expect), lines[0]
    assert not files["marker"].exists()


def test_debug_env_subprocess_shows_traceback(files):
    argv = ["search", "--ckpt", str(files["evil_legacy"]), "--videos", str(files["videos"]), "x"]
    proc = run_subprocess(argv, files["base"], VIDLANG_DEBUG="1")
    assert proc.returncode == 2 and "Traceback (most recent call last)" in proc.stderr
    assert "arbitrary code" in proc.stderr.strip().splitlines()[-1]
    assert not files["marker"].exists()
