"""``xclip`` (X-CLIP): the forward against a hand-written re-statement of the official one (``microsoft/VideoX``
X-CLIP ``models/cct.py`` / ``mit.py`` / ``prompt.py`` / ``xclip.py``), cross-frame communication, the official
initialisation, gradients, checkpoints and the recognition task's video-specific class embeddings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vidlang.models.clip.tokenizer import train_tokenizer
from vidlang.models.factory import ModelConfig, build_model
from vidlang.models.temporal.xclip import XCLIP
from vidlang.models.video_clip import VideoTextModel
from vidlang.tasks.recognition import RecognitionTask

CLASSES = ["archery", "baking cookies", "cartwheeling", "dancing ballet"]
WIDE = {"image_overrides": {"embed_dim": 128}, "text_overrides": {"embed_dim": 128}}  # E = 128: 2 prompt/MIT heads


def _model(seed: int = 0, **kw) -> VideoTextModel:
    torch.manual_seed(seed)
    return build_model(ModelConfig(image="vit_tiny", block="xclip", freeze="frozen_text", **kw)).eval()


def _video(b: int = 2, t: int = 4, seed: int = 3) -> torch.Tensor:
    return torch.randn(b, t, 3, 32, 32, generator=torch.Generator().manual_seed(seed))  # [B, T, 3, S, S]


def _perturb(model: VideoTextModel, seed: int = 9, scale: float = 0.05) -> None:
    """Move every block parameter off its initial value (so equalities cannot hold by accident)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.block.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("xclip_tok") / "tok"
    train_tokenizer([*CLASSES, *[f"a video of {c}" for c in CLASSES]] * 4, out, vocab_size=300, min_frequency=1,
                    context_length=16)
    return out


def _task(tokenizer_dir, seed: int = 0, **model) -> RecognitionTask:
    torch.manual_seed(seed)
    cfg = ModelConfig(image="vit_tiny", num_frames=4, block="xclip", freeze="frozen_text", **model)
    return RecognitionTask(cfg, tokenizer=str(tokenizer_dir), class_names=CLASSES, templates=["{}"],
                           mix={"mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0})


# -- a re-statement of the official forward (sequence-first tensors, as the official code) ------------------------
def _mha(x_q, x_kv, heads, w_in, b_in, w_out, b_out):
    """``nn.MultiheadAttention`` (sequence-first ``[L, N, C]``) with the given weights."""
    return F.multi_head_attention_forward(
        x_q, x_kv, x_kv, x_q.shape[-1], heads, w_in, b_in, None, None, False, 0.0, w_out, b_out,
        training=False, need_weights=False)[0]  # fmt: skip


def _official_video(model: VideoTextModel, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``XCLIP.encode_video`` + the frame mean of the visual tokens: (video features [B, E], tokens [B, N, E])."""
    tower, blk = model.image_tower, model.block
    b, t = video.shape[:2]
    x = tower.conv1(video.flatten(0, 1)).flatten(2).permute(0, 2, 1)  # [BT, N, C]
    x = torch.cat([tower.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
    x = tower.ln_pre(x + tower.positional_embedding).permute(1, 0, 2)  # [L, BT, C]
    for layer, msg in zip(tower.layers, blk.messages, strict=True):  # CrossFramelAttentionBlock.forward
        n_tok, _, d = x.shape
        x = x.view(n_tok, b, t, d)
        m = F.linear(x[0], msg.fc.weight, msg.fc.bias).view(b, t, 1, d).permute(1, 2, 0, 3).reshape(t, b, d)
        mn = F.layer_norm(m, (d,), msg.ln.weight, msg.ln.bias)
        m = m + _mha(mn, mn, msg.attn.num_heads, msg.attn.in_proj_weight, msg.attn.in_proj_bias,
                     msg.attn.out_proj.weight, msg.attn.out_proj.bias)  # fmt: skip
        m = m.view(t, 1, b, d).permute(1, 2, 0, 3)  # [1, b, T, d]
        x = torch.cat([x, m], dim=0).view(n_tok + 1, -1, d)
        h = F.layer_norm(x, (d,), layer.ln_1.weight, layer.ln_1.bias)
        x = x + _mha(h, h, layer.attn.heads, layer.attn.qkv.weight, layer.attn.qkv.bias, layer.attn.out_proj.weight,
                     layer.attn.out_proj.bias)  # fmt: skip
        x = x[:n_tok]
        x = x + layer.mlp(F.layer_norm(x, (d,), layer.ln_2.weight, layer.ln_2.bias))
    x = x.permute(1, 0, 2)  # [BT, L, C]
    cls = (tower.ln_post(x[:, 0]) @ tower.proj).view(b, t, -1)  # [B, T, E]
    img = F.layer_norm(x[:, 1:], (x.shape[-1],), blk.visual_ln.weight, blk.visual_ln.bias) @ blk.visual_proj
    img = img.view(b, t, -1, cls.shape[-1]).mean(dim=1)  # [B, N, E]
    mit = blk.mit  # MultiframeIntegrationTransformer.forward
    y = (cls + mit.frame_position_embedding[:t]).permute(1, 0, 2)  # [T, B, E]
    for layer in mit.layers:
        e = y.shape[-1]
        h = F.layer_norm(y, (e,), layer.ln_1.weight, layer.ln_1.bias)
        y = y + _mha(h, h, layer.attn.heads, layer.attn.qkv.weight, layer.attn.qkv.bias, layer.attn.out_proj.weight,
                     layer.attn.out_proj.bias)  # fmt: skip
        y = y + layer.mlp(F.layer_norm(y, (e,), layer.ln_2.weight, layer.ln_2.bias))
    return (y.permute(1, 0, 2) + cls).mean(dim=1), img


def _official_prompts(blk: XCLIP, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """``VideoSpecificPrompt.forward(text [B, K, E], visual [B, N, E])``."""
    gen = blk.generator
    visual = F.layer_norm(visual, visual.shape[-1:], gen.norm.weight, gen.norm.bias)
    for layer in gen.layers:
        a = layer.cross_attn
        q = F.layer_norm(text, text.shape[-1:], layer.norm1.weight, layer.norm1.bias)
        bq, n, c = q.shape
        h = a.heads
        qh = (q @ a.q.weight.T).reshape(bq, n, h, c // h).permute(0, 2, 1, 3)
        kh = (visual @ a.k.weight.T).reshape(bq, -1, h, c // h).permute(0, 2, 1, 3)
        vh = (visual @ a.v.weight.T).reshape(bq, -1, h, c // h).permute(0, 2, 1, 3)
        attn = ((qh @ kh.transpose(-2, -1)) * (c // h) ** -0.5).softmax(dim=-1)
        text = text + F.linear((attn @ vh).transpose(1, 2).reshape(bq, n, c), a.out.weight, a.out.bias)
        text = text + layer.mlp(F.layer_norm(text, text.shape[-1:], layer.norm2.weight, layer.norm2.bias))
    return gen.alpha * text


def _official_logits(model: VideoTextModel, video: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``XCLIP.forward`` with precomputed text features ``text [K, E]`` -> logits ``[B, K]``."""
    vid, img = _official_video(model, video)
    tf = text.unsqueeze(0).expand(video.shape[0], -1, -1)
    tf = tf + _official_prompts(model.block, tf, img)
    vid, tf = vid / vid.norm(dim=-1, keepdim=True), tf / tf.norm(dim=-1, keepdim=True)
    return torch.einsum("bd,bkd->bk", vid, model.logit_scale.exp() * tf)


# -- tests -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [{}, WIDE], ids=["E32", "E128"])
def test_forward_matches_the_official_restatement(overrides):
    model = _model(**overrides)
    _perturb(model)
    video = _video()
    text = torch.randn(5, model.embed_dim, generator=torch.Generator().manual_seed(5))  # [K, E] unnormalised
    with torch.no_grad():
        out = model.encode_video(video)
        vid, img = _official_video(model, video)
        torch.testing.assert_close(out.embeds, vid, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.tokens, img, rtol=1e-5, atol=1e-4)
        conditioned = model.block.condition_text(text, out)  # [B, K, E]
        expected = text.unsqueeze(0) + _official_prompts(model.block, text.expand(2, -1, -1), img)
        torch.testing.assert_close(conditioned, expected, rtol=1e-5, atol=1e-5)
        logits = model.logit_scale.exp() * torch.einsum(
            "be,bke->bk", F.normalize(out.embeds, dim=-1), F.normalize(conditioned, dim=-1))
        torch.testing.assert_close(logits, _official_logits(model, video, text), rtol=1e-5, atol=1e-4)


def test_message_tokens_carry_information_across_frames():
    """Changing frame 1 changes frame 0's CLS output of the image tower (before any pooling); without the message
    tokens (the ``mean`` block) frame 0 is untouched."""
    video = _video(b=1, t=3)
    other = video.clone()
    other[:, 1] = torch.randn(other[:, 1].shape, generator=torch.Generator().manual_seed(11))
    for block, moves in (("xclip", True), ("mean", False)):
        torch.manual_seed(0)
        model = build_model(ModelConfig(image="vit_tiny", block=block)).eval()
        with torch.no_grad():
            a = model.image_tower(video, model.block).frame_embeds  # [1, T, E]
            b = model.image_tower(other, model.block).frame_embeds
        assert torch.equal(a[:, 2], b[:, 2]) is not moves, block
        assert (a[:, 0] - b[:, 0]).abs().max() > 1e-4 if moves else torch.equal(a[:, 0], b[:, 0])


def test_messages_are_appended_for_the_attention_only():
    """Each layer's attention sees 1+N+1 tokens, its MLP and the next layer the original 1+N."""
    model = _model()
    seen: dict[str, list[int]] = {"attn": [], "mlp": []}
    handles = []
    for layer in model.image_tower.layers:
        handles.append(layer.attn.register_forward_pre_hook(lambda m, a: seen["attn"].append(a[0].shape[1])))
        handles.append(layer.mlp.register_forward_pre_hook(lambda m, a: seen["mlp"].append(a[0].shape[1])))
    with torch.no_grad():
        model.encode_video(_video())
    for h in handles:
        h.remove()
    assert seen == {"attn": [18, 18, 18], "mlp": [17, 17, 17]}  # 1 CLS + 16 patches (+ 1 message)


def test_official_initialisation():
    model = _model(**WIDE)
    blk, e, c = model.block, 128, 64
    assert torch.equal(blk.generator.alpha, torch.full((e,), 0.1))
    for name, p in blk.generator.named_parameters():
        if name.endswith("weight") and p.ndim == 2:  # timm's trunc_normal_(std=0.02): cut at +-2 (absolute)
            assert 0.018 < p.std() < 0.022 and p.mean().abs() < 0.002, name
        elif "norm" in name:
            assert torch.equal(p, torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)), name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
    assert 0.95 < blk.visual_proj.std() < 1.05 and blk.visual_proj.shape == (c, e)  # torch.randn
    assert torch.equal(blk.visual_ln.weight, torch.ones(c)) and torch.equal(blk.visual_ln.bias, torch.zeros(c))
    pe = blk.mit.frame_position_embedding
    assert 0.015 < pe.std() < 0.025
    for msg in blk.messages:  # PyTorch defaults: Linear kaiming-uniform (bound 1/sqrt(C)), MHA zero in/out biases
        assert msg.fc.weight.abs().max() <= c**-0.5 and msg.fc.weight.std() > 0.05
        assert torch.equal(msg.attn.in_proj_bias, torch.zeros(3 * c)) and torch.equal(msg.attn.out_proj.bias,
                                                                                         torch.zeros(c))
    assert not XCLIP.zero_init_identity and XCLIP.lr_mults == {"": 10.0} and blk.conditions_text is True


def test_at_init_the_class_features_are_the_plain_ones_plus_a_tenth_of_the_generator():
    """text_b = text + 0.1 * layers(text): with alpha = 0 exactly the class feature; at init close to 1.1 x it."""
    model = _model(**WIDE)
    video, text = _video(), torch.randn(4, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model.encode_video(video)
        cond = model.block.condition_text(text, out)
        cos = F.cosine_similarity(cond, text.expand(2, -1, -1), dim=-1)
        assert (cos > 0.99).all() and not torch.allclose(cond[0], cond[1])  # video-specific, close to the text
        model.block.generator.alpha.zero_()
        torch.testing.assert_close(model.block.condition_text(text, out), text.expand(2, -1, -1))


def test_frozen_text_policy_and_lr_groups():
    model = _model()
    assert all(not p.requires_grad for p in model.text_tower.parameters()) and not model.logit_scale.requires_grad
    assert all(p.requires_grad for p in model.image_tower.parameters())
    assert all(p.requires_grad for p in model.block.parameters())
    groups = model.param_groups(lr=1e-5, weight_decay=1e-3)
    by_param = {id(p): g for g in groups for p in g["params"]}
    for name, p in model.block.named_parameters():
        g = by_param[id(p)]
        assert g["lr"] == pytest.approx(1e-4), name
        decays = p.ndim >= 2 and "embedding" not in name  # official: only positional_embedding skipped
        assert (g["weight_decay"] > 0) is decays, name
    assert all(by_param[id(p)]["lr"] == pytest.approx(1e-5) for p in model.image_tower.parameters())


def test_gradients_reach_every_new_module_through_the_recognition_loss(tokenizer_dir):
    task = _task(tokenizer_dir).train()
    batch = {"video": _video(b=3), "label": torch.tensor([0, 2, 3])}
    loss, parts = task.forward_loss(batch)
    loss.backward()
    assert set(parts) == {"ce"} and torch.isfinite(loss)
    model = task.model
    missing = [n for n, p in model.block.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert all(p.grad is not None for p in model.image_tower.parameters())
    assert all(p.grad is None for p in model.text_tower.parameters()) and model.logit_scale.grad is None


def test_recognition_logits_use_video_specific_class_embeddings(tokenizer_dir):
    task = _task(tokenizer_dir, **WIDE).eval()
    _perturb(task.model, scale=0.2)
    video = _video(b=3)
    with torch.no_grad():
        text = task.class_embeddings(CLASSES)  # [K, E] unnormalised (the generator's input)
        ids, mask = task.tokenize(CLASSES)
        torch.testing.assert_close(text, task.model.encode_text(ids, mask).embeds.float())  # plain class names
        logits = task.view_logits(video, CLASSES, text)  # [B, V, K]
        assert logits.shape == (3, 1, 4)
        torch.testing.assert_close(logits[:, 0], _official_logits(task.model, video, text), rtol=1e-5, atol=1e-4)
        out = task.model.encode_video(video)
        per_video = task.model.block.condition_text(text, out)  # [B, K, E]
        assert per_video.shape == (3, 4, 128) and not torch.allclose(per_video[0], per_video[1], atol=1e-3)
        shared = task.scale * F.normalize(out.embeds, dim=-1) @ F.normalize(text, dim=-1).T  # one classifier for all
        assert not torch.allclose(logits[:, 0], shared, atol=1e-3)
        probs = task.classify(video)
        torch.testing.assert_close(probs.sum(-1), torch.ones(3))


def test_m2clip_is_refused(tokenizer_dir):
    from vidlang.errors import ConfigError

    with pytest.raises(ConfigError, match="video-specific"):
        RecognitionTask(ModelConfig(image="vit_tiny", num_frames=4, block="xclip"), tokenizer=str(tokenizer_dir),
                        class_names=CLASSES, m2clip={"enabled": True})


def test_checkpoint_round_trip(tmp_path):
    model = _model()
    _perturb(model)
    torch.save(model.state_dict(), tmp_path / "xclip.pt")
    fresh = _model(seed=1)
    video, text = _video(), torch.randn(3, 32)
    with torch.no_grad():
        before = fresh.encode_video(video).embeds
        fresh.load_state_dict(torch.load(tmp_path / "xclip.pt", weights_only=True))
        a, b = model.encode_video(video), fresh.encode_video(video)
        assert not torch.allclose(before, b.embeds)
        torch.testing.assert_close(a.embeds, b.embeds, rtol=0, atol=0)
        torch.testing.assert_close(model.block.condition_text(text, a), fresh.block.condition_text(text, b))


# -- the official checkpoint converter (vidlang convert --from xclip) ----------------------------------------------
def _official_named_forward(sd: dict, video: torch.Tensor, ids: torch.Tensor, heads: int):
    """``XCLIP.forward`` written on the *official* key names (so a mapping mistake of the converter shows):
    (video features [B, E], text features [K, E], logits [B, K])."""
    b, t = video.shape[:2]
    v = "visual."
    x = F.conv2d(video.flatten(0, 1), sd[f"{v}conv1.weight"], stride=sd[f"{v}conv1.weight"].shape[-1])
    x = x.flatten(2).permute(0, 2, 1)
    x = torch.cat([sd[f"{v}class_embedding"].expand(x.shape[0], 1, -1), x], dim=1) + sd[f"{v}positional_embedding"]

    def ln(y, key):
        return F.layer_norm(y, y.shape[-1:], sd[f"{key}.weight"], sd[f"{key}.bias"])

    def mha(q, kv, key, h):
        return _mha(q, kv, h, sd[f"{key}.in_proj_weight"], sd[f"{key}.in_proj_bias"], sd[f"{key}.out_proj.weight"],
                    sd[f"{key}.out_proj.bias"])  # fmt: skip

    def mlp(y, key):
        return F.linear(F.linear(y, sd[f"{key}.c_fc.weight"], sd[f"{key}.c_fc.bias"]).mul(
            torch.sigmoid(1.702 * F.linear(y, sd[f"{key}.c_fc.weight"], sd[f"{key}.c_fc.bias"]))),
            sd[f"{key}.c_proj.weight"], sd[f"{key}.c_proj.bias"])  # fmt: skip

    x = ln(x, f"{v}ln_pre").permute(1, 0, 2)
    i = 0
    while f"{v}transformer.resblocks.{i}.ln_1.weight" in sd:
        r = f"{v}transformer.resblocks.{i}"
        n_tok, _, d = x.shape
        x = x.view(n_tok, b, t, d)
        m = F.linear(x[0], sd[f"{r}.message_fc.weight"], sd[f"{r}.message_fc.bias"]).permute(1, 0, 2)  # [T, b, d]
        mn = ln(m, f"{r}.message_ln")
        m = (m + mha(mn, mn, f"{r}.message_attn", heads)).permute(1, 0, 2).unsqueeze(0)  # [1, b, T, d]
        x = torch.cat([x, m], dim=0).view(n_tok + 1, -1, d)
        h = ln(x, f"{r}.ln_1")
        x = (x + mha(h, h, f"{r}.attn", heads))[:n_tok]
        x = x + mlp(ln(x, f"{r}.ln_2"), f"{r}.mlp")
        i += 1
    x = x.permute(1, 0, 2)
    cls = (ln(x[:, 0], f"{v}ln_post") @ sd[f"{v}proj"]).view(b, t, -1)
    e = cls.shape[-1]
    img = (ln(x[:, 1:], "prompts_visual_ln") @ sd["prompts_visual_proj"]).view(b, t, -1, e).mean(1)
    y = (cls + sd["mit.positional_embedding"]).permute(1, 0, 2)
    h = ln(y, "mit.resblocks.0.ln_1")
    y = y + mha(h, h, "mit.resblocks.0.attn", max(1, e // 64))
    y = y + mlp(ln(y, "mit.resblocks.0.ln_2"), "mit.resblocks.0.mlp")
    vid = (y.permute(1, 0, 2) + cls).mean(1)
    # text: OpenAI CLIP's encoder, EOT feature
    z = (F.embedding(ids, sd["token_embedding.weight"]) + sd["positional_embedding"]).permute(1, 0, 2)
    causal = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    j = 0
    while f"transformer.resblocks.{j}.ln_1.weight" in sd:
        r = f"transformer.resblocks.{j}"
        h = ln(z, f"{r}.ln_1")
        z = z + F.multi_head_attention_forward(
            h, h, h, h.shape[-1], max(1, h.shape[-1] // 64), sd[f"{r}.attn.in_proj_weight"],
            sd[f"{r}.attn.in_proj_bias"], None, None, False, 0.0, sd[f"{r}.attn.out_proj.weight"],
            sd[f"{r}.attn.out_proj.bias"], training=False, need_weights=False, attn_mask=causal)[0]  # fmt: skip
        z = z + mlp(ln(z, f"{r}.ln_2"), f"{r}.mlp")
        j += 1
    z = ln(z.permute(1, 0, 2), "ln_final")
    text = z[torch.arange(ids.shape[0]), ids.argmax(-1)] @ sd["text_projection"]  # [K, E]
    # VideoSpecificPrompt
    tf = text.unsqueeze(0).expand(b, -1, -1)
    q_in, mem = tf, ln(img, "prompts_generator.norm")
    k = 0
    while f"prompts_generator.decoder.{k}.norm1.weight" in sd:
        g = f"prompts_generator.decoder.{k}"
        q = ln(q_in, f"{g}.norm1")
        hh = max(1, e // 64)

        def split(y, name, g=g, hh=hh):
            return (y @ sd[f"{g}.cross_attn.{name}_proj.weight"].T).reshape(b, y.shape[1], hh, e // hh).transpose(1, 2)

        att = ((split(q, "q") @ split(mem, "k").transpose(-2, -1)) * (e // hh) ** -0.5).softmax(-1)
        o = (att @ split(mem, "v")).transpose(1, 2).reshape(b, -1, e)
        q_in = q_in + F.linear(o, sd[f"{g}.cross_attn.proj.weight"], sd[f"{g}.cross_attn.proj.bias"])
        u = F.linear(ln(q_in, f"{g}.norm3"), sd[f"{g}.mlp.0.weight"], sd[f"{g}.mlp.0.bias"])
        q_in = q_in + F.linear(u * torch.sigmoid(1.702 * u), sd[f"{g}.mlp.3.weight"], sd[f"{g}.mlp.3.bias"])
        k += 1
    tf = tf + sd["prompts_generator.alpha"] * q_in
    logits = sd["logit_scale"].exp() * torch.einsum("bd,bkd->bk", F.normalize(vid, dim=-1), F.normalize(tf, dim=-1))
    return vid, text, logits


def test_converted_official_checkpoint_equals_the_official_forward(tmp_path):
    """An official X-CLIP file (fixture layout ``xclip_t4``, random weights, saved under ``"model"``) ->
    ``vidlang convert --from xclip`` -> the same video / text features and video-specific logits."""
    import json
    from pathlib import Path

    from vidlang.cli import main as cli_main

    fx = json.loads((Path(__file__).parent / "fixtures" / "official" / "xclip_t4.json").read_text())
    g = torch.Generator().manual_seed(0)
    sd = {k: (1.0 if k.endswith((".weight",)) and len(shape) == 1 else 0.0) + 0.05 * torch.randn(shape, generator=g)
          for k, shape in fx["keys"].items()}  # fmt: skip
    sd["logit_scale"] = torch.tensor(2.0)
    torch.save({"model": sd, "epoch": 29}, tmp_path / "k400_32_8.pth")
    assert cli_main(["convert", str(tmp_path / "k400_32_8.pth"), "--out", str(tmp_path / "out"), "--from",
                     "xclip"]) == 0  # fmt: skip
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    blk = cfg["converted_from"]["block"]
    assert blk == {"name": "xclip", "args": {"mit_layers": 1, "max_frames": 4, "prompt_layers": 2}}
    model = build_model(ModelConfig(image="vit_b32", image_overrides=cfg["vision"], text_overrides=cfg["text"],
                                    block="xclip", block_args=blk["args"], pretrained=str(tmp_path / "out"),
                                    num_frames=4)).eval()  # fmt: skip
    video = torch.randn(2, 4, 3, 32, 32, generator=g)
    ids = torch.tensor([[98, 5, 17, 99] + [0] * 12, [98, 40, 41, 42, 43, 99] + [0] * 10, [98, 7, 99] + [0] * 13])
    mask = (torch.arange(16) <= ids.argmax(-1, keepdim=True)).long()
    with torch.no_grad():
        ref_v, ref_t, ref_logits = _official_named_forward(sd, video, ids, heads=2)
        out = model.encode_video(video)
        t = model.encode_text(ids, mask).embeds
        text_b = F.normalize(model.block.condition_text(t, out), dim=-1)
        logits = model.logit_scale.exp() * torch.einsum("be,bke->bk", F.normalize(out.embeds, dim=-1), text_b)
    torch.testing.assert_close(out.embeds, ref_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t, ref_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
