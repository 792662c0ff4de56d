"""M2-CLIP as released (issue 14): TED's frame adapter, text adapter placement / init, difference-path biases,
and the official word-level cross-modal MLM (13th text block), its loss pieces and weights."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vidlang.losses.classification import smooth_one_hot
from vidlang.losses.m2clip import (
    DEFAULT_WEIGHTS,
    M2CLIPMLM,
    OFFICIAL_WEIGHTS,
    CrossModalMLM,
    MLMVocabulary,
    build_mlm_batch,
    choose_masked_words,
    cross_attention,
    cross_modal_ce,
    cross_modal_ce_on_probabilities,
    official_same_label_targets,
    soft_contrastive_kl,
)
from vidlang.models.clip.tokenizer import train_tokenizer
from vidlang.models.contract import HookContext, TowerSpec
from vidlang.models.factory import ModelConfig, build_model
from vidlang.models.temporal import build_block
from vidlang.models.temporal.ted import TED, FrameAdapter, TEDAdapter

SPEC = TowerSpec(width=16, layers=2, heads=2, embed_dim=8, grid=(3, 3), text_width=12, text_layers=2, vocab_size=50)
# ViT-B/16 text side of M2-CLIP (12 layers) with small widths: the layout depends only on the layer count
B16_TEXT = TowerSpec(width=16, layers=2, heads=2, embed_dim=8, grid=(2, 2), text_width=12, text_layers=12)
OFFICIAL = {"text_layers": [-1], "text_position": "mlp", "text_up_init": "random", "diff_bias": True}


# -- frame adapter ----------------------------------------------------------------------------------------------
def test_frame_adapter_shape_params_and_identity():
    adapter = FrameAdapter(512)
    assert adapter.conv.groups == 256 and adapter.conv.kernel_size == (3,)  # depthwise over T, E -> E/2
    assert sum(p.numel() for p in adapter.parameters()) == (512 * 256 + 256) + (256 * 3 + 256) + (256 * 512 + 512)
    torch.manual_seed(0)
    small = FrameAdapter(8)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(small(x), x)  # the zero conv makes it the identity at init
    (small(x) * torch.randn(2, 5, 8)).sum().backward()
    assert small.conv.weight.grad.abs().sum() > 0 and small.conv.bias.grad.abs().sum() > 0


def test_frame_adapter_is_a_local_temporal_affine_map():
    torch.manual_seed(0)
    adapter = FrameAdapter(8)
    for p in adapter.parameters():  # as after training
        nn.init.normal_(p)
    x, y = torch.randn(1, 6, 8), torch.randn(1, 6, 8)
    with torch.no_grad():
        # no activation: affine, f(x + y) + f(0) = f(x) + f(y)
        torch.testing.assert_close(adapter(x + y) + adapter(torch.zeros_like(x)), adapter(x) + adapter(y))
        bumped = x.clone()
        bumped[0, 3] += 1.0
        changed = (adapter(bumped) - adapter(x)).abs().sum(-1)[0] > 1e-6  # kernel 3: frames 2, 3, 4 only
    assert changed.tolist() == [False, False, True, True, True, False]


def test_ted_pools_the_adapted_frames():
    torch.manual_seed(0)
    block = build_block("ted", SPEC)
    without = build_block("ted", SPEC, frame_adapter=False)
    e, r = SPEC.embed_dim, SPEC.embed_dim // 2
    assert block.extra_param_count() - without.extra_param_count() == e * r + r + 3 * r + r + r * e + e
    nn.init.normal_(block.frame_adapter.conv.weight)
    frames = torch.randn(2, 4, e)
    out = block.pool(None, frames, HookContext(batch=2, frames=4))
    expected = block.frame_adapter(frames)
    torch.testing.assert_close(out.frame_embeds, expected)  # what the MLM attends to
    torch.testing.assert_close(out.embeds, expected.mean(1))
    assert not torch.allclose(out.embeds, frames.mean(1))
    assert without.frame_adapter is None
    torch.testing.assert_close(without.pool(None, frames, HookContext(batch=2, frames=4)).embeds, frames.mean(1))


def test_checkpoints_without_the_frame_adapter_load_it_at_identity():
    torch.manual_seed(0)
    old = {k: v for k, v in build_block("ted", SPEC).state_dict().items() if not k.startswith("frame_adapter.")}
    block = build_block("ted", SPEC)
    nn.init.normal_(block.frame_adapter.conv.weight)
    block.load_state_dict(old)  # strict
    frames = torch.randn(2, 4, SPEC.embed_dim)
    torch.testing.assert_close(block.pool(None, frames, HookContext(batch=2, frames=4)).embeds, frames.mean(1))


# -- text adapters ----------------------------------------------------------------------------------------------
def test_official_b16_text_adapter_layout():
    """B/16-12x: one text adapter, before the MLP of text layer 11 (the 13th block's adapter is the MLM's)."""
    torch.manual_seed(0)
    block = build_block("ted", B16_TEXT, text_layers=[11], text_position="mlp", text_up_init="random")
    assert set(block.text_adapters) == {"11"}
    assert set(build_block("ted", B16_TEXT, text_layers=[-1]).text_adapters) == {"11"}
    w, ctx = torch.randn(2, 5, B16_TEXT.text_width), HookContext(batch=2, frames=1)
    assert not torch.allclose(block.text_before_mlp(11, w, ctx), w)  # random up-projection: changes at init
    torch.testing.assert_close(block.text_after_layer(11, w, ctx), w)  # not after the layer
    torch.testing.assert_close(block.text_before_mlp(10, w, ctx), w)
    default = build_block("ted", B16_TEXT)
    assert set(default.text_adapters) == {str(i) for i in range(12)}
    torch.testing.assert_close(default.text_before_mlp(11, w, ctx), w)
    with pytest.raises(ValueError, match="text_position"):
        build_block("ted", B16_TEXT, text_position="attn")
    with pytest.raises(ValueError, match="outside"):
        build_block("ted", B16_TEXT, text_layers=[12])


def test_pre_mlp_text_adapter_inside_the_text_tower():
    """The text tower runs the adapter between attention and MLP of the last layer, exactly."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(image="vit_tiny", block="ted", block_args=OFFICIAL))
    tower, adapter = model.text_tower, model.block.text_adapters["1"]
    ids = torch.randint(1, 500, (3, 7))
    with torch.no_grad():
        out = model.encode_text(ids)
        x = tower.embed_tokens(ids)
        x = tower.layers[0](x, is_causal=True)
        x = tower.layers[1](x, is_causal=True, before_mlp=adapter)
    torch.testing.assert_close(out.hidden, x)  # TextOutput.hidden: the last layer's output before ln_final
    torch.testing.assert_close(out.tokens, tower.ln_final(x) @ tower.text_projection)


def test_text_adapter_up_projection_init():
    torch.manual_seed(0)
    zero = build_block("ted", SPEC).text_adapters["0"]
    rand = build_block("ted", SPEC, text_up_init="random").text_adapters["0"]
    assert (zero.up.weight == 0).all() and (rand.up.weight != 0).all()
    bound = 1 / rand.up.in_features**0.5  # PyTorch's default Linear init (kaiming uniform): |w| <= 1/sqrt(fan_in)
    assert rand.up.weight.abs().max() <= bound and rand.up.weight.std() > bound / 4
    for adapter in (zero, rand):
        assert (adapter.up.bias == 0).all() and (adapter.down.bias == 0).all()  # official zero biases
    with pytest.raises(ValueError, match="up_init"):
        build_block("ted", SPEC, text_up_init="xavier")


def test_difference_path_biases_option():
    torch.manual_seed(0)
    plain, biased = TEDAdapter(SPEC.width, 8), TEDAdapter(SPEC.width, 8, diff_bias=True)
    extra = sum(p.numel() for p in biased.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == 8 + 8 + SPEC.width  # fc1, depthwise conv, fc2 biases
    assert all((layer.bias == 0).all() for layer in (biased.diff_down, biased.diff_conv, biased.diff_up))
    b, t = 2, 4
    static = torch.randn(b, 1, 1 + SPEC.num_patches, SPEC.width).expand(b, t, -1, -1).reshape(b * t, 10, SPEC.width)
    torch.testing.assert_close(biased(static, b, t, SPEC.grid), static)  # identity at init with biases too
    for layer in (biased.diff_down, biased.diff_conv, biased.diff_up):
        nn.init.normal_(layer.bias)
    nn.init.normal_(biased.diff_conv.weight)
    # official: trained biases add a constant offset to the patches of even a static video; bias-free stays 0
    assert biased.difference(static, b, t, SPEC.grid)[:, 1:].abs().sum() > 0
    assert build_block("ted", SPEC, diff_bias=True).adapters["mlp"][0].diff_up.bias is not None


def test_text_adapters_train_at_half_the_lr():
    model = build_model(ModelConfig(image="vit_tiny", block="ted"))
    groups = {g["name"]: g for g in model.param_groups(lr=1e-3, weight_decay=0.01)}
    assert groups["block.text_adapters_decay"]["lr"] == pytest.approx(5e-4)
    assert groups["block_decay"]["lr"] == pytest.approx(1e-3)
    assert isinstance(model.block, TED) and TED.lr_mults == {"": 1.0, "text_adapters": 0.5}


# -- official MLM -----------------------------------------------------------------------------------------------
TEMPLATE = "A video of {}"
CLASSES = ["abseiling", "air drumming", "playing bass guitar on a stage", "zumba"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    prompts = [TEMPLATE.format(c) for c in CLASSES] + ["mask", "a mask"]
    return train_tokenizer(prompts * 4, tmp_path_factory.mktemp("tok"), vocab_size=300, min_frequency=1,
                           context_length=16)


def test_vocabulary_of_prompt_words():
    vocab = MLMVocabulary.from_prompts([TEMPLATE], CLASSES)
    assert vocab.words == sorted({"a", "video", "of", "abseiling", "air", "drumming", "playing", "bass", "guitar",
                                  "on", "stage", "zumba"})
    assert vocab.index("Video") == vocab.words.index("video") and vocab.index("unknown") is None


def test_masked_word_count_and_choice():
    rng = random.Random(0)
    assert [len(choose_masked_words(n, 0.2, rng)) for n in (0, 1, 4, 5, 8, 10, 13)] == [0, 1, 1, 1, 2, 2, 3]
    seen = {i for _ in range(200) for i in choose_masked_words(5, 0.2, rng)}
    assert seen == set(range(5))  # uniform over all words, template words included


def test_build_mlm_batch(tok):
    vocab = MLMVocabulary.from_prompts([TEMPLATE], CLASSES)
    texts = [TEMPLATE.format(c) for c in CLASSES]
    plain = build_mlm_batch(texts, tok, vocab, sample_prob=0.0)
    ids, mask = tok(texts)
    assert torch.equal(plain.input_ids, ids) and torch.equal(plain.attention_mask, mask)  # word by word == whole
    assert (plain.labels == -100).all()
    batch = build_mlm_batch(texts, tok, vocab, rng=random.Random(3))
    mask_id = tok.encode("mask")
    assert len(mask_id) == 1
    for row, text in enumerate(texts):
        words = text.lower().split()
        labelled = (batch.labels[row] != -100).nonzero().flatten().tolist()
        assert len(labelled) == max(1, round(0.2 * len(words)))
        for pos in labelled:
            assert batch.input_ids[row, pos] == mask_id[0]
            assert vocab.words[batch.labels[row, pos]] in words
        assert batch.labels[row, 0] == -100 and batch.input_ids[row, 0] == tok.bos_id
    assert batch.labels[2].ne(-100).sum() == 2  # 8 words: round(1.6)
    # a mask word of several tokens: the label sits on its first token
    long = build_mlm_batch(["a video of zumba"], tok, vocab, mask_word="qqzzx", rng=random.Random(0))
    pieces = tok.encode("qqzzx")
    assert len(pieces) > 1
    pos = (long.labels[0] != -100).nonzero().flatten().tolist()
    assert len(pos) == 1 and long.input_ids[0, pos[0] : pos[0] + len(pieces)].tolist() == pieces
    cut = build_mlm_batch(texts[2:3], tok, vocab, context_length=5, rng=random.Random(0))
    assert cut.input_ids[0, -1] == tok.eot_id and cut.attention_mask.sum() == 5
    with pytest.raises(ValueError, match="sample_prob"):
        build_mlm_batch(texts, tok, vocab, sample_prob=1.5)


def _official_model():
    torch.manual_seed(0)
    cfg = ModelConfig(image="vit_tiny", block="ted", block_args=OFFICIAL, text_overrides={"width": 32, "heads": 4})
    return build_model(cfg)


def test_cross_attention_matches_multihead_attention():
    torch.manual_seed(0)
    layer = _official_model().text_tower.layers[-1]
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    mha.in_proj_weight.data.copy_(layer.attn.qkv.weight)
    mha.in_proj_bias.data.copy_(layer.attn.qkv.bias)
    mha.out_proj.load_state_dict(layer.attn.out_proj.state_dict())
    q, kv = torch.randn(3, 7, 32), torch.randn(3, 4, 32)
    with torch.no_grad():
        torch.testing.assert_close(cross_attention(layer.attn, q, kv), mha(q, kv, kv, need_weights=False)[0])


def test_mlm_head_is_the_frozen_13th_block():
    model = _official_model()
    tower = model.text_tower
    mlm = M2CLIPMLM.from_text_tower(tower, vocab_size=12)  # adapter width min(384, W), as the block's
    src = tower.layers[-1].state_dict()
    assert all(torch.equal(v, src[k]) for k, v in mlm.cross_layer.state_dict().items())
    assert not any(p.requires_grad for p in [*mlm.cross_layer.parameters(), *mlm.final_norm.parameters()])
    assert mlm.decoder.bias is None and mlm.transform[2].eps == 1e-12 and isinstance(mlm.transform[1], nn.GELU)
    assert 0.01 < mlm.decoder.weight.std() < 0.03 and (mlm.bias == 0).all()
    mlm.copy_adapter_from(model.block.text_adapters["1"])
    assert torch.equal(mlm.adapter.up.weight, model.block.text_adapters["1"].up.weight)
    hidden, frames = torch.randn(2, 6, 32), torch.randn(2, 3, 32)
    layer = mlm.cross_layer
    with torch.no_grad():
        logits = mlm(hidden, frames)
        x = hidden + cross_attention(layer.attn, layer.ln_1(hidden), layer.ln_1(frames))
        x = mlm.adapter(x)  # pre-MLP
        x = x + layer.mlp(layer.ln_2(x))
        expected = mlm.decoder(mlm.transform(tower.ln_final(x))) + mlm.bias
        other = mlm(hidden, frames.flip(0))
    assert logits.shape == (2, 6, 12)
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits, other)  # the words see the video
    with pytest.raises(ValueError, match="text width"):
        mlm(hidden, torch.randn(2, 3, 16))


def test_mlm_end_to_end_gradients_and_no_nan(tok):
    model = _official_model().train()
    vocab = MLMVocabulary.from_prompts([TEMPLATE], CLASSES)
    mlm = M2CLIPMLM.from_text_tower(model.text_tower, vocab_size=len(vocab), bottleneck=8)
    batch = build_mlm_batch([TEMPLATE.format(c) for c in CLASSES[:2]], tok, vocab, context_length=24,
                            rng=random.Random(0))
    video = model.encode_video(torch.randn(2, 3, 3, 32, 32))
    text = model.encode_text(batch.input_ids, batch.attention_mask)
    loss = mlm.loss(text.hidden, video.frame_embeds, batch.labels)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    for name in ("block.frame_adapter.conv.weight", "block.text_adapters.1.up.weight"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name
    assert mlm.adapter.up.weight.grad.abs().sum() > 0 and mlm.decoder.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in mlm.cross_layer.parameters())
    # nothing masked (the released code's case): zero, not NaN, and a zero gradient
    mlm.zero_grad()
    empty = mlm.loss(text.hidden.detach(), video.frame_embeds.detach(), torch.full_like(batch.labels, -100))
    empty.backward()
    assert empty.item() == 0.0 and all(torch.isfinite(p.grad).all() for p in mlm.parameters() if p.grad is not None)
    legacy = CrossModalMLM(32, 7)(torch.randn(2, 5, 32), torch.randn(2, 3, 32))
    assert legacy.shape == (2, 5, 7)
    assert CrossModalMLM(32, 7).loss(torch.randn(2, 5, 32), torch.randn(2, 3, 32), torch.full((2, 5), -100)) == 0


def test_official_loss_pieces():
    assert OFFICIAL_WEIGHTS == {"contrastive": 0.5, "cross_modal": 0.5, "head": 1.0, "mlm": 0.1}
    assert DEFAULT_WEIGHTS == {"contrastive": 1.0, "cross_modal": 1.0, "head": 1.0, "mlm": 0.1}
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    onehot = smooth_one_hot(labels, 5)
    assert cross_modal_ce_on_probabilities(logits, onehot).item() == pytest.approx(
        F.cross_entropy(logits.softmax(-1), labels).item(), abs=1e-6)
    assert cross_modal_ce(logits, onehot).item() == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-6)
    soft = official_same_label_targets(labels)
    e10 = torch.exp(torch.tensor(10.0))
    assert soft[0, 0].item() == pytest.approx((e10 / (2 * e10 + 4)).item())  # softmax(10 * same) of row 0
    assert soft[1, 0].item() == pytest.approx((1 / (e10 + 5)).item())
    sims = torch.randn(6, 6)
    kl = soft_contrastive_kl(sims, onehot, soft=soft)
    ref = 0.5 * (F.kl_div(F.log_softmax(sims, 1), soft, reduction="batchmean")
                 + F.kl_div(F.log_softmax(sims.t(), 1), soft, reduction="batchmean"))
    assert kl.item() == pytest.approx(ref.item(), abs=1e-6)
