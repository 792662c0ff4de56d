"""``vidlang embed`` (vidlang/embed): embeddings equal the inference path's, bad videos skipped and counted,
resume after an interrupted run gives the output of an uninterrupted one, 2 DDP processes (gloo) give the same
ids and embeddings as one, a folder of another run is refused, and the command line end to end
(embed -> index build -> search --index)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl

from vidlang.cli import main
from vidlang.data.badsamples import BadSamplePolicy
from vidlang.data.config import LoaderConfig
from vidlang.embed import ShardPlan, embed, folder_entries, load_encoder
from vidlang.embeddings import EmbeddingsDir, read_shard_info
from vidlang.errors import ConfigError

LOADER = LoaderConfig(batch_size=2, num_workers=0)
QUIET = {"enable_progress_bar": False}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from vidlang.serve.testing import tiny_retrieval_checkpoint

    return tiny_retrieval_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def encoder(ckpt):
    return load_encoder(ckpt)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """9 synthetic videos (with captions, in a manifest) and their entries."""
    from vidlang.data.formats import build_index
    from vidlang.data.synthetic import generate_corpus

    out = tmp_path_factory.mktemp("corpus")
    generate_corpus(out, 9, seed=5, size=32, frames=8, workers=1, progress=False)
    return {"dir": out, "entries": build_index("manifest", path=str(out / "manifest.csv")).entries}


def run(encoder, out, entries, **kw):
    kw.setdefault("loader", LOADER)
    kw.setdefault("trainer", QUIET)
    return embed(encoder, out, entries, **kw)


def table(folder: Path) -> tuple[list[str], np.ndarray]:
    d = EmbeddingsDir(folder)
    return d.read_keys().column("id").to_pylist(), d.read_embeddings()


def test_embeddings_equal_the_inference_path_and_bad_videos_are_skipped(ckpt, encoder, corpus, tmp_path):
    from vidlang.serve.inference import load_bundle

    videos = tmp_path / "videos"
    shutil.copytree(corpus["dir"] / "videos", videos)
    (videos / "zz_broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    entries = folder_entries(videos)
    assert len(entries) == 10 and entries[-1].key == "zz_broken.mp4"
    d = run(encoder, tmp_path / "emb", entries, dtype="float32", shard_size=4)
    assert d.count == 9 and d.dim == 32 and d.columns == {"embedding": "video"}
    assert d.model.checkpoint_sha256 == encoder.info.checkpoint_sha256 and d.model.kind == "retrieval"
    assert [s.path.name for s in d.shards] == ["part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]
    assert [s.rows for s in d.shards] == [4, 4, 1]  # the last shard: 1 good video + the broken one
    assert d.protocol["skipped"] == 1 and d.protocol["skipped_examples"][0]["id"] == "zz_broken.mp4"
    assert "zz_broken.mp4" in read_shard_info(d.shards[2].path)["shard"]["skipped"][0]["source"]
    keys = d.read_keys()
    assert keys.column("id").to_pylist() == [e.key for e in entries[:9]]
    bundle = load_bundle(ckpt)
    want = bundle.embed_videos([e.path for e in entries[:9]]).numpy()
    np.testing.assert_allclose(d.read_embeddings(), want, atol=1e-5)


def test_text_embeddings_and_float16(encoder, corpus, tmp_path):
    entries = corpus["entries"]
    d = run(encoder, tmp_path / "emb", entries, text=True, shard_size=5)
    assert d.columns == {"embedding": "video", "text_embedding": "text"} and d.dtype == "float16"
    caps = d.read_keys().column("caption").to_pylist()
    assert caps == [e.captions[0] for e in entries]
    import torch

    from vidlang.embed.module import EmbedModule

    want = EmbedModule(encoder, text=True).encode_text(caps).numpy()
    np.testing.assert_allclose(d.read_embeddings("text_embedding"), want, atol=2e-3)  # float16 storage
    only_text = run(encoder, tmp_path / "text", entries, video=False, text=True, shard_size=5, dtype="float32")
    assert only_text.columns == {"embedding": "text"}
    np.testing.assert_allclose(only_text.read_embeddings(), want, atol=1e-5)
    assert torch.is_tensor(torch.from_numpy(want))


class StopAfter(pl.Callback):
    """Raises after ``n`` batches (an interrupted job)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx + 1 == self.n:
            raise RuntimeError("stopped for the test")


class CountClips(pl.Callback):
    def __init__(self) -> None:
        self.entries: list[int] = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.entries.extend(outputs["index"])


def test_resume_after_interruption_equals_an_uninterrupted_run(encoder, corpus, tmp_path):
    entries = corpus["entries"]  # 9 entries, shards of 3 in batches of 2: [0,1][2] [3,4][5] [6,7][8]
    full = run(encoder, tmp_path / "full", entries, shard_size=3)
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="stopped for the test"):
        run(encoder, out, entries, shard_size=3, callbacks=[StopAfter(3)])  # shard 0 done, shard 1 half done
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in out.glob("*.parquet")) == ["part-000000.parquet"]
    with pytest.raises(Exception, match="no manifest.json"):
        EmbeddingsDir(out)
    done = (out / "part-000000.parquet").stat().st_mtime_ns
    counter = CountClips()
    resumed = run(encoder, out, entries, shard_size=3, callbacks=[counter])
    assert counter.entries == [3, 4, 5, 6, 7, 8]  # the finished shard is skipped, the partial one redone
    assert (out / "part-000000.parquet").stat().st_mtime_ns == done
    assert resumed.count == full.count == 9
    for a, b in zip(full.shards, resumed.shards, strict=True):
        assert a.path.name == b.path.name and a.path.read_bytes() == b.path.read_bytes()
    ids, x = table(out)
    assert ids == table(tmp_path / "full")[0] and np.array_equal(x, table(tmp_path / "full")[1])
    again = CountClips()
    run(encoder, out, entries, shard_size=3, callbacks=[again])  # a finished run: nothing to redo
    assert again.entries == []


def test_a_folder_of_another_run_is_refused(encoder, corpus, tmp_path):
    entries = corpus["entries"]
    run(encoder, tmp_path / "emb", entries[:4], shard_size=3)
    with pytest.raises(ConfigError, match=r"holds another embedding run .*differs in .*shard_size"):
        run(encoder, tmp_path / "emb", entries[:4], shard_size=2)
    with pytest.raises(ConfigError, match=r"differs in data_sha256, entries"):
        run(encoder, tmp_path / "emb", entries[:5], shard_size=3)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.parquet").write_bytes(b"")
    with pytest.raises(ConfigError, match="holds Parquet files but no run.json"):
        run(encoder, tmp_path / "other", entries[:4], shard_size=3)
    with pytest.raises(ConfigError, match="has no caption"):
        bare = [type(entries[0])(entries[0].source, "bare")]
        run(encoder, tmp_path / "t", bare, text=True)


def test_a_rank_without_shards_gets_one_empty_batch(encoder, corpus, tmp_path):
    """(The fast check of the idle-rank path; the 2-process run: test_ddp_resume_with_an_idle_rank.)"""
    from vidlang.data.config import DecodeConfig, SamplingConfig, TransformConfig
    from vidlang.embed.data import EmbedDataModule
    from vidlang.embed.module import EmbedModule

    entries = corpus["entries"][:3]
    run(encoder, tmp_path / "emb", entries, shard_size=2)
    data = EmbedDataModule(entries, ShardPlan(3, 2), tmp_path / "emb", SamplingConfig(num_frames=4),
                           TransformConfig(image_size=32), LOADER, DecodeConfig(), BadSamplePolicy())
    batches = list(data.predict_dataloader())
    assert data.assigned == [] and len(batches) == 1 and batches[0]["index"] == []
    out = EmbedModule(encoder, text=True).predict_step(batches[0])
    assert out["index"] == [] and out["embedding"].shape == (0, 32) and out["text_embedding"].shape == (0, 32)


def test_plan_splits_shards_and_batches():
    plan = ShardPlan(10, 4)
    assert plan.num_shards == 3 and plan.bounds(2) == (8, 10) and plan.shard_of(7) == 1
    assert ShardPlan.split([0, 1, 2, 3, 4], 1, 2) == [1, 3]
    assert plan.batches([0, 2], 3) == [[0, 1, 2], [3], [8, 9]]
    from vidlang.embed.plan import unique_ids

    assert unique_ids(["a", "b", "a", "a"]) == ["a", "b", "a#1", "a#2"]
    assert unique_ids(["a#1", "a", "a"]) == ["a#1#0", "a#1", "a#2"]  # "a#1" taken: every row numbered


def test_ddp_two_processes_equal_one(encoder, corpus, tmp_path):
    """2 gloo processes (ddp_spawn): each rank writes its own shards; the folder has every id once, with the
    embeddings of a single-process run."""
    entries = corpus["entries"]
    one = run(encoder, tmp_path / "one", entries, shard_size=2, dtype="float32")
    two = run(encoder, tmp_path / "two", entries, shard_size=2, dtype="float32",
              trainer={**QUIET, "accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn"})
    ids1, x1 = table(tmp_path / "one")
    ids2, x2 = table(tmp_path / "two")
    assert len(ids2) == len(set(ids2)) == 9 and sorted(ids2) == sorted(ids1)
    np.testing.assert_allclose(x2[[ids2.index(i) for i in ids1]], x1, atol=1e-6)
    ranks = [read_shard_info(s.path)["shard"]["rank"] for s in two.shards]
    assert ranks == [0, 1, 0, 1, 0] and one.count == two.count


@pytest.mark.slow
def test_ddp_resume_with_an_idle_rank(encoder, corpus, tmp_path):
    """Resumed on 2 ranks with one shard left: rank 0 redoes it, rank 1 has nothing to do (one empty batch:
    Lightning refuses an empty loader under DDP) and the folder equals the first run's."""
    entries = corpus["entries"]
    ddp = {**QUIET, "accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn"}
    run(encoder, tmp_path / "two", entries, shard_size=2, dtype="float32", trainer=ddp)
    ids2, x2 = table(tmp_path / "two")
    (tmp_path / "two" / "manifest.json").unlink()
    (tmp_path / "two" / "part-000003.parquet").unlink()
    run(encoder, tmp_path / "two", entries, shard_size=2, dtype="float32", trainer=ddp)
    assert table(tmp_path / "two")[0] == ids2 and np.array_equal(table(tmp_path / "two")[1], x2)
    assert read_shard_info(tmp_path / "two" / "part-000003.parquet")["shard"]["rank"] == 0


def test_embed_command_then_index_and_search(ckpt, corpus, tmp_path, capsys):
    out, idx = tmp_path / "emb", tmp_path / "idx"
    rc = main(["embed", "--ckpt", str(ckpt), "--videos", str(corpus["dir"] / "videos"), "--out", str(out),
               "--batch-size", "4", "--shard-size", "5", "--num-workers", "0", "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0 and "9 clips (0 skipped) in 2 shards" in text, text
    assert EmbeddingsDir(out).count == 9
    assert main(["index", "build", "--embeddings", str(out), "--out", str(idx), "--kind", "flat", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["search", "--ckpt", str(ckpt), "--index", str(idx), "--topk", "3", "red", "circle"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()[:1].isdigit()]
    assert len(lines) == 3 and all(".mp4" in ln for ln in lines)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["protocol"]["frames"] == 4 and manifest["model"]["checkpoint"] == str(Path(ckpt).resolve())


def test_search_refuses_an_index_of_another_checkpoint(ckpt, corpus, tmp_path, capsys):
    from vidlang.serve.testing import tiny_retrieval_checkpoint

    other = tiny_retrieval_checkpoint(tmp_path / "other", seed=1)
    emb = tmp_path / "emb"
    run(load_encoder(other), emb, corpus["entries"][:3])
    assert main(["index", "build", "--embeddings", str(emb), "--out", str(tmp_path / "idx"), "--kind", "flat",
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["search", "--ckpt", str(ckpt), "--index", str(tmp_path / "idx"), "red"]) == 2
    err = capsys.readouterr().err
    assert "built from embeddings of checkpoint" in err and "\n" not in err.strip()


def test_bad_sample_policy_still_stops_a_broken_corpus(encoder, corpus, tmp_path):
    from vidlang.data.badsamples import BadSampleError

    entries = [type(e)(str(tmp_path / f"missing{i}.mp4"), f"m{i}") for i, e in enumerate(corpus["entries"])]
    with pytest.raises(BadSampleError):
        run(encoder, tmp_path / "emb", entries, bad_samples=BadSamplePolicy(min_attempts=4, max_skip_rate=0.5))


def test_serve_searches_a_vector_index_and_refuses_another_model(ckpt, encoder, corpus, tmp_path):
    """/search over a vector index built from `vidlang embed` output ranks like the offline index; a server
    started with another checkpoint refuses the index."""
    import http.client

    from vidlang.errors import ModelMismatchError
    from vidlang.index import build_index
    from vidlang.serve import ServeApp, ServeConfig
    from vidlang.serve.inference import load_bundle
    from vidlang.serve.testing import tiny_retrieval_checkpoint

    run(encoder, tmp_path / "emb", corpus["entries"], dtype="float32")
    vi = build_index(tmp_path / "emb", "hnsw", tmp_path / "idx", threads=1)
    bundle = load_bundle(ckpt)
    config = ServeConfig(host="127.0.0.1", port=0, log_requests=False, decode_processes=0)
    app = ServeApp(bundle, config, index=vi).start()
    try:
        conn = http.client.HTTPConnection(*app.address, timeout=60)
        conn.request("POST", "/search", body=json.dumps({"query": "a blue circle grows", "k": 4}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        body = json.loads(resp.read())
        conn.close()
        conn = http.client.HTTPConnection(*app.address, timeout=60)
        conn.request("GET", "/health")
        health = json.loads(conn.getresponse().read())
        conn.close()
    finally:
        app.shutdown()
    want = vi.search(bundle.embed_texts(["a blue circle grows"]), 4)
    assert resp.status == 200 and [r["path"] for r in body["results"]] == [p for p, _ in want]
    assert [r["score"] for r in body["results"]] == pytest.approx([s for _, s in want], abs=1e-5)
    assert health["index"] == {"videos": 9, "unreadable": 0, "kind": "hnsw"}
    other = load_bundle(tiny_retrieval_checkpoint(tmp_path / "other", seed=1))
    with pytest.raises(ModelMismatchError, match="built from embeddings of checkpoint"):
        ServeApp(other, ServeConfig(host="127.0.0.1", port=0, log_requests=False, decode_processes=0), index=vi)


def test_embed_command_with_a_data_config_and_trainer_options(ckpt, corpus, tmp_path, capsys):
    """--data takes a fit config (its data section, any format); --trainer.* options reach pl.Trainer."""
    import yaml

    cfg = {"model": {"class_path": "ignored"}, "data": {
        "train": {"format": "manifest", "path": str(corpus["dir"] / "manifest.csv")},
        "sampling": {"num_frames": 2, "eval_num_frames": 3}, "transform": {"image_size": 32},
        "loader": {"batch_size": 2, "eval_batch_size": 4, "num_workers": 0}}}
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "emb"
    rc = main(["embed", "--ckpt", str(ckpt), "--data", str(tmp_path / "fit.yaml"), "--out", str(out), "--text",
               "--trainer.accelerator", "cpu", "--trainer.devices=1", "--trainer.limit_predict_batches", "1.0",
               "--quiet"])
    assert rc == 0, capsys.readouterr().err
    d = EmbeddingsDir(out)
    assert d.count == 9 and d.protocol["frames"] == 3 and d.protocol["data"].endswith("fit.yaml:train")
    assert d.columns == {"embedding": "video", "text_embedding": "text"}
    assert main(["embed", "--ckpt", str(ckpt), "--data", str(tmp_path / "fit.yaml"), "--out", str(out),
                 "--trainer.max_pochs", "1"]) == 2
    assert "--trainer.max_pochs: not a pl.Trainer argument" in capsys.readouterr().err
    assert main(["embed", "--ckpt", str(ckpt), "--data", str(tmp_path / "fit.yaml"), "--split", "val",
                 "--out", str(out)]) == 2
    assert "no split 'val' (it has: train)" in capsys.readouterr().err


def test_audio_visual_checkpoint_fuses_each_clips_audio(corpus, tmp_path):
    """An audio-visual RetrievalTask checkpoint: embed decodes each clip's audio and fuses it, as the inference
    path does; the same clips without their audio embed differently (the audio is really used)."""
    import importlib.util
    import sys

    import torch
    from torch.utils.data import DataLoader

    from vidlang.models.clip.tokenizer import train_tokenizer
    from vidlang.serve.inference import load_bundle

    tool_path = Path(__file__).resolve().parents[1] / "tools/audio_retrieval_synthetic.py"
    spec = importlib.util.spec_from_file_location("audio_retrieval_synthetic", tool_path)
    tool = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tool
    spec.loader.exec_module(tool)
    train_tokenizer(["a red circle moves left with a low tone"] * 4, tmp_path / "tok", vocab_size=300,
                    min_frequency=1, context_length=32)
    task = tool.make_task(str(tmp_path / "tok"), 4, 1e-3, True, seed=0)
    g = torch.Generator().manual_seed(0)
    batch = {"video": torch.randint(0, 256, (2, 4, 3, 32, 32), generator=g, dtype=torch.uint8),
             "captions": ["a red circle", "a low tone"], "caption_index": torch.arange(2)}
    trainer = tool.trainer(1, tmp_path)
    trainer.fit(task, DataLoader([batch], batch_size=None))
    with torch.no_grad():  # the fusion gate starts closed (audio ignored): open it
        for name, p in task.model.named_parameters():
            if name.startswith("fusion."):
                p.add_(0.5)
    trainer.save_checkpoint(tmp_path / "av.ckpt")
    encoder = load_encoder(tmp_path / "av.ckpt")
    assert encoder.audio_model is not None and encoder.info.extra["audio"] is True
    entries = corpus["entries"][:4]
    d = run(encoder, tmp_path / "emb", entries, dtype="float32")
    assert d.protocol["audio"] is True
    want = load_bundle(tmp_path / "av.ckpt").embed_videos([e.path for e in entries]).numpy()
    np.testing.assert_allclose(d.read_embeddings(), want, atol=1e-4)
    from vidlang.data.config import DecodeConfig

    silent = run(encoder, tmp_path / "silent", entries, dtype="float32", decode=DecodeConfig(resize_short_side=32))
    assert silent.protocol["audio"] is True  # audio decoding is switched on for an audio-visual model ...
    np.testing.assert_allclose(silent.read_embeddings(), want, atol=1e-4)  # ... even when the config leaves it off
    bundle = load_bundle(tmp_path / "av.ckpt")
    clips = torch.stack([bundle.decode_clip(e.path) for e in entries])
    masked = bundle.encode_clips(clips).embeds.numpy()  # every clip on the no-audio path
    assert np.abs(masked - want).max() > 1e-3


def test_recognition_checkpoint_embeds_video_and_text(corpus, tmp_path):
    import torch

    from vidlang.serve.inference import load_classifier
    from vidlang.serve.testing import tiny_recognition_checkpoint

    path = tiny_recognition_checkpoint(tmp_path)
    encoder = load_encoder(path)
    assert encoder.info.kind == "recognition" and encoder.num_frames == 4 and encoder.tokenizer is not None
    entries = corpus["entries"][:3]
    d = run(encoder, tmp_path / "emb", entries, text=True, dtype="float32")
    assert d.count == 3 and d.model.kind == "recognition"
    task = load_classifier(path)
    from vidlang.data.config import DecodeConfig, SamplingConfig, TransformConfig
    from vidlang.data.datasets import VideoTextDataset

    ds = VideoTextDataset(entries, SamplingConfig(num_frames=4).build(False), TransformConfig(32).build(False),
                          resize_short_side=32, backend=DecodeConfig().backend)
    from vidlang.data.transforms import normalize

    video = normalize(torch.stack([ds[i].video[0] for i in range(3)]), task.model.image_mean, task.model.image_std)
    with torch.no_grad():
        want = torch.nn.functional.normalize(task.model.encode_video(video).embeds, dim=-1).numpy()
    np.testing.assert_allclose(d.read_embeddings(), want, atol=1e-5)
