"""``vpt`` as ViFi-CLIP's official vision-language prompting: text placement, official checkpoints, ctx init."""

from __future__ import annotations

import pytest
import torch

from vidlang.models.clip.tokenizer import train_tokenizer
from vidlang.models.factory import ModelConfig, build_model
from vidlang.models.video_clip import VideoTextModel

N_VIS, N_TXT = 3, 4
BOS, EOT = 510, 511  # text_tiny: vocabulary 512, EOT the largest id (what the official argmax pooling finds)


def _model(seed: int = 0, **block_args) -> VideoTextModel:
    torch.manual_seed(seed)
    args = {"n_vision": N_VIS, "n_text": N_TXT, "depth": 2, "text_depth": 2, **block_args}
    return build_model(ModelConfig(image="vit_tiny", block="vpt", block_args=args)).eval()


def _official_checkpoint(model: VideoTextModel, seed: int = 5) -> dict:
    """A ViFi-CLIP training checkpoint's layout: DDP names under 'model', prompts plus class buffers."""
    g = torch.Generator().manual_seed(seed)
    c, w = model.image_tower.cfg.width, model.text_tower.cfg.width
    sd = {
        "module.prompt_learner.ctx": torch.randn(N_TXT, w, generator=g),
        "module.prompt_learner.token_prefix": torch.randn(7, 1, w, generator=g),  # class-dependent, ignored
        "module.text_encoder.transformer.resblocks.1.VPT_shallow": torch.randn(N_TXT, w, generator=g),
        "module.image_encoder.VPT": torch.randn(N_VIS, c, generator=g),
        "module.image_encoder.transformer.resblocks.1.VPT_shallow": torch.randn(N_VIS, c, generator=g),
        "module.logit_scale": torch.tensor(4.6),
    }
    return {"model": sd, "epoch": 3}


def _captions(lengths: list[int], lt: int, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """``[A, lt]`` ids ``BOS words EOT 0...`` with ``lengths`` real tokens, and the attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), lt, dtype=torch.long)
    mask = torch.zeros(len(lengths), lt, dtype=torch.long)
    for row, r in enumerate(lengths):
        words = torch.randint(1, 500, (r - 2,), generator=g)
        ids[row, :r] = torch.cat([torch.tensor([BOS]), words, torch.tensor([EOT])])
        mask[row, :r] = 1
    return ids, mask


def _official_text_features(model: VideoTextModel, ctx: dict, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hand-written reference of ViFi-CLIP's ``VLPromptLearner`` + ``TextEncoder`` forward: each caption is
    tokenised behind ``n`` placeholder words ("X X X X words.") to the context length (cut to fit, EOT last);
    the placeholders' token embeddings are overwritten by ``prompt_learner.ctx``; ``+ positional_embedding``;
    text layer ``i >= 1`` first replaces positions ``1..n`` by its ``VPT_shallow``; causal mask only; feature at
    the argmax id (EOT) after ``ln_final``, ``@ text_projection``."""
    tower = model.text_tower
    context = tower.positional_embedding.shape[0]
    feats = []
    for row in range(ids.shape[0]):
        r = int(mask[row].sum())
        words = ids[row, 1 : r - 1][: context - N_TXT - 2]
        prompt = torch.zeros(context, dtype=torch.long)
        seq = torch.cat([torch.tensor([BOS]), torch.full((N_TXT,), 7), words, torch.tensor([EOT])])
        prompt[: len(seq)] = seq
        x = tower.token_embedding(prompt)  # [context, W]
        x = torch.cat([x[:1], ctx["prompt_learner.ctx"], x[1 + N_TXT :]]) + tower.positional_embedding
        x = x[None]
        for i, layer in enumerate(tower.layers):
            deep = f"text_encoder.transformer.resblocks.{i}.VPT_shallow"
            if deep in ctx:
                x = torch.cat([x[:, :1], ctx[deep][None], x[:, 1 + N_TXT :]], dim=1)
            x = layer(x, is_causal=True)
        x = tower.ln_final(x)
        feats.append(x[0, prompt.argmax()] @ tower.text_projection)
    return torch.stack(feats)


def _strip(sd: dict) -> dict:
    return {k.removeprefix("module."): v for k, v in sd["model"].items()}


def test_official_prompts_give_the_official_text_features():
    model = _model()
    assert model.block.text_placement == "overwrite"  # the official placement is the default
    ckpt = _official_checkpoint(model)
    model.block.load_official_state_dict(ckpt)
    ids, mask = _captions([5, 9, 3], lt=12)
    with torch.no_grad():
        out = model.encode_text(ids, mask)
        expected = _official_text_features(model, _strip(ckpt), ids, mask)
    torch.testing.assert_close(out.embeds, expected, rtol=1e-5, atol=1e-5)
    assert out.tokens.shape == (3, 12, model.embed_dim)
    inserted = _model(text_placement="insert")  # vidlang's own placement: same layout, other positions
    inserted.load_state_dict(model.state_dict())
    with torch.no_grad():
        other = inserted.encode_text(ids, mask).embeds
    assert not torch.allclose(other, expected, atol=1e-3)


def test_captions_too_long_for_the_prompt_are_cut_keeping_eot():
    model = _model()
    ckpt = _official_checkpoint(model, seed=6)
    model.block.load_official_state_dict(ckpt)
    context = model.text_tower.positional_embedding.shape[0]  # 24
    ids, mask = _captions([context, context - N_TXT, 6], lt=context)  # 24 and 20 real tokens do not fit with 4
    with torch.no_grad():
        out = model.encode_text(ids, mask)
        expected = _official_text_features(model, _strip(ckpt), ids, mask)
    torch.testing.assert_close(out.embeds, expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out.tokens).all() and out.tokens.shape == (3, context, model.embed_dim)


def test_official_prompts_give_the_official_video_features():
    """ViFi-CLIP ``VisionTransformer``: ``VPT`` appended after the position embedding, before ``ln_pre``; layer
    ``i >= 1`` replaces the last ``n`` tokens by its ``VPT_shallow``; ``ln_post(CLS) @ proj``; mean over frames."""
    model = _model()
    ckpt = _official_checkpoint(model, seed=7)
    model.block.load_official_state_dict(ckpt)
    sd = _strip(ckpt)
    video = torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    tower = model.image_tower
    with torch.no_grad():
        x, _ = tower.patch_embed(video.flatten(0, 1))  # conv1, class + position embedding
        x = tower.ln_pre(torch.cat([x, sd["image_encoder.VPT"].expand(x.shape[0], -1, -1)], dim=1))
        for i, layer in enumerate(tower.layers):
            deep = f"image_encoder.transformer.resblocks.{i}.VPT_shallow"
            if deep in sd:
                x = torch.cat([x[:, :-N_VIS], sd[deep].expand(x.shape[0], -1, -1)], dim=1)
            x = layer(x)
        expected = (tower.ln_post(x[:, 0]) @ tower.proj).view(2, 3, -1).mean(1)
        torch.testing.assert_close(model.encode_video(video).embeds, expected, rtol=1e-5, atol=1e-5)


def test_official_checkpoints_round_trip_and_mismatches_are_refused():
    model = _model()
    ckpt = _official_checkpoint(model)
    model.block.load_official_state_dict(ckpt)
    written = model.block.official_state_dict()
    stripped = _strip(ckpt)
    assert set(written) == {k for k in stripped if "VPT" in k or k == "prompt_learner.ctx"}
    assert all(torch.equal(written[k], stripped[k]) for k in written)
    other = _model(seed=1)
    other.block.load_official_state_dict(written)  # a plain state dict without 'model' / 'module.' works too
    assert torch.equal(other.block.text_prompts, model.block.text_prompts)
    with pytest.raises(ValueError, match=r"missing \['image_encoder.VPT'\]"):
        other.block.load_official_state_dict({k: v for k, v in written.items() if k != "image_encoder.VPT"})
    deeper = {**written, "text_encoder.transformer.resblocks.2.VPT_shallow": written["prompt_learner.ctx"]}
    with pytest.raises(ValueError, match="prompts the block lacks"):
        other.block.load_official_state_dict(deeper)
    with pytest.raises(ValueError, match=r"prompt_learner.ctx has shape \(4, 5\)"):
        other.block.load_official_state_dict({**written, "prompt_learner.ctx": torch.zeros(4, 5)})


def test_text_context_init_words_only_up_to_four_vectors(tmp_path):
    tok = train_tokenizer(["a photo of a cat", "a photo of a dog"] * 4, tmp_path, vocab_size=300, min_frequency=1)
    four = _model(n_text=4)
    assert four.block.init_text_context(tok, four.text_tower)
    ids, _ = tok(["a photo of a"], 6)
    with torch.no_grad():
        words = four.text_tower.token_embedding(ids[0, 1:5])
    torch.testing.assert_close(four.block.text_prompts[0], words)
    ten = _model(n_text=10)
    before = ten.block.text_prompts.detach().clone()
    assert not ten.block.init_text_context(tok, ten.text_tower)  # official: n_ctx > 4 ignores the init words
    assert torch.equal(ten.block.text_prompts, before)
    assert 0.015 < before.std().item() < 0.025  # N(0, 0.02)
    assert not _model(n_text=4, ctx_init=None).block.init_text_context(tok, four.text_tower)


def test_bad_placement_and_context():
    with pytest.raises(ValueError, match="text_placement must be one of"):
        _model(text_placement="append")
    with pytest.raises(ValueError, match="exceed the context length 24"):
        _model(n_text=23)
    assert _model(n_text=23, text_placement="insert").block.n_text == 23
