"""Chat encoder: tiny random Llama + word-level tokenizer saved to a tmp dir, loaded through AutoModel."""

from __future__ import annotations

import pytest
import torch

from vidlang.models.audio.encoder import AudioBranch, SpectrogramViT
from vidlang.models.chat import PLACEHOLDER, ChatEncoder, _stream_until_stop, split_prompt
from vidlang.models.factory import ModelConfig, build_model
from vidlang.tasks.chat_encoder import ChatEncoderTask

WORDS = (
    "a the red blue ball square circle moves left right up down grows shrinks beeps quietly loudly "
    "### Human : < Video > </ Assistant what is in this video ? describe it"
).split()
VISUAL = ModelConfig(image="vit_tiny", block="qformer", block_args={"num_queries": 4, "num_layers": 1})


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    from vidlang.serve.testing import tiny_llm

    return str(tiny_llm(tmp_path_factory.mktemp("tiny_llama"), sorted(set(WORDS)), layers=2))


def make_encoder(llm_dir: str, audio: bool = False, seed: int = 0) -> ChatEncoder:
    torch.manual_seed(seed)
    branch = None
    if audio:
        vit = SpectrogramViT(width=32, layers=1, heads=4, num_mel_bins=32, frames=40)
        branch = AudioBranch(vit, num_queries=3, qformer_layers=1, qformer_heads=4)
    return ChatEncoder.from_pretrained_llm(build_model(VISUAL), llm_dir, audio=branch)


def videos(b: int = 2, t: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, t, 3, 32, 32), generator=g, dtype=torch.uint8)  # [B, T, C, H, W]


def test_loads_llm_and_projects_to_its_width(llm_dir):
    enc = make_encoder(llm_dir).eval()
    assert enc.d_llm == 32
    with torch.no_grad():
        tokens = enc.embed(videos())
    assert tokens.shape == (2, 4, 32) and torch.isfinite(tokens).all()
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.startswith(("visual.block.qformer", "visual.block.frame_", "video_proj")) for n in trainable
    )
    assert not any(p.requires_grad for p in enc.llm.parameters())


def test_missing_llm_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="local directory"):
        ChatEncoder.from_pretrained_llm(build_model(VISUAL), str(tmp_path / "nope"))


def test_placeholder_count_must_match(llm_dir):
    assert split_prompt(f"x {PLACEHOLDER} y {PLACEHOLDER}", 2) == ["x ", " y ", ""]
    with pytest.raises(ValueError, match="2 <ImageHere> placeholder.*1 video"):
        split_prompt(f"{PLACEHOLDER} and {PLACEHOLDER}", 1)
    enc = make_encoder(llm_dir).eval()
    media = enc.media_tokens(videos(1))
    with pytest.raises(ValueError, match="0 <ImageHere>"):
        enc.build_sequence("no placeholder here", media)
    with pytest.raises(ValueError, match="2 <ImageHere>"):  # a question smuggling a placeholder in
        enc.answer(videos(1)[0], f"what is {PLACEHOLDER} ?", max_new_tokens=2)


def test_prompt_assembly_places_media_and_masks_labels(llm_dir):
    enc = make_encoder(llm_dir).eval()
    media = [torch.randn(4, 32), torch.randn(4, 32)]
    target = enc.caption_ids("a red ball")
    embeds, labels = enc.build_sequence(f"### Human : {PLACEHOLDER} and {PLACEHOLDER} ?", media, target)
    table = enc.llm.get_input_embeddings()
    ids = enc.tokenizer("### Human :", add_special_tokens=False)["input_ids"]
    n0 = 1 + len(ids)  # BOS + first text piece
    torch.testing.assert_close(embeds[0], table.weight[enc.tokenizer.bos_token_id])
    torch.testing.assert_close(embeds[n0 : n0 + 4], media[0])
    torch.testing.assert_close(embeds[n0 + 5 : n0 + 9], media[1])  # after the one-token piece " and "
    assert labels[: -len(target)].eq(-100).all() and labels[-len(target) :].tolist() == target
    assert target[-1] == enc.tokenizer.eos_token_id
    # batch padding: right for training, left for generation
    short, long_ = embeds[:3], embeds
    e, m, y = ChatEncoder.pad_batch([short, long_], [labels[:3], labels], left=True)
    assert m[0].tolist() == [0] * (len(long_) - 3) + [1] * 3 and torch.equal(e[0, -3:], short)
    e, m, y = ChatEncoder.pad_batch([short, long_], [labels[:3], labels], left=False)
    assert m[0, :3].tolist() == [1, 1, 1] and m[0, 3:].eq(0).all() and y[0, 3:].eq(-100).all()


def test_caption_training_lowers_loss_and_keeps_llm_frozen(llm_dir):
    enc = make_encoder(llm_dir).train()
    llm_before = {k: v.clone() for k, v in enc.llm.state_dict().items()}
    tower_before = {k: v.clone() for k, v in enc.visual.image_tower.state_dict().items()}
    # lr 3e-3 x 200 steps: at 1e-2 x 60 the run sat at the edge (loss 0.7-0.9, greedy decoding flipped with the
    # thread count); here the loss is ~0.24 of 4.07 and decoding is exact at 1 and 2 threads
    opt = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad], lr=3e-3)
    video, captions = videos(2), ["red ball moves left", "blue square grows"]
    losses = []
    for _ in range(200):
        loss = enc.caption_loss(enc.media_tokens(video), captions)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses
    assert all(torch.equal(v, enc.llm.state_dict()[k]) for k, v in llm_before.items())
    assert all(torch.equal(v, enc.visual.image_tower.state_dict()[k]) for k, v in tower_before.items())
    # the soft prompt learned the captions: greedy decoding from BOS + media reproduces them
    enc.eval()
    with torch.no_grad():
        embeds, mask = enc.prompt_inputs([enc.caption_template] * 2, [[m] for m in enc.media_tokens(video)])
        ids = enc.generate_ids(embeds, mask, max_new_tokens=8)
    decoded = [enc.tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    assert decoded == captions, decoded


def test_generation_and_streaming_agree(llm_dir):
    enc = make_encoder(llm_dir).eval()
    clip = videos(1)[0]  # [T, C, H, W]
    text = enc.answer(clip, "what is in this video ?", max_new_tokens=6)
    pieces = list(enc.answer(clip, "what is in this video ?", max_new_tokens=6, stream=True))
    assert isinstance(text, str)
    assert "".join(pieces).strip() == text
    with torch.no_grad():
        embeds, mask = enc.prompt_inputs(
            [enc.template.replace("{question}", "describe it")], [enc.media_tokens(clip[None])]
        )
        ids = enc.generate_ids(embeds, mask, max_new_tokens=6)
    assert 1 <= ids.shape[1] <= 6


def test_stream_stop_text_is_cut_even_across_pieces():
    assert list(_stream_until_stop(iter(["a b", " #", "## c"]), "###")) == ["a b", " "]
    assert "".join(_stream_until_stop(iter(["x", "#", "y"]), "###")) == "x#y"


def test_audio_tokens_join_video_tokens_only_when_present(llm_dir):
    enc = make_encoder(llm_dir, audio=True).train()
    mel = torch.randn(2, 8, 1, 32, 40)
    mask = torch.tensor([True, False])
    media = enc.media_tokens(videos(2), mel, mask)
    assert [m.shape for m in media] == [(4 + 3, 32), (4, 32)]
    loss = enc.caption_loss(media, ["a red ball beeps", "the blue square"])
    loss.backward()
    assert torch.isfinite(loss)
    assert enc.audio_proj.weight.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in enc.audio.backbone.parameters())


def test_task_fits_saves_without_llm_and_reloads(llm_dir, tmp_path):
    import pytorch_lightning as pl

    torch.manual_seed(0)
    task = ChatEncoderTask(model=VISUAL, llm=llm_dir, optim={"lr": 1e-3, "warmup_steps": 0, "warmup_ratio": None})
    batch = {"video": videos(2), "captions": ["a red ball", "the blue square", "a circle"],
             "caption_index": torch.tensor([0, 1, 1])}  # fmt: skip
    loader = torch.utils.data.DataLoader([batch] * 3, batch_size=None)
    trainer = pl.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    before = {k: v.clone() for k, v in task.encoder.video_proj.state_dict().items()}
    trainer.fit(task, loader)
    assert not torch.equal(before["weight"], task.encoder.video_proj.weight)
    ckpt = tmp_path / "chat.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert state and not any(k.startswith("encoder.llm.") for k in state)
    loaded = ChatEncoderTask.load_from_checkpoint(ckpt, weights_only=True)
    torch.testing.assert_close(loaded.encoder.video_proj.weight, task.encoder.video_proj.weight)
    torch.testing.assert_close(loaded.encoder.llm.lm_head.weight, task.encoder.llm.lm_head.weight)


def test_validation_step_passes_over_an_all_skipped_batch(llm_dir):
    from vidlang.data.badsamples import SkippedSample
    from vidlang.data.collate import collate_samples

    task = ChatEncoderTask(model=VISUAL, llm=llm_dir)
    empty = collate_samples([SkippedSample("v1", "v1.mp4", "broken"), SkippedSample("v2", "v2.mp4", "broken")])
    assert task.validation_step(empty, 0) is None  # nothing to score; the skips are counted by the data side


def test_task_rejects_non_qformer_blocks(llm_dir):
    with pytest.raises(ValueError, match="block='qformer'"):
        ChatEncoderTask(model=ModelConfig(image="vit_tiny", block="mean"), llm=llm_dir)


def test_encoder_needs_a_block_that_declares_tokens(llm_dir):
    """The encoder reads the block's declared ``token_dim`` (issue 13 item 2), not its attributes."""
    assert build_model(VISUAL).block.token_dim == 64  # the Q-former width D (default: the tower width C)
    for block in ("mean", "stan"):
        with pytest.raises(ValueError, match="outputs tokens"):
            ChatEncoder.from_pretrained_llm(build_model(ModelConfig(image="vit_tiny", block=block)), llm_dir)
