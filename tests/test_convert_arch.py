"""Attention heads and activation of bare CLIP weight files (issue 12, item 3).

Neither the head count nor the activation is stored in a weights file. vidlang reads heads from the
known open_clip / OpenAI architectures whose tensor shapes match, refuses a file whose shapes do
not determine them (naming ``--heads`` / ``--text-heads``), and warns loudly (naming ``--act``) when
it has to guess the activation. References: open_clip models with random weights (``open_clip_torch``
is a test-only dependency); shapes of the big architectures come from meta tensors, never real weights.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from vidlang.cli import main as cli_main
from vidlang.errors import UnknownArchitectureError, VidlangUserError
from vidlang.models.clip import configs as clip_configs
from vidlang.models.clip.configs import KnownTower, match_known_image, match_known_text
from vidlang.models.clip.convert import infer_config, to_vidlang
from vidlang.models.clip.pretrained import (
    ActivationGuessWarning,
    image_config_from_info,
    load_pretrained,
    resolve_towers,
    text_config_from_info,
)

TOL = 1e-5


# -- shapes only (meta tensors): no weights are ever materialised ----------------------------------------
def _openai_shapes(
    v_width: int, v_layers: int, patch: int, v_mlp: int, image: int,
    t_width: int, t_layers: int, t_mlp: int, embed: int, ctx: int = 77, vocab: int = 49408,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """An OpenAI / open_clip layout state dict of meta tensors with the given tower shapes."""

    def m(*shape: int) -> torch.Tensor:
        return torch.empty(shape, device="meta")

    sd = {
        "visual.conv1.weight": m(v_width, 3, patch, patch),
        "visual.class_embedding": m(v_width),
        "visual.positional_embedding": m(1 + (image // patch) ** 2, v_width),
        "visual.proj": m(v_width, embed),
        "token_embedding.weight": m(vocab, t_width),
        "positional_embedding": m(ctx, t_width),
        "text_projection": m(t_width, embed),
        "logit_scale": m(),
    }
    for p in ("weight", "bias"):
        sd[f"visual.ln_pre.{p}"] = m(v_width)
        sd[f"visual.ln_post.{p}"] = m(v_width)
        sd[f"ln_final.{p}"] = m(t_width)
    for prefix, width, layers, mlp in (
        ("visual.transformer", v_width, v_layers, v_mlp),
        ("transformer", t_width, t_layers, t_mlp),
    ):
        for i in range(layers):
            b = f"{prefix}.resblocks.{i}"
            sd[f"{b}.attn.in_proj_weight"], sd[f"{b}.attn.in_proj_bias"] = m(3 * width, width), m(3 * width)
            sd[f"{b}.attn.out_proj.weight"], sd[f"{b}.attn.out_proj.bias"] = m(width, width), m(width)
            sd[f"{b}.mlp.c_fc.weight"], sd[f"{b}.mlp.c_fc.bias"] = m(mlp, width), m(mlp)
            sd[f"{b}.mlp.c_proj.weight"], sd[f"{b}.mlp.c_proj.bias"] = m(width, mlp), m(width)
            for p in ("weight", "bias"):
                sd[f"{b}.ln_1.{p}"], sd[f"{b}.ln_2.{p}"] = m(width), m(width)
    return sd


VIT_H_14 = dict(v_width=1280, v_layers=32, patch=14, v_mlp=5120, image=224, t_width=1024, t_layers=24, t_mlp=4096,
                embed=1024)  # fmt: skip
VIT_B_32 = dict(v_width=768, v_layers=12, patch=32, v_mlp=3072, image=224, t_width=512, t_layers=12, t_mlp=2048,
                embed=512)  # fmt: skip


def test_vit_h14_shapes_infer_16_heads():
    """ViT-H/14 has head width 80: 16 heads, not width / 64 = 20."""
    vision, text = infer_config(_openai_shapes(**VIT_H_14))
    assert vision["heads"] == 16 and text["heads"] == 16
    assert vision["width"] == 1280 and vision["layers"] == 32 and vision["patch_size"] == 14


@pytest.mark.parametrize(
    "name, width, layers, patch, mlp, heads",
    [("ViT-g-14", 1408, 40, 14, 6144, 16), ("ViT-bigG-14", 1664, 48, 14, 8192, 16), ("ViT-e-14", 1792, 56, 14, 15360,
     16), ("ViT-B-16-plus", 896, 12, 16, 3584, 14), ("ViT-S-32", 384, 12, 32, 1536, 6)],
)  # fmt: skip
def test_known_vision_table(name, width, layers, patch, mlp, heads):
    got = match_known_image(width, layers, patch, mlp)
    assert len(got) == 1 and got[0].heads == heads and name in got[0].name


def test_unknown_shapes_match_nothing():
    assert match_known_image(768, 6, 32, 3072) == []  # a 6-layer ViT-B: no known architecture
    assert match_known_text(512, 12, 1024) == []  # MLP ratio 2


def test_resolve_refuses_unknown_heads_naming_flags():
    sd = to_vidlang(_openai_shapes(**{**VIT_B_32, "v_layers": 6, "t_layers": 4}))
    with pytest.raises(UnknownArchitectureError) as err:
        resolve_towers(sd, "openai", "custom.bin", act="gelu")
    msg = str(err.value)
    assert "custom.bin" in msg and "--heads" in msg and "--text-heads" in msg and "\n" not in msg
    assert isinstance(err.value, VidlangUserError) and isinstance(err.value, ValueError)
    vision, text, _ = resolve_towers(sd, "openai", "custom.bin", act="gelu", heads=12, text_heads=8)
    assert vision["heads"] == 12 and text["heads"] == 8


def test_resolve_refuses_shapes_matching_architectures_with_different_heads(monkeypatch):
    twins = (KnownTower("ViT-X", 768, 12, 3072, 12, patch_size=32), KnownTower("ViT-Y", 768, 12, 3072, 8,
                                                                                  patch_size=32))  # fmt: skip
    monkeypatch.setattr(clip_configs, "KNOWN_IMAGE", clip_configs.KNOWN_IMAGE + twins)
    sd = to_vidlang(_openai_shapes(**VIT_B_32))
    with pytest.raises(UnknownArchitectureError, match=r"ViT-X.*ViT-Y.*--heads"):
        resolve_towers(sd, "openai", "b32.bin", act="quick_gelu")
    vision, text, _ = resolve_towers(sd, "openai", "b32.bin", act="quick_gelu", heads=8)
    assert vision["heads"] == 8 and text["heads"] == 8


def test_explicit_heads_must_divide_width():
    sd = to_vidlang(_openai_shapes(**VIT_B_32))
    with pytest.raises(ValueError, match=r"--heads 5.*768"):
        resolve_towers(sd, "openai", "b32.bin", act="gelu", heads=5)


def test_explicit_heads_against_known_shape_warns():
    sd = to_vidlang(_openai_shapes(**VIT_H_14))
    with pytest.warns(UserWarning, match=r"--heads 20.*ViT-H-14.*16"):
        vision, _, _ = resolve_towers(sd, "openai", "h14.bin", act="gelu", heads=20)
    assert vision["heads"] == 20  # the user's word wins, loudly


# -- activation -------------------------------------------------------------------------------------------
def test_activation_guess_warns_naming_flag():
    sd = to_vidlang(_openai_shapes(**VIT_B_32))
    with pytest.warns(ActivationGuessWarning, match=r"b32\.bin.*quick_gelu.*ViT-B-32.*--act"):
        vision, text, meta = resolve_towers(sd, "openai", "b32.bin")
    assert vision["act"] == text["act"] == "quick_gelu"  # OpenAI released ViT-B/32 with quick_gelu
    assert meta["unknown"] == ["vision.act", "text.act"] and "guess" in meta["act_source"]
    # an open_clip training checkpoint (wrapped): open_clip's own default, gelu, still loudly
    with pytest.warns(ActivationGuessWarning, match=r"gelu.*--act"):
        vision, _, _ = resolve_towers(sd, "open_clip", "epoch_3.pt")
    assert vision["act"] == "gelu"
    # ViT-H/14: no OpenAI release; open_clip's default gelu, and the warning names the quickgelu variant
    with pytest.warns(ActivationGuessWarning, match=r"ViT-H-14.*quickgelu.*--act"):
        vision, _, _ = resolve_towers(to_vidlang(_openai_shapes(**VIT_H_14)), "openai", "h14.bin")
    assert vision["act"] == "gelu"


def test_known_activation_does_not_warn():
    sd = to_vidlang(_openai_shapes(**VIT_B_32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v, _, meta = resolve_towers(sd, "openai", "x.pt", openai_origin=True)  # OpenAI's TorchScript archive
        assert v["act"] == "quick_gelu" and meta["unknown"] == []
        v, _, meta = resolve_towers(sd, "openai", "x.pt", act="gelu")
        assert v["act"] == "gelu" and meta["act_source"] == "argument"
        hints = {"vision": {"act": "gelu", "heads": 12}, "text": {"act": "gelu", "heads": 8}}
        v, _, meta = resolve_towers(sd, "open_clip", "dir", hints)
        assert v["act"] == "gelu" and meta["unknown"] == []


def test_omit_mode_leaves_unknowns_to_the_caller():
    sd = to_vidlang(_openai_shapes(**{**VIT_B_32, "v_layers": 6}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vision, text, meta = resolve_towers(sd, "openai", "x.bin", on_unknown="omit")
    assert "heads" not in vision and "act" not in vision and text["heads"] == 8
    assert meta["unknown"] == ["vision.heads", "vision.act", "text.act"]


# -- every plain ViT architecture open_clip ships (its own configs, meta tensors) -------------------------
def _open_clip_plain_vit_names() -> list[str]:
    open_clip = pytest.importorskip("open_clip")
    from open_clip.factory import get_model_config

    names = []
    for name in open_clip.list_models():
        cfg = get_model_config(name) or {}
        v, t = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
        if "timm_model_name" in v or "hf_model_name" in t or "multimodal_cfg" in cfg or "text_arch" in t:
            continue
        if not isinstance(v.get("layers"), int):  # ResNet towers
            continue
        names.append(name)
    return names


# one per distinct tower shape (fast); the slow test sweeps every plain ViT config open_clip ships
ONE_PER_SHAPE = ["ViT-S-32", "ViT-S-16-alt", "ViT-M-32-alt", "ViT-B-32", "ViT-B-16-plus", "ViT-L-14", "ViT-H-14",
                 "ViT-H-16", "ViT-g-14", "ViT-bigG-14", "ViT-e-14", "ViT-M-16-alt"]  # fmt: skip


def test_heads_of_open_clip_architectures():
    _check_open_clip_heads(ONE_PER_SHAPE)


@pytest.mark.slow
def test_heads_of_every_open_clip_vit_architecture():
    names = _open_clip_plain_vit_names()
    assert set(ONE_PER_SHAPE) <= set(names)
    _check_open_clip_heads(names)


def _check_open_clip_heads(names: list[str]) -> None:
    """Build each open_clip model on the meta device (its own config, no weights) and compare the heads."""
    open_clip = pytest.importorskip("open_clip")
    from open_clip.factory import get_model_config

    wrong = []
    for name in names:
        cfg = get_model_config(name)
        with torch.device("meta"):
            model = (open_clip.CustomTextCLIP if cfg.get("custom_text") else open_clip.CLIP)(**cfg)
        text_tf = model.text.transformer if hasattr(model, "text") else model.transformer
        want = (model.visual.transformer.resblocks[0].attn.num_heads, text_tf.resblocks[0].attn.num_heads)
        if cfg["vision_cfg"].get("ls_init_value") or cfg["text_cfg"].get("ls_init_value"):
            with pytest.raises(KeyError, match="ls_1"):  # layer scale: not a tower vidlang implements, refused
                infer_config(model.state_dict())
            continue
        vision, text = infer_config(model.state_dict())
        if (vision["heads"], text["heads"]) != want:
            wrong.append((name, (vision["heads"], text["heads"]), want))
    assert not wrong, f"heads (vision, text) inferred vs open_clip's: {wrong}"


# -- real logits against open_clip with random weights ---------------------------------------------------
CTX, VOCAB = 12, 60


def _tiny_open_clip(head_width: int = 32, quick_gelu: bool = False, seed: int = 0):
    """A custom open_clip CLIP: vision width 128 with head width 32 (4 heads; width / 64 would say 2)."""
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=dict(width=128, layers=2, head_width=head_width, patch_size=8, image_size=32, mlp_ratio=4.0),
        text_cfg=dict(context_length=CTX, vocab_size=VOCAB, width=64, heads=2, layers=2),
        quick_gelu=quick_gelu,
    ).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters and class/position embeddings
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    ids = torch.zeros(3, CTX, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate((CTX, 7, 3)):  # EOT is the highest id: open_clip pools at argmax, vidlang at the end
        ids[row, : n - 1] = torch.randint(1, VOCAB - 1, (n - 1,), generator=g)
        ids[row, n - 1] = VOCAB - 1
        mask[row, :n] = 1
    return pixels, ids, mask


def _reference_logits(model, pixels, ids) -> torch.Tensor:
    with torch.no_grad():
        img = model.encode_image(pixels, normalize=True)
        txt = model.encode_text(ids, normalize=True)
        return model.logit_scale.exp() * img @ txt.t()  # [images, texts]


def _vidlang_logits(sd, info, pixels, ids, mask) -> torch.Tensor:
    from vidlang.models.clip.image import ClipImageTower
    from vidlang.models.clip.text import TextTower
    from vidlang.models.factory import tower_spec
    from vidlang.models.temporal import build_block
    from vidlang.models.video_clip import VideoTextModel

    vcfg, tcfg = image_config_from_info(info), text_config_from_info(info)
    model = VideoTextModel(ClipImageTower(vcfg), TextTower(tcfg), build_block("mean", tower_spec(vcfg, tcfg)))
    model.load_state_dict(sd, strict=True)
    model.eval()
    with torch.no_grad():
        img = model.encode_image(pixels)
        txt = model.encode_text(ids, mask).embeds
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    return model.logit_scale.exp() * img @ txt.t()


def test_custom_head_width_is_refused_then_exact_with_flags(tmp_path, inputs):
    ref_model = _tiny_open_clip()
    torch.save(ref_model.state_dict(), tmp_path / "custom.bin")
    ref = _reference_logits(ref_model, inputs[0], inputs[1])
    with pytest.raises(UnknownArchitectureError, match=r"custom\.bin.*--heads.*--text-heads"):
        load_pretrained(tmp_path / "custom.bin")
    sd, info = load_pretrained(tmp_path / "custom.bin", heads=4, text_heads=2, act="gelu")
    assert info["vision"]["heads"] == 4 and info["text"]["heads"] == 2
    err = (_vidlang_logits(sd, info, *inputs) - ref).abs().max().item()
    assert err <= TOL, err
    # the guess old code made (width // 64 = 2 heads) is measurably wrong on this file
    info_wrong = {**info, "vision": {**info["vision"], "heads": 2}}
    assert (_vidlang_logits(sd, info_wrong, *inputs) - ref).abs().max().item() > 1e-2


def test_heads_from_a_known_shape_end_to_end(tmp_path, inputs, monkeypatch):
    """With the tiny shape registered as a known architecture, heads come from the table; logits match."""
    monkeypatch.setattr(clip_configs, "KNOWN_IMAGE", (KnownTower("tiny-hw32", 128, 2, 512, 4, patch_size=8),))
    monkeypatch.setattr(clip_configs, "KNOWN_TEXT", (KnownTower("tiny-text", 64, 2, 256, 2),))
    ref_model = _tiny_open_clip(quick_gelu=False, seed=2)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in ref_model.state_dict().items()}},
               tmp_path / "epoch_3.pt")  # fmt: skip
    with pytest.warns(ActivationGuessWarning, match="--act"):
        sd, info = load_pretrained(tmp_path / "epoch_3.pt")
    assert info["format"] == "open_clip" and info["vision"]["heads"] == 4 and info["text"]["heads"] == 2
    assert info["vision"]["act"] == "gelu"  # an open_clip training: open_clip's default
    err = (_vidlang_logits(sd, info, *inputs) - _reference_logits(ref_model, inputs[0], inputs[1])).abs().max()
    assert err.item() <= TOL


def test_quick_gelu_open_clip_model_with_act_flag(tmp_path, inputs):
    ref_model = _tiny_open_clip(quick_gelu=True, seed=3)
    torch.save(ref_model.state_dict(), tmp_path / "qg.bin")
    ref = _reference_logits(ref_model, inputs[0], inputs[1])
    sd, info = load_pretrained(tmp_path / "qg.bin", heads=4, text_heads=2, act="quick_gelu")
    assert (_vidlang_logits(sd, info, *inputs) - ref).abs().max().item() <= TOL
    info_gelu = {k: ({**v, "act": "gelu"} if k in ("vision", "text") else v) for k, v in info.items()}
    assert (_vidlang_logits(sd, info_gelu, *inputs) - ref).abs().max().item() > 1e-4  # the flag matters


# -- vidlang convert ----------------------------------------------------------------------------------------
def test_convert_refuses_unknown_heads_in_one_line(tmp_path, capsys):
    torch.save(_tiny_open_clip().state_dict(), tmp_path / "custom.bin")
    assert cli_main(["convert", str(tmp_path / "custom.bin"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--heads" in err and "--text-heads" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_convert_with_heads_flags_and_activation_warning(tmp_path, capsys, inputs):
    ref_model = _tiny_open_clip()
    torch.save(ref_model.state_dict(), tmp_path / "custom.bin")
    out = tmp_path / "out"
    argv = ["convert", str(tmp_path / "custom.bin"), "--out", str(out), "--heads", "4", "--text-heads", "2"]
    assert cli_main(argv) == 0
    captured = capsys.readouterr()
    assert "--act" in captured.err and "warning" in captured.err.lower()  # the activation was guessed: loudly
    assert "guess" in captured.out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vision"]["heads"] == 4 and cfg["text"]["heads"] == 2 and cfg["vision"]["act"] == "gelu"
    assert cfg["converted_from"]["guessed"] == ["vision.act", "text.act"]
    # the converted directory still knows the activation was a guess, and says so on every load
    with pytest.warns(ActivationGuessWarning, match="--act"):
        sd, info = load_pretrained(out)
    assert info["vision"]["heads"] == 4
    assert (_vidlang_logits(sd, info, *inputs) - _reference_logits(ref_model, *inputs[:2])).abs().max() <= TOL
    # with --act the file is fully described: no warning, nothing guessed
    out2 = tmp_path / "out2"
    assert cli_main([*argv[:3], str(out2), "--heads", "4", "--text-heads", "2", "--act", "gelu"]) == 0
    assert "--act" not in capsys.readouterr().err
    assert json.loads((out2 / "config.json").read_text())["converted_from"]["guessed"] == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_pretrained(out2)


# -- ModelConfig(pretrained=...) ----------------------------------------------------------------------------
def _tiny_model_cfg(path: str):
    from vidlang.models.factory import ModelConfig

    return ModelConfig(image="vit_tiny", text="text_tiny", block="mean", pretrained=path)


def test_factory_uses_the_model_config_for_what_a_bare_file_cannot_tell(tmp_path):
    from safetensors.torch import save_file

    from vidlang.models.factory import build_model

    src = build_model(_tiny_model_cfg(None))
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    with pytest.warns(UserWarning, match=r"w\.safetensors.*heads.*act.*image_overrides"):
        model = build_model(_tiny_model_cfg(str(tmp_path / "w.safetensors")))
    assert torch.equal(model.image_tower.conv1.weight, src.image_tower.conv1.weight)


def test_factory_refuses_preset_heads_that_contradict_a_known_shape(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from vidlang.models.factory import build_model

    src = build_model(_tiny_model_cfg(None))  # vit_tiny: width 64, 3 layers, patch 8, 4 heads
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    monkeypatch.setattr(clip_configs, "KNOWN_IMAGE", (KnownTower("tiny-2-heads", 64, 3, 256, 2, patch_size=8),))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"heads=2.*preset has 4"):
            build_model(_tiny_model_cfg(str(tmp_path / "w.safetensors")))
