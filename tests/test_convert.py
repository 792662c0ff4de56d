"""Converters, format detection, safe loading, position-embedding resampling and ``vidlang convert``."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from vidlang.cli import main as cli_main  # noqa: E402
from vidlang.models.clip.convert import (  # noqa: E402
    detect_format,
    from_vidlang,
    infer_config,
    resample_state_dict,
    to_vidlang,
    unwrap_state_dict,
)
from vidlang.models.clip.layers import resample_temporal_embed  # noqa: E402
from vidlang.models.clip.pretrained import (  # noqa: E402
    UnsafeCheckpointError,
    load_pretrained,
    read_state_file,
    save_vidlang,
)
from vidlang.models.clip.tokenizer import ClipTokenizer, train_tokenizer  # noqa: E402

CAPTIONS = ["a man plays a guitar", "a woman slices a tomato", "two dogs run on the beach"] * 10


def _tiny_hf(seed: int = 0) -> transformers.CLIPModel:
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(
        vision_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8, image_size=32,
                           intermediate_size=128),
        text_config=dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, vocab_size=50,
                         max_position_embeddings=12, intermediate_size=64, bos_token_id=48, eos_token_id=49),
        projection_dim=16,
    )  # fmt: skip
    return transformers.CLIPModel(cfg).eval()


@pytest.fixture(scope="module")
def hf_sd() -> dict[str, torch.Tensor]:
    return _tiny_hf().state_dict()


@pytest.fixture(scope="module")
def native(hf_sd) -> dict[str, torch.Tensor]:
    return to_vidlang(hf_sd)


# -- detection and round trips -----------------------------------------------------------------------
def test_detect_formats(hf_sd, native):
    oa = from_vidlang(native, "openai")
    assert detect_format(hf_sd) == "hf"
    assert detect_format(native) == "vidlang"
    assert detect_format(oa) == "openai"
    assert detect_format({"state_dict": oa}) == "open_clip"
    assert detect_format({f"module.{k}": v for k, v in oa.items()}) == "open_clip"
    text_prefixed = {("text." + k if not k.startswith(("visual.", "logit")) else k): v for k, v in oa.items()}
    assert detect_format(text_prefixed) == "open_clip"
    with pytest.raises(ValueError, match="cannot detect"):
        detect_format({"encoder.weight": torch.zeros(1)})


def test_native_layout_keys_and_shapes(native):
    assert native["image_tower.conv1.weight"].shape == (64, 3, 8, 8)
    assert native["image_tower.positional_embedding"].shape == (17, 64)
    assert native["image_tower.layers.1.attn.qkv.weight"].shape == (192, 64)
    assert native["image_tower.proj"].shape == (64, 16)
    assert native["text_tower.text_projection"].shape == (32, 16)
    assert native["text_tower.layers.2.mlp.fc1.weight"].shape == (64, 32)
    assert native["logit_scale"].shape == ()
    assert not any("position_ids" in k for k in native)


def test_qkv_fused_in_q_k_v_order(hf_sd, native):
    qkv = native["text_tower.layers.1.attn.qkv.weight"]
    for n, part in zip("qkv", qkv.chunk(3), strict=True):
        assert torch.equal(part, hf_sd[f"text_model.encoder.layers.1.self_attn.{n}_proj.weight"])
    assert torch.equal(native["image_tower.proj"], hf_sd["visual_projection.weight"].t())


@pytest.mark.parametrize("fmt", ["hf", "openai"])
def test_round_trip_exact(native, fmt):
    foreign = from_vidlang(native, fmt)
    assert detect_format(foreign) == fmt
    back = to_vidlang(foreign)
    assert back.keys() == native.keys()
    assert all(torch.equal(back[k], native[k]) for k in native)


def test_hf_round_trip_reproduces_original(hf_sd, native):
    back = from_vidlang(native, "hf")
    assert back.keys() == hf_sd.keys()
    assert all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)


def test_open_clip_wrappers_convert_like_openai(native):
    oa = from_vidlang(native, "openai")
    variants = [
        {"state_dict": {f"module.{k}": v for k, v in oa.items()}, "epoch": 3},
        {**{("text." + k if not k.startswith(("visual.", "logit")) else k): v for k, v in oa.items()}},
        {**oa, "transformer.resblocks.0.attn_mask": torch.zeros(12, 12), "input_resolution": torch.tensor(32)},
    ]
    for v in variants:
        got = to_vidlang(v)
        assert got.keys() == native.keys() and all(torch.equal(got[k], native[k]) for k in native)


def test_unsupported_keys_are_named(hf_sd):
    bad = {**hf_sd, "vision_model.encoder.layers.0.ls1.gamma": torch.ones(64)}
    with pytest.raises(KeyError, match="ls1.gamma"):
        to_vidlang(bad)
    incomplete = {k: v for k, v in hf_sd.items() if "layers.0.self_attn.k_proj.weight" not in k}
    with pytest.raises(KeyError, match="incomplete q/k/v"):
        to_vidlang(incomplete)


def test_infer_config(hf_sd):
    vision, text = infer_config(hf_sd)
    # heads are not in the weights and this tiny shape is no known architecture: unknown (None), not guessed
    assert vision == {"width": 64, "layers": 2, "heads": None, "patch_size": 8, "image_size": 32, "mlp_dim": 128,
                      "embed_dim": 16}  # fmt: skip
    assert text == {"width": 32, "layers": 3, "heads": None, "context_length": 12, "vocab_size": 50, "mlp_dim": 64,
                    "embed_dim": 16}  # fmt: skip
    vision, _ = infer_config(hf_sd, {"vision": {"heads": 2}})
    assert vision["heads"] == 2
    vision_only = {k: v for k, v in hf_sd.items() if k.startswith(("vision_model.", "visual_projection"))}
    v, t = infer_config(vision_only)
    assert v is not None and t is None


# -- resampling -------------------------------------------------------------------------------------------
def test_resample_spatial_in_state_dict(native):
    out = resample_state_dict(native, image_size=48)
    pe, old = out["image_tower.positional_embedding"], native["image_tower.positional_embedding"]
    assert pe.shape == (1 + 36, 64)
    assert torch.equal(pe[0], old[0])  # CLS row kept
    const = dict(native)
    const["image_tower.positional_embedding"] = torch.cat([old[:1], torch.full((16, 64), 0.5)])
    assert torch.allclose(
        resample_state_dict(const, image_size=16)["image_tower.positional_embedding"][1:], torch.tensor(0.5)
    )
    with pytest.raises(ValueError, match="multiple of the patch size"):
        resample_state_dict(native, image_size=30)


def test_resample_temporal():
    t = torch.arange(8, dtype=torch.float32)[:, None] * torch.ones(1, 5)  # [T=8, D=5], linear ramp 0..7
    up = resample_temporal_embed(t, 15)
    assert up.shape == (15, 5)
    assert torch.allclose(up[:, 0], torch.linspace(0, 7, 15))  # ramp stays a ramp, ends kept
    assert torch.equal(resample_temporal_embed(t, 8), t)
    down = resample_temporal_embed(t[None], 4)  # [1, T, D]
    assert down.shape == (1, 4, 5) and down[0, 0, 0] == 0 and down[0, -1, 0] == 7
    one = resample_temporal_embed(torch.randn(1, 5), 6)
    assert one.shape == (6, 5) and torch.equal(one[0], one[5])
    sd = {"block.frame_position_embedding": t, "image_tower.class_embedding": torch.zeros(3)}
    out = resample_state_dict(sd, num_frames=16)
    assert out["block.frame_position_embedding"].shape == (16, 5) and out["image_tower.class_embedding"].shape == (3,)


# -- safe loading ------------------------------------------------------------------------------------------
class NotAWeight:
    """A custom class: unpickling it would need code from this module."""

    def __init__(self) -> None:
        self.x = 1


def test_unsafe_pickle_refused(tmp_path, native):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": native, "extra": NotAWeight()}, path)
    with pytest.raises(UnsafeCheckpointError, match="evil.pt"):
        read_state_file(path)
    with pytest.raises(UnsafeCheckpointError, match="evil.pt"):
        load_pretrained(path)


def test_garbage_file_is_a_clear_error(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="junk.pt") as err:
        read_state_file(tmp_path / "junk.pt")
    assert not isinstance(err.value, UnsafeCheckpointError)


def test_wrapped_pickle_and_safetensors_load(tmp_path, native):
    oa = from_vidlang(native, "openai")
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in oa.items()}}, tmp_path / "epoch_1.pt")
    sd, info = load_pretrained(tmp_path / "epoch_1.pt", heads=2, text_heads=2, act="gelu")
    assert info["format"] == "open_clip" and all(torch.equal(sd[k], native[k]) for k in native)
    assert info["vision"]["heads"] == 2 and info["heads_source"] == {"vision": "argument", "text": "argument"}
    from safetensors.torch import save_file

    save_file(oa, str(tmp_path / "open_clip_model.safetensors"))
    sd2, _ = load_pretrained(tmp_path / "open_clip_model.safetensors", heads=2, text_heads=2, act="gelu")
    assert all(torch.equal(sd2[k], native[k]) for k in native)


class _Holder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _torchscript_archive(sd: dict[str, torch.Tensor], path) -> None:
    """Save ``sd`` as a traced TorchScript module tree (like OpenAI's released ``ViT-B-32.pt``)."""
    root = _Holder()
    for key, value in sd.items():
        *names, leaf = key.split(".")
        mod = root
        for n in names:
            if not hasattr(mod, n):
                mod.add_module(n, _Holder())
            mod = getattr(mod, n)
        if value.is_floating_point():
            mod.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
        else:
            mod.register_buffer(leaf, value.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(root, torch.zeros(1)).save(str(path))


def test_torchscript_archive_read_without_jit(tmp_path, native):
    oa = {k: v.half() for k, v in from_vidlang(native, "openai").items()}  # OpenAI ships fp16 weights
    oa["input_resolution"] = torch.tensor(32)
    _torchscript_archive(oa, tmp_path / "ViT-tiny.pt")
    raw = read_state_file(tmp_path / "ViT-tiny.pt")
    assert raw.keys() == oa.keys() and all(torch.equal(raw[k], oa[k]) for k in oa)
    sd, info = load_pretrained(tmp_path / "ViT-tiny.pt", heads=2, text_heads=2)
    assert info["format"] == "openai"
    # only OpenAI ships TorchScript archives: quick_gelu is known, not guessed
    assert info["vision"]["act"] == "quick_gelu" and info["unknown"] == [] and "OpenAI" in info["act_source"]
    assert sd["image_tower.proj"].dtype == torch.float32
    assert all(torch.equal(sd[k], native[k].half().float()) for k in native)


def test_hf_sharded_directory(tmp_path, native):
    model = _tiny_hf()
    model.save_pretrained(tmp_path / "clip", safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "clip" / "model.safetensors.index.json").is_file()
    sd, info = load_pretrained(tmp_path / "clip")
    assert info["vision"]["heads"] == 2 and all(torch.equal(sd[k], native[k]) for k in native)


def test_open_clip_directory_reads_activation(tmp_path, native):
    d = tmp_path / "oc"
    d.mkdir()
    torch.save(from_vidlang(native, "openai"), d / "open_clip_pytorch_model.bin")
    cfg = {"model_cfg": {"embed_dim": 16, "quick_gelu": False, "vision_cfg": {"width": 64, "head_width": 32},
                         "text_cfg": {"heads": 2}}}  # fmt: skip
    (d / "open_clip_config.json").write_text(json.dumps(cfg))
    sd, info = load_pretrained(d)
    assert info["format"] == "open_clip" and info["vision"]["act"] == "gelu"
    assert info["vision"]["heads"] == 2 and info["text"]["heads"] == 2


def test_not_a_checkpoint_dir(tmp_path):
    with pytest.raises(ValueError, match="not a recognised checkpoint directory"):
        load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_pretrained(tmp_path / "missing.pt")


# -- vidlang convert -----------------------------------------------------------------------------------------
def test_convert_command_writes_vidlang_format(tmp_path, native, capsys):
    src = tmp_path / "hf"
    _tiny_hf().save_pretrained(src, safe_serialization=True)
    train_tokenizer(CAPTIONS, src, vocab_size=280)
    out = tmp_path / "converted"
    assert cli_main(["convert", str(src), "--out", str(out), "--image-size", "48"]) == 0
    assert "converted hf checkpoint" in capsys.readouterr().out
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == "vidlang" and cfg["vision"]["image_size"] == 48 and cfg["vision"]["heads"] == 2
    sd, info = load_pretrained(out)
    assert info["format"] == "vidlang" and info["vision"]["image_size"] == 48 and info["tokenizer_dir"] == out
    assert sd["image_tower.positional_embedding"].shape == (37, 64)
    assert all(torch.equal(sd[k], native[k]) for k in native if k != "image_tower.positional_embedding")
    assert ClipTokenizer.from_dir(out)(["a man"])[0].equal(ClipTokenizer.from_dir(src)(["a man"])[0])


def test_save_vidlang_then_reload_is_identity(tmp_path, native):
    vision, text = infer_config(native, {"vision": {"heads": 2}, "text": {"heads": 2}})
    info = {"format": "hf", "source": "x", "vision": {**vision, "act": "gelu"}, "text": {**text, "act": "gelu"}}
    save_vidlang(native, info, tmp_path / "v")
    sd, info2 = load_pretrained(tmp_path / "v")
    assert info2["vision"]["act"] == "gelu" and info2["text"]["heads"] == 2 and info2["tokenizer_dir"] is None
    assert sd.keys() == native.keys() and all(torch.equal(sd[k], native[k]) for k in native)
    assert unwrap_state_dict({"model": sd}).keys() == sd.keys()
