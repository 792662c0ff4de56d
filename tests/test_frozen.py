"""Frozen in Time (``frozen`` block): the released divided space-time attention, its zero init, T = 1, and the
joint image + video training with a frame curriculum (``docs/recipes.md``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vidlang.errors import ConfigError
from vidlang.models.factory import ModelConfig, build_model
from vidlang.models.temporal.frozen import FrozenInTime, time_attention
from vidlang.models.video_clip import VideoTextModel


def tiny(seed: int = 0, **block_args) -> VideoTextModel:
    torch.manual_seed(seed)
    return build_model(ModelConfig(block="frozen", image="vit_tiny", block_args=block_args))


def clip_video(model: VideoTextModel, b: int, t: int, seed: int = 1) -> torch.Tensor:
    size = model.image_tower.cfg.image_size
    return torch.randn(b, t, 3, size, size, generator=torch.Generator().manual_seed(seed))  # [B, T, 3, H, W]


# -- a re-statement of the released SpaceTimeTransformer (m-bain/frozen-in-time, model/video_transformer.py) ------
def released_attention(qkv: torch.nn.Linear, proj: torch.nn.Linear, heads: int, y: torch.Tensor,
                       groups: list[list[int]]) -> torch.Tensor:
    """VarAttention on ``y [B, L, C]``: the CLS (index 0) attends to every token; the queries of each group of
    token indices attend to [CLS] + that group. Written with explicit index lists, one group at a time."""
    b, length, c = y.shape
    d = c // heads
    q, k, v = (z.view(b, length, heads, d).transpose(1, 2) for z in qkv(y).chunk(3, dim=-1))  # [B, H, L, D]
    q = q * d**-0.5
    out = torch.zeros_like(q)
    out[:, :, :1] = (q[:, :, :1] @ k.transpose(-1, -2)).softmax(-1) @ v
    for group in groups:
        keys = [0, *group]
        a = (q[:, :, group] @ k[:, :, keys].transpose(-1, -2)).softmax(-1)
        out[:, :, group] = a @ v[:, :, keys]
    return proj(out.transpose(1, 2).reshape(b, length, c))


def released_video_embedding(model: VideoTextModel, video: torch.Tensor) -> torch.Tensor:
    """One sequence ``[CLS, frame 0 patches, ..., frame T-1 patches]`` per video through SpaceTimeBlocks."""
    tower, blk = model.image_tower, model.block
    b, t = video.shape[:2]
    x = tower.conv1(video.flatten(0, 1)).flatten(2).transpose(1, 2)  # [B*T, N, C]
    n, c = x.shape[1:]
    pe = tower.positional_embedding
    patches = x.view(b, t, n, c) + pe[1:] + blk.temporal_embedding[:t, None]
    cls = (tower.class_embedding + pe[0]).expand(b, 1, c)
    seq = tower.ln_pre(torch.cat([cls, patches.flatten(1, 2)], dim=1))  # [B, 1+T*N, C]
    time_groups = [[1 + f * n + p for f in range(t)] for p in range(n)]
    space_groups = [[1 + f * n + p for p in range(n)] for f in range(t)]
    heads = tower.cfg.heads
    for i, layer in enumerate(tower.layers):
        ta = blk.time_attn[i]
        time_out = released_attention(ta.qkv, ta.out_proj, heads, blk.time_norm[i](seq), time_groups)
        space_in = layer.ln_1(seq + time_out)
        seq = seq + released_attention(layer.attn.qkv, layer.attn.out_proj, heads, space_in, space_groups)
        seq = seq + layer.mlp(layer.ln_2(seq))
    return tower.ln_post(seq[:, 0]) @ tower.proj  # [B, E]


@pytest.mark.parametrize("t", [1, 2, 3])
def test_matches_the_released_divided_attention(t: int):
    model = tiny().eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # trained-looking temporal weights (not the zero init) and temporal embedding
        for name, p in model.block.named_parameters():
            if "time_norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        video = clip_video(model, 2, t)
        ours = model.encode_video(video)
        ref = released_video_embedding(model, video)
    torch.testing.assert_close(ours.embeds, ref, atol=2e-5, rtol=1e-4)
    assert ours.frame_embeds.shape == (2, t, ref.shape[-1])  # T copies of the video CLS
    # the gradients too (the CLS copies carry the released single CLS's gradient)
    params = [p for n, p in model.named_parameters() if n.startswith(("block.", "image_tower.layers.0."))]
    ours_grads = torch.autograd.grad(model.encode_video(video).embeds.square().sum(), params)
    ref_grads = torch.autograd.grad(released_video_embedding(model, video).square().sum(), params)
    for a, b in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_zero_init_is_the_released_init_and_one_frame_is_the_image_model():
    model = tiny().eval()
    for attn in model.block.time_attn:  # released initialize='zeros'
        assert attn.qkv.weight.abs().sum() == 0 and attn.qkv.bias.abs().sum() == 0
        assert (attn.out_proj.weight == 1).all() and attn.out_proj.bias.abs().sum() == 0
    assert model.block.temporal_embedding.abs().sum() == 0
    video = clip_video(model, 3, 1)
    with torch.no_grad():
        ours = model.encode_video(video).embeds
        image = model.image_tower(video).frame_embeds[:, 0]  # the tower without any block: the image model
    torch.testing.assert_close(ours, image, atol=0, rtol=0)  # bit-identical
    # T > 1 at init: the temporal attention adds nothing, but the CLS attends across frames (the released model)
    video = clip_video(model, 2, 3)
    with torch.no_grad():
        ours = model.encode_video(video).embeds
        frame_mean = model.image_tower(video).frame_embeds.mean(1)
    torch.testing.assert_close(ours, released_video_embedding(model, video), atol=2e-5, rtol=1e-4)
    assert not torch.allclose(ours, frame_mean, atol=1e-3)
    assert FrozenInTime.zero_init_identity is False and FrozenInTime.freeze_backbone is False


def test_one_frame_runs_the_temporal_attention_once_trained():
    model = tiny().eval()
    video = clip_video(model, 2, 1)
    with torch.no_grad():
        before = model.encode_video(video).embeds
        model.block.time_attn[0].qkv.weight.normal_(0, 0.2)
        after = model.encode_video(video).embeds
    assert after.shape == before.shape and torch.isfinite(after).all()
    assert not torch.allclose(after, before)  # released: a patch attends to {CLS, itself} also for images


def test_temporal_attention_mixes_frames_after_one_step():
    model = tiny().train()
    blk = model.block
    probe = torch.randn(1, 1 + 3 * 4, model.image_tower.width, generator=torch.Generator().manual_seed(7))

    def frame0_depends_on_frame1() -> bool:
        other = probe.clone()
        other[:, 1 + 4 : 1 + 8] = torch.randn(1, 4, probe.shape[-1])  # change frame 1 only
        with torch.no_grad():
            a = time_attention(blk.time_attn[0], blk.time_norm[0](probe), 3)[1][:, 0]
            b = time_attention(blk.time_attn[0], blk.time_norm[0](other), 3)[1][:, 0]
        return not torch.allclose(a, b, atol=1e-7)

    assert not frame0_depends_on_frame1()  # zero init: the temporal attention outputs 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    video = clip_video(model, 4, 3)
    ids = torch.randint(1, model.text_tower.cfg.vocab_size, (4, 7), generator=torch.Generator().manual_seed(2))
    out = model(video, ids, torch.ones_like(ids))
    v, tx = F.normalize(out.video.embeds, dim=-1), F.normalize(out.text.embeds, dim=-1)
    loss = F.cross_entropy(20 * v @ tx.T, torch.arange(4))
    loss.backward()
    assert blk.time_attn[0].qkv.weight.grad.abs().sum() > 0  # the value part moves first (released: proj = 1)
    opt.step()
    assert frame0_depends_on_frame1()


def test_refuses_too_many_frames_and_timm_towers():
    model = tiny(max_frames=2).eval()
    with pytest.raises(ValueError, match="3 frames exceed"):
        model.encode_video(clip_video(model, 1, 3))
    with pytest.raises(ConfigError, match="clip"):
        build_model(ModelConfig(block="frozen", image="timm:vit_tiny_patch16_224", image_size=32, text="text_tiny",
                                image_overrides={"depth": 2, "embed_dim": 48, "num_heads": 3}))
    with pytest.raises(ConfigError, match="frozen time-attention init"):
        tiny(time_init="ones")


# -- joint image + video data, the frame curriculum -----------------------------------------------------------------
S = 32  # crop size of the tiny runs


def write_images(root, n: int = 6, broken: bool = True):
    """``n`` small images (PNG and JPEG, one size each) with two captions for the first, and a broken file last."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rows = ["image,caption"]
    for i in range(n):
        name = f"img{i}.{'png' if i % 2 else 'jpg'}"
        colour = (40 * i % 256, 255 - 30 * i, 90)
        Image.new("RGB", (48 + 4 * i, 40), colour).save(root / name)
        rows.append(f"{name},a picture of colour {i}")
    rows.append("img0.jpg,another caption of picture 0")
    if broken:
        (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        rows.append("broken.jpg,a picture that cannot be read")
    (root / "images.csv").write_text("\n".join(rows) + "\n")
    return root / "images.csv"


def test_image_reader_and_image_captions_format(tmp_path):
    from vidlang.data.decoding import VideoDecodeError, open_video
    from vidlang.data.formats import build_index

    csv = write_images(tmp_path / "im")
    index = build_index("image_captions", csv=str(csv))
    assert index.still_images and [e.key for e in index.entries][:2] == ["img0.jpg", "img1.png"]
    assert len(index.entries) == 7 and index.entries[0].captions == ["a picture of colour 0",
                                                                    "another caption of picture 0"]
    with open_video(index.entries[1].source, "image", resize_short_side=20) as r:
        assert r.metadata.num_frames == 1 and (r.metadata.width, r.metadata.height) == (52, 40)
        frames = r.get_frames([0, 0, -1])
        assert frames.shape == (3, 3, 20, 26) and frames.dtype == torch.uint8
    with pytest.raises(VideoDecodeError, match="not a readable image"):
        open_video(str(tmp_path / "im" / "broken.jpg"), "image")
    with pytest.raises(VideoDecodeError, match="larger than max_pixels"):
        open_video(index.entries[0].source, "image", max_pixels=100)
    from vidlang.data.formats.base import FormatError

    (tmp_path / "bad.csv").write_text("image,caption\nx.jpg,\n")
    with pytest.raises(FormatError, match="bad.csv:2"):
        build_index("image_captions", csv=str(tmp_path / "bad.csv"))


@pytest.fixture(scope="module")
def joint_data(tmp_path_factory):
    from vidlang.data.synthetic import generate_corpus
    from vidlang.models.clip.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("fit")
    generate_corpus(root / "videos", 8, seed=3, size=40, frames=8, workers=1, progress=False)
    csv = write_images(root / "images")
    lines = (root / "videos" / "manifest.csv").read_text().splitlines() + csv.read_text().splitlines()
    train_tokenizer(lines * 3, root / "tok", vocab_size=400, min_frequency=1, context_length=24)
    return root


def joint_module(root, workers: int = 0, **kw):
    from vidlang.data.datamodule import VideoDataModule

    manifest = {"format": "manifest", "path": str(root / "videos" / "manifest.csv")}
    images = {"format": "image_captions", "csv": str(root / "images" / "images.csv"), "batch_size": 4}
    return VideoDataModule(
        train=manifest, val=manifest, train_mix=[images], sampling={"num_frames": 4}, transform={"image_size": S},
        loader={"batch_size": 4, "num_workers": workers, "pin_memory": False, "persistent_workers": workers > 0},
        decode={"backend": "pyav"}, **kw)


def test_set_train_frames_rebuilds_the_stream_between_epochs(joint_data):
    from vidlang.data.mixing import TrainStream

    dm = joint_module(joint_data)
    dm.setup("fit")
    stream = dm.train_dataloader()
    assert isinstance(stream, TrainStream) and len(stream) == 4  # min(2 video, 2 image batches) x 2 sources
    shapes = [tuple(b["video"].shape[1:2]) for b in stream]
    assert shapes == [(4,), (1,), (4,), (1,)]  # video, image, video, image: each batch one source
    dm.set_train_frames(2)
    assert [b["video"].shape[1] for b in stream] == [2, 1, 2, 1] and stream.builds == 2
    assert dm.sampling.frames(False) == 4  # evaluation keeps its count
    assert next(iter(dm.val_dataloader()))["video"].shape[1] == 4
    with pytest.raises(ConfigError, match="train_mix"):
        from vidlang.data.datamodule import VideoDataModule

        VideoDataModule(train_mix=[{"format": "image_captions", "csv": "x.csv"}])


def test_curriculum_validates_its_schedule():
    from vidlang.data.curriculum import FrameCurriculum

    c = FrameCurriculum({0: 1, 2: 4, 5: 8})
    assert [c.frames_at(e) for e in range(7)] == [1, 1, 4, 4, 4, 8, 8] and c.final_frames == 8
    with pytest.raises(ConfigError, match="epoch 0"):
        FrameCurriculum({1: 4})
    with pytest.raises(ConfigError, match="frame counts >= 1"):
        FrameCurriculum({0: 0})


def test_joint_image_video_training_with_a_frame_curriculum(joint_data, tmp_path):
    """A tiny FiT run: image batches (T=1) and video batches interleaved; the curriculum 1 -> 2 -> 4 changes the
    video batches' frames at the epoch boundaries (persistent workers rebuilt); validation at the final 4; the
    broken image is skipped and counted."""
    import json

    import pytorch_lightning as pl

    from vidlang.data.curriculum import FrameCurriculum
    from vidlang.tasks import RetrievalTask

    class Seen(pl.Callback):
        def __init__(self) -> None:
            self.train: list[tuple[int, int, bool]] = []  # (epoch, T, is an image batch)
            self.val: list[int] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            images = all(k.startswith("img") or k == "broken.jpg" for k in batch["key"])
            self.train.append((trainer.current_epoch, batch["video"].shape[1], images))

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            self.val.append(batch["video"].shape[1])

    pl.seed_everything(0)
    dm = joint_module(joint_data, workers=1, bad_samples={"report_dir": str(tmp_path / "bad"), "max_skip_rate": 0.2})
    task = RetrievalTask(ModelConfig(image="vit_tiny", block="frozen", num_frames=4, block_args={"max_frames": 4}),
                         tokenizer=str(joint_data / "tok"), optim={"lr": 1e-3, "weight_decay": 0.0})
    seen, curriculum = Seen(), FrameCurriculum({0: 1, 1: 2, 2: 4})
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                         num_sanity_val_steps=0, callbacks=[curriculum, seen])
    trainer.fit(task, datamodule=dm)
    videos = [(e, t) for e, t, img in seen.train if not img]
    assert videos == [(0, 1), (0, 1), (1, 2), (1, 2), (2, 4), (2, 4)]
    assert [(e, t) for e, t, img in seen.train if img] == [(e, 1) for e in (0, 0, 1, 1, 2, 2)]
    assert [img for _, _, img in seen.train] == [False, True] * 6  # one batch of each source in turn
    assert curriculum.applied == {0: 1, 1: 2, 2: 4} and dm.train_dataloader().builds == 3
    assert seen.val and set(seen.val) == {4}  # evaluation at the final count
    report = [json.loads(x) for x in (tmp_path / "bad" / "bad_samples.jsonl").read_text().splitlines()]
    assert {r["key"] for r in report} == {"broken.jpg"} and {r["split"] for r in report} == {"train"}
    assert sorted(r["epoch"] for r in report) == [0, 1, 2]  # skipped (replaced) and counted in every epoch
    assert all(torch.isfinite(p).all() for p in task.parameters())


def test_curriculum_refuses_an_evaluation_count_other_than_its_last(joint_data, tmp_path):
    import pytorch_lightning as pl

    from vidlang.data.curriculum import FrameCurriculum
    from vidlang.tasks import RetrievalTask

    dm = joint_module(joint_data)
    task = RetrievalTask(ModelConfig(image="vit_tiny", block="frozen", num_frames=4),
                         tokenizer=str(joint_data / "tok"))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                         callbacks=[FrameCurriculum({0: 1, 1: 8})])
    with pytest.raises(ConfigError, match="eval_num_frames"):
        trainer.fit(task, datamodule=dm)
