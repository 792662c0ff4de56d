"""ILA's ``video_prompts`` (issue 21 parity): the K400 code's X-CLIP prompt generator, never optimised there, so
frozen here (buffers): no optimizer updates under any freeze policy, gradients through it to the video side, the
same modules as ``xclip``, checkpoints, and the recognition task's video-specific class embeddings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vidlang.models.contract import TowerSpec, VideoOutput
from vidlang.models.factory import ModelConfig, build_model
from vidlang.models.temporal import build_block
from vidlang.models.temporal.video_prompts import VideoPromptGenerator
from vidlang.models.temporal.xclip import XCLIP
from vidlang.models.video_clip import VideoTextModel

SPEC = TowerSpec(width=16, layers=2, heads=2, embed_dim=8, grid=(3, 3), text_width=12, text_layers=2, vocab_size=50)
GENERATOR = ("block.generator.", "block.visual_ln.", "block.visual_proj")


def _model(seed: int = 0, freeze: str = "auto", **args) -> VideoTextModel:
    torch.manual_seed(seed)
    return build_model(ModelConfig(image="vit_tiny", block="ila", block_args={"video_prompts": True, **args},
                                   freeze=freeze, num_frames=3))  # fmt: skip


def _video(b: int = 2, t: int = 3, seed: int = 3) -> torch.Tensor:
    return torch.randn(b, t, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _perturb(model: VideoTextModel, seed: int = 9) -> None:
    """Every ILA parameter off its (partly zero) init, so that the alignment acts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.block.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_off_by_default_no_generator_no_text_conditioning():
    block = build_block("ila", SPEC)
    assert not block.conditions_text and block.token_dim is None
    assert not any(k.startswith(("generator.", "visual_")) for k in block.state_dict())
    with pytest.raises(NotImplementedError, match="conditions_text"):
        block.condition_text(torch.randn(3, 8), VideoOutput(embeds=torch.randn(2, 8)))


def test_video_prompts_has_xclips_modules_as_frozen_buffers():
    block = build_block("ila", SPEC, video_prompts=True, prompt_layers=3, prompt_alpha=0.2)
    xclip = build_block("xclip", SPEC, prompt_layers=3)
    assert block.conditions_text and block.token_dim == SPEC.embed_dim
    assert isinstance(block.generator, VideoPromptGenerator) and isinstance(xclip, XCLIP)
    assert type(block.generator) is type(xclip.generator) and len(block.generator.layers) == 3
    ours = {k: v.shape for k, v in block.state_dict().items() if k.startswith(("generator.", "visual_"))}
    theirs = {k: v.shape for k, v in xclip.state_dict().items() if k.startswith(("generator.", "visual_"))}
    assert ours == theirs  # the same names and shapes as xclip's (one converter rule set)
    assert not any(n.startswith(("generator.", "visual_")) for n, _ in block.named_parameters())
    assert torch.equal(block.generator.alpha, torch.full((8,), 0.2))
    assert 0.8 < block.visual_proj.std() < 1.2  # torch.randn, as the code's prompts_visual_proj


@pytest.mark.parametrize("freeze", ["auto", "full", "frozen_text", "frozen_backbone", "block_only"])
def test_frozen_generator_gets_no_optimizer_updates(freeze: str):
    model = _model(freeze=freeze).train()
    _perturb(model)
    state = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(GENERATOR)}
    assert len(state) > 10 and not any(n.startswith(GENERATOR) for n, _ in model.named_parameters())
    groups = model.param_groups(lr=1e-2, weight_decay=0.1)
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert not any(id(t) in in_groups for t in model.block.buffers())
    opt = torch.optim.AdamW(groups)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    video = _video()
    text = torch.randn(4, model.embed_dim, generator=torch.Generator().manual_seed(5))  # [K, E] class features
    for _ in range(2):
        out = model.encode_video(video)
        cls = F.normalize(model.block.condition_text(text, out), dim=-1)  # [B, K, E]
        logits = 10 * torch.einsum("be,bke->bk", F.normalize(out.embeds, dim=-1), cls)
        F.cross_entropy(logits, torch.tensor([0, 2])).backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert any(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)


def test_gradients_pass_through_the_frozen_generator_to_the_video_side():
    """The code's class logits back-propagate through the (unoptimised) generator into the visual tokens."""
    model = _model(pool="mit").train()
    _perturb(model)
    out = model.encode_video(_video())
    text = torch.randn(4, model.embed_dim, generator=torch.Generator().manual_seed(5))
    model.block.condition_text(text, out).square().sum().backward()  # through the tokens only, not the embeds
    last = model.block.layers[-1]
    assert last.skip_fc.weight.grad is not None and last.skip_fc.weight.grad.abs().sum() > 0
    assert model.block.pooler.frame_position_embedding.grad is None  # the MIT is on the embeds path only


def test_tokens_and_checkpoint_round_trip(tmp_path):
    model = _model().eval()
    _perturb(model)
    video, text = _video(), torch.randn(3, 32)
    torch.save(model.state_dict(), tmp_path / "ila.pt")
    fresh = _model(seed=1).eval()
    with torch.no_grad():
        out = model.encode_video(video)
        assert out.tokens.shape == (2, 16, model.embed_dim)  # [B, N, E]: 4x4 patches of the tiny tower
        before = fresh.block.condition_text(text, fresh.encode_video(video))
        fresh.load_state_dict(torch.load(tmp_path / "ila.pt", weights_only=True))
        a, b = model.block.condition_text(text, out), fresh.block.condition_text(text, fresh.encode_video(video))
    assert not torch.allclose(before, b)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    plain = build_model(ModelConfig(image="vit_tiny", block="ila", num_frames=3))
    with pytest.raises(RuntimeError, match="generator"):
        plain.load_state_dict(torch.load(tmp_path / "ila.pt", weights_only=True))


def test_recognition_scores_each_video_against_its_generator_class_features(tmp_path):
    from vidlang.models.clip.tokenizer import train_tokenizer
    from vidlang.tasks.recognition import RecognitionTask

    classes = ["archery", "baking cookies", "cartwheeling"]
    train_tokenizer(classes * 4, tmp_path / "tok", vocab_size=300, min_frequency=1, context_length=16)
    torch.manual_seed(0)
    cfg = ModelConfig(image="vit_tiny", num_frames=3, block="ila", block_args={"video_prompts": True})
    task = RecognitionTask(cfg, tokenizer=str(tmp_path / "tok"), class_names=classes, templates=["{}"],
                           mix={"mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0}).eval()  # fmt: skip
    video = _video(b=2)
    with torch.no_grad():
        text = task.class_embeddings(classes)  # [K, E] unnormalised: the generator's input
        out = task.model.encode_video(video)
        emb = F.normalize(out.embeds, dim=-1)
        logits = task.text_logits(out, emb, text)  # [B, K]
        cls = F.normalize(task.model.block.condition_text(text, out), dim=-1)
        torch.testing.assert_close(logits, task.scale * torch.einsum("be,bke->bk", emb, cls))
        shared = task.scale * emb @ F.normalize(text, dim=-1).T
    assert not torch.allclose(logits, shared, atol=1e-4)
