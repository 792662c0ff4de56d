"""Every checkpoint vidlang writes works with every command that takes one (issue 12, item 10).

Producers: ``vidlang demo``, ``vidlang fit`` with the demo's retrieval config and with the synthetic
recognition config. Consumers: ``fit`` (resume), ``validate``, ``test`` (LightningCLI with ``--config ...
--ckpt_path``), ``search``, ``classify``, ``serve`` (the app built in-process on an ephemeral loopback port).
A recognition checkpoint is not a search / serve model: there the check is a one-line wrong-kind error.
All on the synthetic corpus with tiny models.
"""

from __future__ import annotations

import argparse
import http.client
import json
from pathlib import Path

import pytest
import torch

from vidlang.cli import main

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo" / "tiny_retrieval.yaml"
RECOGNITION_CONFIG = REPO / "configs" / "recognition" / "synthetic.yaml"
FRAMES, SIZE = 8, 32
PRODUCERS = ("demo", "fit_retrieval", "fit_recognition")
CONFIG_OF = {"demo": DEMO_CONFIG, "fit_retrieval": DEMO_CONFIG, "fit_recognition": RECOGNITION_CONFIG}


def lightning(sub: str, config: Path, data_yaml: Path, root: Path, *extra: str) -> int:
    return main([sub, "--config", str(config), "--config", str(data_yaml), "--trainer.default_root_dir", str(root),
                 *extra])


def only_checkpoint(root: Path, pattern: str = "*.ckpt") -> Path:
    found = sorted(root.rglob(pattern))
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    from vidlang.data.synthetic import generate_corpus
    from vidlang.demo import DemoConfig, run_demo

    base = tmp_path_factory.mktemp("compat")
    corpus = base / "corpus"
    generate_corpus(corpus, 20, seed=0, size=SIZE, frames=FRAMES, workers=1, progress=False)
    manifest = corpus / "manifest.csv"
    data_yaml = base / "data.yaml"
    data_yaml.write_text(
        "data:\n"
        + "".join(f"  {s}: {{format: manifest, path: {manifest}, split: {s}}}\n" for s in ("train", "val", "test"))
        + f"  sampling: {{num_frames: {FRAMES}}}\n  transform: {{image_size: {SIZE}, crop_scale: [0.8, 1.0]}}\n"
        "  loader: {batch_size: 8, num_workers: 0, persistent_workers: false, pin_memory: false}\n"
        "trainer:\n  max_epochs: 1\n  enable_model_summary: false\n  log_every_n_steps: 1\n"
        f"model:\n  init_args:\n    tokenizer: {corpus / 'tokenizer'}\n"
    )
    demo = run_demo(DemoConfig(corpus=str(corpus), out=str(base / "demo"), videos=20, epochs=1, batch_size=8,
                               num_frames=FRAMES, image_size=SIZE, workers=0))
    ckpts = {"demo": demo["checkpoint"]}
    for name in ("fit_retrieval", "fit_recognition"):
        assert lightning("fit", CONFIG_OF[name], data_yaml, base / name) == 0
        ckpts[name] = only_checkpoint(base / name)
    return {"base": base, "corpus": corpus, "data_yaml": data_yaml, "ckpts": ckpts, "demo": demo}


@pytest.mark.parametrize("producer", PRODUCERS)
def test_fit_resumes(made, producer):
    root = made["base"] / f"resume_{producer}"
    before = torch.load(made["ckpts"][producer], map_location="cpu", weights_only=True)
    code = lightning("fit", CONFIG_OF[producer], made["data_yaml"], root, "--ckpt_path", str(made["ckpts"][producer]),
                     "--trainer.max_epochs", str(before["epoch"] + 2))
    assert code == 0
    after = torch.load(only_checkpoint(root), map_location="cpu", weights_only=True)
    assert after["epoch"] == before["epoch"] + 1 and after["global_step"] > before["global_step"]  # continued


@pytest.mark.parametrize("producer", PRODUCERS)
@pytest.mark.parametrize("stage", ["validate", "test"])
def test_validate_and_test(made, producer, stage):
    root = made["base"] / f"{stage}_{producer}"
    code = lightning(stage, CONFIG_OF[producer], made["data_yaml"], root, "--ckpt_path", str(made["ckpts"][producer]))
    assert code == 0
    split = "val" if stage == "validate" else "test"
    reported = json.loads(only_checkpoint(root, f"{split}_metrics.json").read_text())["metrics"]
    if producer == "fit_recognition":
        assert 0 <= reported["top1"] <= 100 and reported["num_samples"] == 2, reported
    else:
        assert reported["num_videos"] == 2 and reported["num_texts"] == 10, reported
    if producer == "demo" and stage == "test":
        # `vidlang test --ckpt_path` reproduces the demo's own test of the checkpoint: the same weights and model
        demo = made["demo"]["metrics"]
        shared = sorted(set(demo) & set(reported))
        assert {"t2v_R@1", "v2t_R@1", "t2v_MdR", "num_videos"} <= set(shared), shared
        assert {k: reported[k] for k in shared} == pytest.approx({k: demo[k] for k in shared})


@pytest.mark.parametrize("producer", PRODUCERS)
def test_search(made, producer, capsys):
    argv = ["search", "--ckpt", str(made["ckpts"][producer]), "--videos", str(made["corpus"] / "videos"),
            "--cache", str(made["base"] / f"cache_{producer}"), "--quiet", "--topk", "3", "a red square"]
    code = main(argv)
    out = capsys.readouterr()
    if producer == "fit_recognition":
        assert code == 2 and "RecognitionTask checkpoint" in out.err and len(out.err.strip().splitlines()) == 1
        return
    assert code == 0, out.err
    assert "indexed 20 videos" in out.out and 'top 3 for "a red square"' in out.out


@pytest.mark.parametrize("producer", PRODUCERS)
def test_classify(made, producer, capsys):
    video = str(sorted((made["corpus"] / "videos").rglob("*.mp4"))[0])
    argv = ["classify", "--ckpt", str(made["ckpts"][producer]), video, "--json", "--topk", "2"]
    if producer != "fit_recognition":  # a retrieval checkpoint classifies zero-shot among given labels
        assert main(argv) == 2 and "--labels" in capsys.readouterr().err
        argv += ["--labels", "moving left,moving right,growing"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["ok"] and len(result["top"]) == 2 and 0 <= result["top"][0][1] <= 1


def serve_args(ckpt: Path, made: dict, producer: str) -> argparse.Namespace:
    return argparse.Namespace(ckpt=str(ckpt), llm=None, index=str(made["corpus"] / "videos"),
                              cache=str(made["base"] / f"serve_cache_{producer}"), root=None, host="127.0.0.1",
                              port=0, max_upload_mb=8.0, timeout_s=20.0, workers=1, device="cpu", backend="auto",
                              quiet=True)


@pytest.mark.parametrize("producer", PRODUCERS)
def test_serve(made, producer):
    from vidlang.commands.serve import ServeCommand
    from vidlang.errors import CheckpointError

    args = serve_args(made["ckpts"][producer], made, producer)
    if producer == "fit_recognition":
        with pytest.raises(CheckpointError, match="RecognitionTask checkpoint"):
            ServeCommand().build_app(args)
        return
    app = ServeCommand().build_app(args).start()
    try:
        conn = http.client.HTTPConnection(*app.address, timeout=20)
        conn.request("POST", "/search", body=json.dumps({"query": "a blue circle", "k": 2}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        body = json.loads(resp.read())
        conn.close()
    finally:
        app.shutdown()
    assert resp.status == 200 and len(body["results"]) == 2


def test_checkpoint_from_before_the_renames_validates(made):
    """A LightningCLI checkpoint written before issue 13's renames (``vision``, ``lr_mult_*``, ``blocks.*``) still
    rebuilds its model from its hyper-parameters (see also test_legacy_checkpoints)."""
    from test_legacy_checkpoints import old_style

    ckpt = torch.load(made["ckpts"]["fit_retrieval"], map_location="cpu", weights_only=True)
    old = old_style(ckpt)
    assert "vision" in old["hyper_parameters"]["model"] and any(".blocks." in k for k in old["state_dict"])
    path = made["base"] / "old_style.ckpt"
    torch.save(old, path)
    root = made["base"] / "validate_old_style"
    assert lightning("validate", DEMO_CONFIG, made["data_yaml"], root, "--ckpt_path", str(path)) == 0
