"""``maple``: MaPLe's coupled prompts (vision prompts = per-layer projections of the text prompts), official placement,
initialisation, gradients, freezing and official checkpoints."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from vidlang.models.clip.tokenizer import train_tokenizer
from vidlang.models.factory import ModelConfig, build_model
from vidlang.models.temporal.maple import MultiModalPrompts
from vidlang.models.video_clip import VideoTextModel

N_CTX, DEPTH = 2, 2  # vit_tiny: 3 image layers, text_tiny: 2 text layers (depth 2 leaves image layer 2 unprompted)


def _model(seed: int = 0, **block_args) -> VideoTextModel:
    torch.manual_seed(seed)
    args = {"n_ctx": N_CTX, "depth": DEPTH, **block_args}
    return build_model(ModelConfig(image="vit_tiny", block="maple", block_args=args)).eval()


def _video(seed: int = 3) -> torch.Tensor:
    return torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))  # [B, T, 3, S, S]


def _captions(a: int = 3, lt: int = 10, seed: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 500, (a, lt), generator=g)
    ids[:, 0] = 510
    mask = torch.ones(a, lt, dtype=torch.long)
    for row, r in enumerate([lt, 6, 4][:a]):
        ids[row, r - 1] = 511  # EOT, the largest id
        ids[row, r:] = 0
        mask[row, r:] = 0
    return ids, mask


def _perturb(model: VideoTextModel, seed: int = 9) -> None:
    """Move every prompt and coupling off its initial value (so equalities below cannot hold by accident)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.block.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_vision_prompts_are_the_projections_of_the_text_prompts_at_every_prompted_layer():
    model = _model()
    _perturb(model)
    block, tower = model.block, model.image_tower
    seen: dict[int, torch.Tensor] = {}
    handles = [
        layer.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].detach().clone()))
        for i, layer in enumerate(tower.layers)
    ]
    with torch.no_grad():
        model.encode_video(_video())
    for h in handles:
        h.remove()
    assert sorted(seen) == [0, 1, 2]
    with torch.no_grad():
        projected = [F.linear(block.text_prompts[i], block.couplings[i].weight, block.couplings[i].bias)
                     for i in range(DEPTH)]  # fmt: skip
        # layer 0 sees the projection after ln_pre (appended before it), deeper prompted layers the projection itself
        torch.testing.assert_close(seen[0][:, -N_CTX:], tower.ln_pre(projected[0]).expand(6, -1, -1))
        torch.testing.assert_close(seen[1][:, -N_CTX:], projected[1].expand(6, -1, -1))
        for i in range(DEPTH):
            torch.testing.assert_close(block.vision_prompt(i), projected[i])
    # layer 2 is beyond the prompt depth: it carries layer 1's outputs, not a fresh projection
    assert seen[2].shape[1] == 1 + 16 + N_CTX
    assert not torch.allclose(seen[2][:, -N_CTX:], projected[1].expand(6, -1, -1), atol=1e-3)
    assert not hasattr(block, "vision_prompts") or block.vision_prompts is None  # no free vision prompts
    names = {n for n, _ in block.named_parameters()}
    assert names == {"text_prompts"} | {f"couplings.{i}.{w}" for i in range(DEPTH) for w in ("weight", "bias")}


def test_official_vision_placement():
    """``VisionTransformer_MaPLe``: proj(ctx) appended after the position embedding, before ``ln_pre``; layer
    ``i = 1 .. depth-1`` replaces the last ``n_ctx`` tokens by its projected compound prompt; ``ln_post(CLS) @ proj``;
    vidlang then averages the frames."""
    model = _model()
    _perturb(model, seed=10)
    sd = model.block.official_state_dict()
    tower, video = model.image_tower, _video()
    with torch.no_grad():
        x, _ = tower.patch_embed(video.flatten(0, 1))
        shared = sd["prompt_learner.ctx"] @ sd["prompt_learner.proj.weight"].T + sd["prompt_learner.proj.bias"]
        x = tower.ln_pre(torch.cat([x, shared.expand(x.shape[0], -1, -1)], dim=1))
        for i, layer in enumerate(tower.layers):
            if 0 < i < DEPTH:
                k = i - 1
                deep = (sd[f"prompt_learner.compound_prompts_text.{k}"]
                        @ sd[f"prompt_learner.compound_prompt_projections.{k}.weight"].T
                        + sd[f"prompt_learner.compound_prompt_projections.{k}.bias"])  # fmt: skip
                x = torch.cat([x[:, :-N_CTX], deep.expand(x.shape[0], -1, -1)], dim=1)
            x = layer(x)
        expected = (tower.ln_post(x[:, 0]) @ tower.proj).view(2, 3, -1).mean(1)
        torch.testing.assert_close(model.encode_video(video).embeds, expected, rtol=1e-5, atol=1e-5)


def test_text_placement_is_vpts_official_one():
    """The text prompts sit exactly where ``vpt``'s do (checked against ViFi-CLIP's / MaPLe's official text
    encoder in tests/test_vpt.py): same prompts -> same text features, for both placements."""
    for placement in ("overwrite", "insert"):
        maple = _model(text_placement=placement)
        _perturb(maple, seed=11)
        torch.manual_seed(0)
        vpt = build_model(ModelConfig(image="vit_tiny", block="vpt", block_args={
            "n_vision": 0, "n_text": N_CTX, "text_depth": DEPTH, "text_placement": placement})).eval()  # fmt: skip
        vpt.load_state_dict({k: v for k, v in maple.state_dict().items() if "couplings" not in k})
        ids, mask = _captions()
        with torch.no_grad():
            torch.testing.assert_close(maple.encode_text(ids, mask).embeds, vpt.encode_text(ids, mask).embeds)


def test_gradients_reach_the_text_prompts_through_both_branches():
    model = _model().train()
    _perturb(model, seed=12)
    block = model.block
    model.encode_video(_video()).embeds.square().sum().backward()  # vision branch only
    from_vision = block.text_prompts.grad.clone()
    assert all(from_vision[i].abs().sum() > 0 for i in range(DEPTH))  # every layer's prompts feed the image tower
    assert all(block.couplings[i].weight.grad.abs().sum() > 0 for i in range(DEPTH))
    model.zero_grad(set_to_none=True)
    ids, mask = _captions()
    model.encode_text(ids, mask).embeds.square().sum().backward()  # text branch only
    from_text = block.text_prompts.grad.clone()
    assert all(from_text[i].abs().sum() > 0 for i in range(DEPTH))
    assert all(c.weight.grad is None for c in block.couplings)  # the couplings only act on the vision side
    assert not torch.allclose(from_text, from_vision)


def test_backbone_frozen_only_the_prompts_and_couplings_train():
    model = _model().train()
    assert model.freeze_policy == "block_only"  # ModelConfig.freeze="auto" + the block's freeze_backbone
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"block.{n}" for n, _ in model.block.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, mask = _captions(a=2)
    out = model(_video(), ids, mask)
    v, t = F.normalize(out.video.embeds, dim=-1), F.normalize(out.text.embeds, dim=-1)
    F.cross_entropy(out.logit_scale * v @ t.T, torch.arange(2)).backward()
    opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    assert not torch.equal(model.block.text_prompts, _model().block.text_prompts)  # the prompts did move


def test_official_initialisation(tmp_path):
    model = _model()
    block = model.block
    assert 0.01 < block.text_prompts.std().item() < 0.03  # N(0, 0.02)
    c = block.couplings  # layer 0's drawn alone; the deeper ones one shared draw (official deep copy)
    assert not torch.equal(c[0].weight, c[1].weight)
    tok = train_tokenizer(["a photo of a cat", "a photo of a dog"] * 4, tmp_path, vocab_size=300, min_frequency=1)
    block.bind_tokenizer(tok, model.text_tower, fresh=True)
    ids, _ = tok(["a photo of a"], N_CTX + 2)
    with torch.no_grad():
        words = model.text_tower.token_embedding(ids[0, 1 : 1 + N_CTX])  # "a photo"
    torch.testing.assert_close(block.text_prompts[0], words)
    defaults = MultiModalPrompts(model.block.spec)
    assert (defaults.n_ctx, defaults.depths, defaults.ctx_init) == (2, (2, 2), "a photo of a")  # min(9, towers)


def test_three_deeper_couplings_start_equal():
    torch.manual_seed(0)
    spec = _model().block.spec
    block = MultiModalPrompts(dataclasses.replace(spec, layers=12, text_layers=12))
    assert block.depths == (9, 9)
    assert all(torch.equal(block.couplings[1].weight, block.couplings[i].weight) for i in range(2, 9))
    assert all(torch.equal(block.couplings[1].bias, block.couplings[i].bias) for i in range(2, 9))
    assert block.couplings[1].weight.data_ptr() != block.couplings[2].weight.data_ptr()  # copies, not shared


def test_official_checkpoint_round_trip_and_mismatches():
    model = _model()
    _perturb(model, seed=13)
    written = model.block.official_state_dict()
    assert set(written) == {
        "prompt_learner.ctx", "prompt_learner.proj.weight", "prompt_learner.proj.bias",
        "prompt_learner.compound_prompts_text.0", "prompt_learner.compound_prompt_projections.0.weight",
        "prompt_learner.compound_prompt_projections.0.bias"}  # fmt: skip
    other = _model(seed=1)
    ckpt = {"state_dict": {"module." + k: v for k, v in written.items()}, "epoch": 5}
    ckpt["state_dict"]["prompt_learner.token_prefix"] = torch.zeros(7, 1, 48)  # class buffers are ignored
    other.block.load_official_state_dict(ckpt)
    for a, b in zip(other.block.parameters(), model.block.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"missing \['prompt_learner.proj.bias'\]"):
        other.block.load_official_state_dict({k: v for k, v in written.items() if k != "prompt_learner.proj.bias"})
    deeper = {**written, "prompt_learner.compound_prompts_text.1": written["prompt_learner.ctx"]}
    with pytest.raises(ValueError, match="prompts the block lacks"):
        other.block.load_official_state_dict(deeper)
    with pytest.raises(ValueError, match=r"prompt_learner.ctx has shape \(2, 5\)"):
        other.block.load_official_state_dict({**written, "prompt_learner.ctx": torch.zeros(2, 5)})


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"maple depth 3 must be in 1..2"):
        _model(depth=3)
    with pytest.raises(ValueError, match="maple depth 0"):
        _model(depth=0)
    with pytest.raises(ValueError, match="n_ctx must be >= 1"):
        _model(n_ctx=0)
