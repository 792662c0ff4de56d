"""Prompt Switch as the official code (issue 14): weighted caption loss, pooling, lr groups, frame groups."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vidlang.losses.aux import weigh_aux_losses
from vidlang.models.clip.tokenizer import ClipTokenizer, train_tokenizer
from vidlang.models.factory import ModelConfig, build_model
from vidlang.models.temporal import build_block
from vidlang.models.temporal.prompt_switch import FREQUENT_WORDS, frequent_token_ids, group_bounds
from vidlang.models.video_clip import VideoTextModel

CAPTIONS = [
    "a man is talking about the car in the street.",
    "there is a dog on the grass, and that is here.",
    "an orange cat sits on top of this box to sleep.",
    "people are dancing in a hall and the music plays.",
] * 3


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> ClipTokenizer:
    return train_tokenizer(CAPTIONS, tmp_path_factory.mktemp("tok"), vocab_size=300, min_frequency=1, context_length=20)


def _model(vocab: int = 512, seed: int = 0, **block_args) -> VideoTextModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(image="vit_tiny", block="prompt_switch", vocab_size=vocab, block_args=block_args)
    return build_model(cfg)


def _video(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, t, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# -- caption loss -----------------------------------------------------------------------------------------
def test_caption_token_weights_come_from_the_tokenizer(tokenizer):
    model = _model(vocab=tokenizer.vocab_size)
    block = model.block
    assert block.caption_token_weights is None
    block.set_tokenizer(tokenizer)
    w = block.caption_token_weights
    assert w.shape == (tokenizer.vocab_size,)
    frequent = {i for word in FREQUENT_WORDS for i in tokenizer.encode(word)} | {tokenizer.bos_id, tokenizer.eot_id}
    assert all(w[i] == 0.25 for i in frequent)
    others = [i for c in CAPTIONS for i in tokenizer.encode(c) if i not in frequent]
    assert others and all(w[i] == 1.0 for i in others)  # e.g. "man", "dog", "dancing"
    assert int((w == 0.25).sum()) == len(frequent_token_ids(tokenizer))
    assert "weights" not in block._warned
    foreign = _model(vocab=64)  # the tokenizer's ids do not fit this text tower
    with pytest.raises(ValueError, match="outside the text tower's vocabulary of 64"):
        foreign.block.set_tokenizer(tokenizer)


def _openai_tokenizer(out: Path) -> ClipTokenizer:
    """OpenAI CLIP's BPE (open_clip ships the merges) as vocab.json + merges.txt, loaded like an HF CLIP repo."""
    import open_clip.tokenizer as oc

    merges = gzip.open(oc.default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(oc.bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return ClipTokenizer.from_dir(out)


def test_frequent_ids_with_the_openai_vocabulary_are_the_official_ones(tmp_path):
    """The 19 ids the released CaptionLoss weighs 0.25 (HF CLIPTokenizer on its word string)."""
    tok = _openai_tokenizer(tmp_path)
    official = [530, 525, 539, 531, 781, 589, 682, 320, 550, 518, 537, 997, 763, 533, 631, 269, 267, 49406, 49407]
    assert frequent_token_ids(tok) == sorted(official)


def _official_caption_loss(logits: torch.Tensor, ids: torch.Tensor, real: torch.Tensor, eot: int, w: torch.Tensor):
    """The released CaptionLoss, by hand: inputs ``ids[:, :-1]`` that are real and not EOT predict ``ids[:, 1:]``;
    ``sum w_t nll_t / sum w_t`` (PyTorch's ``weight=`` mean), times ``caption_loss_mult`` 0.5."""
    num = den = 0.0
    logp = logits.double().log_softmax(-1)
    for b in range(ids.shape[0]):
        for pos in range(ids.shape[1] - 1):
            if not real[b, pos] or ids[b, pos] == eot:
                continue
            target = ids[b, pos + 1]
            num += -w[target].double() * logp[b, pos, target]
            den += w[target].double()
    return 0.5 * num / den


def test_caption_loss_is_the_weighted_mean_and_its_weight_gives_the_official_product(tokenizer):
    model = _model(vocab=tokenizer.vocab_size, caption_layers=1).train()
    model.block.set_tokenizer(tokenizer)
    ids, mask = tokenizer([CAPTIONS[0], "the dog is here."], context_length=24)
    assert mask[1].sum() < 24  # the second caption is padded
    state = model.caption_state(ids, mask, None, num_videos=2)
    out = model.encode_video(_video(2, 6), state=state)
    with torch.no_grad():  # the head's logits for the same inputs (no dropout)
        tok = model.text_tower.embed_tokens(ids[:, :-1])
        logits = model.block.caption_head(tok, out.frame_embeds)  # [2, 23, vocab]
    w = model.block.caption_token_weights
    expected = _official_caption_loss(logits, ids, mask.bool(), tokenizer.eot_id, w)
    total, weights = weigh_aux_losses(out.aux_losses, model.block.default_aux_weights)
    assert weights == {"caption": 0.5}
    torch.testing.assert_close(total.double(), expected, rtol=1e-5, atol=1e-6)
    # the weights matter: the unweighted mean differs
    model.block.caption_token_weights = torch.ones_like(w)
    unweighted = model.encode_video(_video(2, 6), state=state).aux_losses["caption"]
    assert not torch.allclose(0.5 * unweighted.double(), expected, rtol=1e-3)


def test_caption_loss_without_tokenizer_warns_once_and_is_unweighted():
    model = _model(caption_layers=1).train()
    ids = torch.randint(1, 400, (2, 8))
    ids[:, 6] = 511  # EOT (largest id)
    with pytest.warns(UserWarning, match="set_tokenizer"):
        loss = model.encode_video(_video(2, 3), state={"caption_ids": ids}).aux_losses["caption"]
    assert torch.isfinite(loss) and loss > 0


# -- pooling ------------------------------------------------------------------------------------------------
def test_pooling_normalises_each_frame_then_averages_by_default():
    model = _model().eval()
    assert model.block.pooling == "normalized_mean"
    with torch.no_grad():
        out = model.encode_video(_video(2, 6) * torch.linspace(0.2, 3, 6).view(1, 6, 1, 1, 1))
    f = out.frame_embeds
    assert not torch.allclose(f.norm(dim=-1), f.norm(dim=-1)[:, :1])  # frames of different norms
    torch.testing.assert_close(out.embeds, F.normalize(f, dim=-1).mean(1))
    assert not torch.allclose(out.embeds, f.mean(1))
    plain = _model(pooling="mean").eval()
    with torch.no_grad():
        out = plain.encode_video(_video(2, 6))
    torch.testing.assert_close(out.embeds, out.frame_embeds.mean(1))
    with pytest.raises(ValueError, match="pooling must be one of"):
        _model(pooling="max")


# -- learning rates -------------------------------------------------------------------------------------------
def test_param_groups_train_prompts_and_caption_at_x10_and_the_aggregation_at_the_clip_lr():
    model = _model(vocab=512)
    assert model.lr_mults == {"block": 10.0, "block.aggregate": 1.0}
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {names[id(p)]: g["lr"] for g in model.param_groups(lr=1e-6, weight_decay=0.2) for p in g["params"]}
    assert lr_of["block.prompts"] == pytest.approx(1e-5)
    caption = [n for n in lr_of if n.startswith("block.caption_head.")]
    assert caption and all(lr_of[n] == pytest.approx(1e-5) for n in caption)
    aggregate = [n for n in lr_of if n.startswith("block.aggregate.")]
    assert len(aggregate) == 4 and all(lr_of[n] == pytest.approx(1e-6) for n in aggregate)
    towers = [n for n in lr_of if not n.startswith("block.")]
    assert towers and all(lr_of[n] == pytest.approx(1e-6) for n in towers)  # both towers and logit_scale


# -- frame groups ---------------------------------------------------------------------------------------------
def _active_aggregation(model: VideoTextModel) -> VideoTextModel:
    """Give the zero-initialised aggregation output a non-zero projection, so that it mixes frames."""
    with torch.no_grad():
        torch.nn.init.normal_(model.block.aggregate.out_proj.weight, std=0.5)
    return model.eval()


def test_twelve_frames_are_two_independent_six_frame_groups():
    """Official: the frame count is fixed at the training value (6), so a 12-frame test clip is two 6-frame
    clips (switch and aggregation inside each) joined by the final mean."""
    model = _active_aggregation(_model())
    video = _video(2, 12)
    with torch.no_grad():
        whole = model.encode_video(video)
        first, second = model.encode_video(video[:, :6]), model.encode_video(video[:, 6:])
    torch.testing.assert_close(whole.frame_embeds, torch.cat([first.frame_embeds, second.frame_embeds], 1))
    torch.testing.assert_close(whole.embeds, (first.embeds + second.embeds) / 2)
    # one group per clip (before issue 14): the aggregation crosses the two halves
    across = _active_aggregation(_model(group_frames=0))
    with torch.no_grad():
        mixed = across.encode_video(video)
    assert not torch.allclose(mixed.embeds, whole.embeds, atol=1e-4)


def test_a_partial_last_group_is_independent_too():
    model = _active_aggregation(_model())
    video = _video(1, 8)
    with torch.no_grad():
        whole = model.encode_video(video).frame_embeds
        parts = [model.encode_video(video[:, s:e]).frame_embeds for s, e in ((0, 6), (6, 8))]
    torch.testing.assert_close(whole, torch.cat(parts, 1))


def test_group_frames_must_be_a_multiple_of_num_prompts():
    assert group_bounds(14, 6) == [(0, 6), (6, 12), (12, 14)] and group_bounds(5, 6) == [(0, 5)]
    assert group_bounds(14, 0) == [(0, 14)]
    spec = _model().block.spec
    assert build_block("prompt_switch", spec, num_prompts=3, group_frames=6).group_frames == 6
    with pytest.raises(ValueError, match="multiple of num_prompts"):
        build_block("prompt_switch", spec, num_prompts=4, group_frames=6)
