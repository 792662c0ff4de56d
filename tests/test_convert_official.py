"""``vidlang convert --from METHOD``: the authors' released layouts (issue 21).

The layouts are the JSON fixtures of ``tests/fixtures/official/`` (written by ``tools/official_layouts.py`` from the
authors' parameter naming, small configuration). Each test fills a layout with random tensors, saves it as the
authors' training script does (wrapper, DDP prefix), converts it and checks: every key mapped or dropped with a
reason, unknown keys refused by name, the recorded method / sha256 / block, a model that runs, and, where the math is
the same, outputs equal to a hand-written forward in the official layout.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from vidlang.cli import main as cli_main
from vidlang.models.factory import ModelConfig, build_model
from vidlang.models.official import (
    OFFICIAL_METHODS,
    UnknownKeysError,
    convert_official,
    detect_method,
    load_official,
    read_official_file,
)

FIXTURES = Path(__file__).parent / "fixtures" / "official"
LAYOUTS = sorted(p.stem for p in FIXTURES.glob("*.json"))
T = 3  # frames


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def random_layout(keys: dict[str, list[int]], seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in keys.items():
        if k.endswith("position_ids"):
            out[k] = torch.arange(shape[-1]).expand(*shape).clone()
        elif k.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight")) or (
            "norm" in k and k.endswith(".weight")
        ):
            out[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif k.endswith("logit_scale"):
            out[k] = torch.tensor(4.6)
        else:
            out[k] = 0.05 * torch.randn(shape, generator=g)
    return out


def save_official(name: str, path: Path, seed: int = 0) -> dict[str, Tensor]:
    """The file the authors' script writes; returns the bare state dict (official names, no prefix)."""
    fx = fixture(name)
    sd = random_layout(fx["keys"], seed)
    model = {("module." + k if fx["ddp_prefix"] else k): v for k, v in sd.items()}
    obj = model if fx["wrapper"] is None else {fx["wrapper"]: model, "epoch": 3}
    torch.save(obj, path)
    return sd


def save_base(path: Path, seed: int = 7) -> dict[str, Tensor]:
    """An OpenAI-layout CLIP of the small configuration (ViFi-CLIP's --base)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "official_layouts", Path(__file__).parents[1] / "tools" / "official_layouts.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    keys = {**mod.openai_visual("visual."), **mod.openai_text(""), "logit_scale": []}
    sd = random_layout(keys, seed)
    torch.save(sd, path)
    return sd


def model_from(out_dir: Path, frames: int = T):
    cfg = json.loads((out_dir / "config.json").read_text())
    block = cfg["converted_from"]["block"]
    mc = ModelConfig(image="vit_b32", image_overrides=cfg["vision"], text_overrides=cfg["text"], block=block["name"],
                     block_args=block["args"], pretrained=str(out_dir), num_frames=frames)  # fmt: skip
    return build_model(mc).eval(), cfg


# ---------------------------------------------------------------------------------------------
# hand-written forwards in the official layout (OpenAI CLIP / CLIP4Clip naming)
# ---------------------------------------------------------------------------------------------
def ref_layer(x: Tensor, sd: dict[str, Tensor], p: str, heads: int, mask: Tensor | None = None,
              pre_mlp: Callable[[Tensor], Tensor] | None = None) -> Tensor:  # fmt: skip
    """One OpenAI-CLIP residual block, batch-first ``x [N, L, W]``; ``mask`` additive ``[N or 1, L, L]``;
    ``pre_mlp``: an adapter applied to the residual stream before the MLP (M2-CLIP)."""
    n, length, w = x.shape
    h = F.layer_norm(x, (w,), sd[f"{p}.ln_1.weight"], sd[f"{p}.ln_1.bias"])
    q, k, v = (h @ sd[f"{p}.attn.in_proj_weight"].T + sd[f"{p}.attn.in_proj_bias"]).chunk(3, dim=-1)
    q, k, v = (t.reshape(n, length, heads, w // heads).transpose(1, 2) for t in (q, k, v))
    att = q @ k.transpose(-1, -2) / (w // heads) ** 0.5
    if mask is not None:
        att = att + mask[:, None]
    o = (att.softmax(-1) @ v).transpose(1, 2).reshape(n, length, w)
    x = x + o @ sd[f"{p}.attn.out_proj.weight"].T + sd[f"{p}.attn.out_proj.bias"]
    if pre_mlp is not None:
        x = pre_mlp(x)
    h = F.layer_norm(x, (w,), sd[f"{p}.ln_2.weight"], sd[f"{p}.ln_2.bias"])
    h = h @ sd[f"{p}.mlp.c_fc.weight"].T + sd[f"{p}.mlp.c_fc.bias"]
    h = h * torch.sigmoid(1.702 * h)
    return x + h @ sd[f"{p}.mlp.c_proj.weight"].T + sd[f"{p}.mlp.c_proj.bias"]


def ref_image(sd: dict[str, Tensor], v: str, images: Tensor) -> Tensor:
    """OpenAI ``VisionTransformer`` forward, tower prefix ``v`` -> ``[N, E]``."""
    w = sd[f"{v}conv1.weight"]
    x = F.conv2d(images, w, stride=w.shape[-1]).flatten(2).transpose(1, 2)  # [N, grid^2, C]
    cls = sd[f"{v}class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd[f"{v}positional_embedding"]
    c = x.shape[-1]
    x = F.layer_norm(x, (c,), sd[f"{v}ln_pre.weight"], sd[f"{v}ln_pre.bias"])
    layers = len({k.split(".")[len(v.split(".")) + 1] for k in sd if k.startswith(f"{v}transformer.resblocks.")})
    for i in range(layers):
        x = ref_layer(x, sd, f"{v}transformer.resblocks.{i}", c // 64)
    return F.layer_norm(x[:, 0], (c,), sd[f"{v}ln_post.weight"], sd[f"{v}ln_post.bias"]) @ sd[f"{v}proj"]


def ref_text(sd: dict[str, Tensor], t: str, ids: Tensor, token_embedding: Tensor) -> Tensor:
    """OpenAI ``encode_text`` (causal mask, EOT = argmax id), prefix ``t`` -> ``[A, E]``."""
    length = ids.shape[1]
    x = token_embedding[ids] + sd[f"{t}positional_embedding"][:length]
    w = x.shape[-1]
    causal = torch.full((length, length), float("-inf")).triu(1)[None]
    layers = len({k.split(".")[len(t.split(".")) + 1] for k in sd if k.startswith(f"{t}transformer.resblocks.")})
    for i in range(layers):
        x = ref_layer(x, sd, f"{t}transformer.resblocks.{i}", w // 64, causal)
    x = F.layer_norm(x, (w,), sd[f"{t}ln_final.weight"], sd[f"{t}ln_final.bias"])
    return x[torch.arange(ids.shape[0]), ids.argmax(-1)] @ sd[f"{t}text_projection"]


def ref_clip4clip_video(sd: dict[str, Tensor], video: Tensor) -> Tensor:
    """CLIP4Clip ``_loose_similarity`` video side (all frames real): head, per-frame L2, mean -> ``[B, E]``."""
    b, t = video.shape[:2]
    frames = ref_image(sd, "clip.visual.", video.flatten(0, 1)).reshape(b, t, -1)
    x = frames
    if "frame_position_embeddings.weight" in sd:
        x = frames + sd["frame_position_embeddings.weight"][:t]
        mask = torch.zeros(b, t, t)  # (1 - video_mask) * -1e6 with every frame real
        n_layers = len({k.split(".")[2] for k in sd if k.startswith("transformerClip.resblocks.")})
        for i in range(n_layers):
            x = ref_layer(x, sd, f"transformerClip.resblocks.{i}", x.shape[-1] // 64, mask)
        x = x + frames
    return F.normalize(x, dim=-1).mean(1)


def inputs(seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(2, T, 3, 32, 32, generator=g)
    ids = torch.tensor([[98, 5, 17, 99, 0, 0], [98, 40, 41, 42, 43, 99]])  # SOT ... EOT (largest id) pad 0
    mask = (torch.arange(6) <= ids.argmax(-1, keepdim=True)).long()
    return video, ids, mask


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------
def test_fixtures_cover_every_method():
    assert {fixture(n)["method"] for n in LAYOUTS} == set(OFFICIAL_METHODS.names())


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_key_mapped_or_dropped(name, tmp_path):
    fx = fixture(name)
    sd = save_official(name, tmp_path / "ckpt.pth")
    raw = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    assert detect_method(raw) == fx["method"]
    conv = convert_official(raw)
    assert conv.method == fx["method"]
    assert set(conv.dropped) <= set(sd)
    ignored = {k for k in sd if k.endswith("position_ids")}  # buffers, not weights
    official_values = sum(v.numel() for k, v in sd.items() if k not in conv.dropped and k not in ignored)
    assert sum(v.numel() for v in conv.state_dict.values()) == official_values  # nothing lost, nothing invented
    # each official tensor's values are in the converted dict (as is, transposed, or a slice of a fused/stacked one)
    pool = [v.flatten() for v in conv.state_dict.values()]
    for k, v in sd.items():
        if k in conv.dropped or k in ignored:
            continue
        assert any(v.numel() <= p.numel() and _contains(p, v) for p in pool), f"{k} not found in the conversion"


def _contains(big: Tensor, small: Tensor) -> bool:
    s = small.flatten()
    if big.numel() == s.numel():
        return torch.equal(big, s) or (small.dim() == 2 and torch.equal(big, small.t().flatten()))
    return any(torch.equal(big[i : i + s.numel()], s) for i in range(0, big.numel() - s.numel() + 1, s.numel()))


@pytest.mark.parametrize("name", LAYOUTS)
def test_unknown_key_refused_by_name(name, tmp_path):
    fx = fixture(name)
    sd = random_layout(fx["keys"])
    bad = next(iter(sd)).split(".")[0] + ".surprise_adapter.weight"
    sd[bad] = torch.zeros(3)
    with pytest.raises(UnknownKeysError, match=bad.replace(".", r"\.")):
        convert_official(sd, fx["method"])


@pytest.mark.parametrize("name", LAYOUTS)
def test_convert_records_source_and_model_runs(name, tmp_path):
    fx = fixture(name)
    src = tmp_path / "official.pth"
    save_official(name, src)
    args = ["convert", str(src), "--out", str(tmp_path / "out"), "--from", "auto"]
    if fx["needs_base"]:
        save_base(tmp_path / "base.pt")
        args += ["--base", str(tmp_path / "base.pt")]
    assert cli_main(args) == 0
    model, cfg = model_from(tmp_path / "out")
    rec = cfg["converted_from"]
    assert rec["method"] == fx["method"]
    assert rec["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert model.pretrained_info["loaded_block"] == any(k.startswith("block.") for k in _converted_keys(tmp_path))
    video, ids, mask = inputs()
    with torch.no_grad():
        v = model.encode_video(video).embeds
        t = model.encode_text(ids, mask).embeds
    assert v.shape == (2, 64) and t.shape == (2, 64)
    assert torch.isfinite(v).all() and torch.isfinite(t).all()


def _converted_keys(tmp_path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("name", ["clip4clip_meanp", "clip4clip_seqtransf"])
def test_clip4clip_outputs_equal_official_forward(name, tmp_path):
    sd = save_official(name, tmp_path / "pytorch_model.bin.4")
    assert cli_main(["convert", str(tmp_path / "pytorch_model.bin.4"), "--out", str(tmp_path / "out"),
                     "--from", "clip4clip"]) == 0  # fmt: skip
    model, _ = model_from(tmp_path / "out")
    video, ids, mask = inputs()
    with torch.no_grad():
        v = F.normalize(model.encode_video(video).embeds, dim=-1)
        t = model.encode_text(ids, mask).embeds
        ref_v = F.normalize(ref_clip4clip_video(sd, video), dim=-1)
        ref_t = ref_text(sd, "clip.", ids, sd["clip.token_embedding.weight"])
    assert (v - ref_v).abs().max() < 1e-5
    assert (t - ref_t).abs().max() < 1e-5


def test_vifi_full_outputs_equal_official_forward(tmp_path):
    sd = save_official("vifi_clip_full", tmp_path / "best.pth")
    base = save_base(tmp_path / "ViT-B-16.pt")
    assert cli_main(["convert", str(tmp_path / "best.pth"), "--out", str(tmp_path / "out"), "--from", "vifi_clip",
                     "--base", str(tmp_path / "ViT-B-16.pt")]) == 0  # fmt: skip
    model, cfg = model_from(tmp_path / "out")
    assert cfg["converted_from"]["from_base"]["keys"] == ["text_tower.token_embedding.weight"]
    assert set(cfg["converted_from"]["dropped"]) == {"prompt_learner.complete_text_embeddings"}
    video, ids, mask = inputs()
    with torch.no_grad():
        v = model.encode_video(video).embeds
        t = model.encode_text(ids, mask).embeds
        ref_v = ref_image(sd, "image_encoder.", video.flatten(0, 1)).reshape(2, T, -1).mean(1)  # ViFi: frame mean
        ref_t = ref_text(sd, "text_encoder.", ids, base["token_embedding.weight"])
    assert (v - ref_v).abs().max() < 1e-5
    assert (t - ref_t).abs().max() < 1e-5


def test_vifi_without_base_names_the_missing_key(tmp_path, capsys):
    save_official("vifi_clip_prompt", tmp_path / "best.pth")
    with pytest.raises(ValueError, match=r"text_tower\.token_embedding\.weight.*--base"):
        load_official(tmp_path / "best.pth")
    assert cli_main(["convert", str(tmp_path / "best.pth"), "--out", str(tmp_path / "o"), "--from", "vifi_clip"]) == 2
    assert "--base" in capsys.readouterr().err


def test_vifi_prompts_land_in_the_vpt_block(tmp_path):
    sd = save_official("vifi_clip_prompt", tmp_path / "best.pth")
    save_base(tmp_path / "base.pt")
    out, info = load_official(tmp_path / "best.pth", "vifi_clip", base=tmp_path / "base.pt")
    assert info["official"]["block"] == {
        "name": "vpt",
        "args": {"depth": 2, "text_depth": 2, "text_placement": "overwrite", "ctx_init": None, "n_vision": 3,
                 "n_text": 3},
    }  # fmt: skip
    assert torch.equal(out["block.vision_prompts"][1], sd["image_encoder.transformer.resblocks.1.VPT_shallow"])
    assert torch.equal(out["block.text_prompts"][0], sd["prompt_learner.ctx"])
    assert set(info["official"]["dropped"]) == {"prompt_learner.token_prefix", "prompt_learner.token_suffix"}


def test_prompt_switch_block_weights(tmp_path):
    sd = save_official("prompt_switch", tmp_path / "model_best.pth")
    out, info = load_official(tmp_path / "model_best.pth")
    assert info["official"]["block"]["args"] == {"num_prompts": 2, "caption": True, "caption_layers": 2,
                                                 "caption_heads": 1}  # fmt: skip
    assert torch.equal(out["block.prompts"], sd["clip.vision_model.encoder.prompt_embedding"])
    assert torch.equal(out["block.aggregate.in_proj_weight"], sd["clip.vision_model.attn.in_proj_weight"])
    assert torch.equal(out["block.caption_head.head.weight"], sd["caption_head.weight"])
    assert torch.equal(
        out["block.caption_head.decoder.layers.1.multihead_attn.in_proj_weight"],
        sd["caption_transformer.layers.1.multihead_attn.in_proj_weight"],
    )


def test_clip4clip_tight_and_3d_patch_refused():
    sd = random_layout(fixture("clip4clip_meanp")["keys"])
    with pytest.raises(UnknownKeysError, match="tightTransf"):
        convert_official({**sd, "similarity_dense.weight": torch.zeros(1, 64)}, "clip4clip")
    with pytest.raises(UnknownKeysError, match="linear_patch 3d"):
        convert_official({**sd, "clip.visual.conv2.weight": torch.zeros(128, 3, 3, 8, 8)}, "clip4clip")


# ---------------------------------------------------------------------------------------------
# ViFi-CLIP's real files: the training config (a yacs CfgNode) beside the weights
# ---------------------------------------------------------------------------------------------
def _fake_yacs(monkeypatch) -> type:
    """A ``yacs.config`` module whose ``CfgNode`` pickles as the real one does (a dict subclass whose
    ``__init__`` sets yacs's flags in ``__dict__``, one of them a set); installed only while saving."""
    import sys
    import types

    class CfgNode(dict):
        def __init__(self, init: dict | None = None) -> None:
            super().__init__(init or {})
            self.__dict__["__immutable__"] = False
            self.__dict__["__deprecated_keys__"] = set()
            self.__dict__["__renamed_keys__"] = {}
            self.__dict__["__new_allowed__"] = False

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    pkg, mod = types.ModuleType("yacs"), types.ModuleType("yacs.config")
    mod.CfgNode, pkg.config = CfgNode, mod
    monkeypatch.setitem(sys.modules, "yacs", pkg)
    monkeypatch.setitem(sys.modules, "yacs.config", mod)
    return CfgNode


def _save_vifi_with_config(monkeypatch, path: Path, extra: dict | None = None) -> dict[str, Tensor]:
    """A ViFi-CLIP ``best.pth`` as its ``epoch_saving`` writes it (config, optimizer, scheduler, ...)."""
    import sys

    cfg_node = _fake_yacs(monkeypatch)
    fx = fixture("vifi_clip_full")
    sd = random_layout(fx["keys"])
    data = cfg_node({"NUM_FRAMES": 8, "INPUT_SIZE": 224, "MEAN": [123.675, 116.28, 103.53]})
    config = cfg_node({"MODEL": cfg_node({"ARCH": "ViT-B/16", "RESUME": ""}), "DATA": data})
    obj = {"model": {"module." + k: v for k, v in sd.items()}, "optimizer": {"state": {}, "param_groups": []},
           "lr_scheduler": {"t_initial": 30, "warmup_t": 5}, "max_accuracy": 81.5, "epoch": 29, "config": config,
           **(extra or {})}  # fmt: skip
    torch.save(obj, path)
    monkeypatch.delitem(sys.modules, "yacs.config")  # reading must not find (or import) yacs
    monkeypatch.delitem(sys.modules, "yacs")
    return sd


def test_vifi_file_with_its_yacs_config_converts(monkeypatch, tmp_path):
    import sys

    sd = _save_vifi_with_config(monkeypatch, tmp_path / "best.pth")
    save_base(tmp_path / "base.pt")
    raw = read_official_file(tmp_path / "best.pth")
    assert raw["config"]["DATA"]["NUM_FRAMES"] == 8 and raw["config"]["MODEL"]["ARCH"] == "ViT-B/16"
    assert "yacs" not in sys.modules
    out, info = load_official(tmp_path / "best.pth", base=tmp_path / "base.pt")
    assert info["official"]["method"] == "vifi_clip" and info["official"]["variant"] == "full"
    assert torch.equal(out["image_tower.conv1.weight"], sd["image_encoder.conv1.weight"])
    assert cli_main(["convert", str(tmp_path / "best.pth"), "--out", str(tmp_path / "out"), "--from", "auto",
                     "--base", str(tmp_path / "base.pt")]) == 0  # fmt: skip
    model, _ = model_from(tmp_path / "out")
    video, ids, mask = inputs()
    with torch.no_grad():
        assert torch.isfinite(model.encode_video(video).embeds).all()


def test_yacs_config_allowed_only_for_official_files(monkeypatch, tmp_path):
    """vidlang's general reader still refuses the same file, naming the yacs global."""
    from vidlang.errors import UnsafeCheckpointError
    from vidlang.models.clip.pretrained import read_state_file

    _save_vifi_with_config(monkeypatch, tmp_path / "best.pth")
    with pytest.raises(UnsafeCheckpointError, match=r"yacs\.config\.CfgNode"):
        read_state_file(tmp_path / "best.pth")


def test_other_foreign_globals_still_refused_by_name(monkeypatch, tmp_path):
    import os

    from vidlang.errors import UnsafeCheckpointError

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    _save_vifi_with_config(monkeypatch, tmp_path / "best.pth", {"hook": Payload()})
    with pytest.raises(UnsafeCheckpointError, match=r"system") as err:
        load_official(tmp_path / "best.pth", base=tmp_path / "base.pt")
    named = str(err.value).split("imports ", 1)[1].split(")", 1)[0]
    assert named == f"{os.system.__module__}.system"  # neither the allowed stand-in nor the set of yacs's flags
    assert not (tmp_path / "ran").exists()


# ---------------------------------------------------------------------------------------------
# M2-CLIP
# ---------------------------------------------------------------------------------------------
def _lin(sd: dict[str, Tensor], p: str, x: Tensor) -> Tensor:
    return x @ sd[f"{p}.weight"].T + sd[f"{p}.bias"]


def ref_m2_adapter(sd: dict[str, Tensor], p: str, x: Tensor, b: int, t: int) -> Tensor:
    """M2-CLIP ``Adapter2`` (with its ``OffsetAdapter``) on ``x [B*T, 1+N, C]``, written from the official math."""
    bt, length, c = x.shape
    g = round((length - 1) ** 0.5)
    patches = x[:, 1:].reshape(b, t, length - 1, c)
    diff = patches - patches[:, [0] + list(range(t - 1))]  # D_0 = 0
    o = _lin(sd, f"{p}.offset_adapter.fc1", diff)  # [B, T, N, r]
    r = o.shape[-1]
    o = o.reshape(b, t, g, g, r).permute(0, 4, 1, 2, 3)
    o = F.conv3d(o, sd[f"{p}.offset_adapter.conv.weight"], sd[f"{p}.offset_adapter.conv.bias"], padding=(0, 1, 1),
                 groups=r)  # fmt: skip
    o = _lin(sd, f"{p}.offset_adapter.fc2", o.permute(0, 2, 3, 4, 1).reshape(bt, length - 1, r))
    e = _lin(sd, f"{p}.fc1", x).reshape(b, t, length, r).permute(0, 2, 3, 1).reshape(b * length, r, t)
    e = F.conv1d(e, sd[f"{p}.conv.weight"], sd[f"{p}.conv.bias"], padding=1, groups=r)
    e = e.permute(0, 2, 1).reshape(b, length, t, r).permute(0, 2, 1, 3).reshape(bt, length, r)
    out = x + _lin(sd, f"{p}.fc2", e)
    return torch.cat([out[:, :1], out[:, 1:] + o], dim=1)


def ref_m2_video(sd: dict[str, Tensor], video: Tensor) -> Tensor:
    """M2-CLIP ``VisionTransformer.forward`` video embedding (adapters pre-MLP, ``t_adapter``, mean over T)."""
    b, t = video.shape[:2]
    v = "visual."
    w = sd[f"{v}conv1.weight"]
    x = F.conv2d(video.flatten(0, 1), w, stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[f"{v}class_embedding"].expand(x.shape[0], 1, -1), x], dim=1) + sd[f"{v}positional_embedding"]
    c = x.shape[-1]
    x = F.layer_norm(x, (c,), sd[f"{v}ln_pre.weight"], sd[f"{v}ln_pre.bias"])
    for i in range(len(_layer_ids(sd, f"{v}transformer.resblocks.", ".attn.in_proj_weight"))):
        p = f"{v}transformer.resblocks.{i}"
        x = ref_layer(x, sd, p, c // 64, pre_mlp=lambda h, p=p: ref_m2_adapter(sd, f"{p}.adapter_pre_mlp", h, b, t))
    f = F.layer_norm(x[:, 0], (c,), sd[f"{v}ln_post.weight"], sd[f"{v}ln_post.bias"]) @ sd[f"{v}proj"]  # [BT, E]
    h = _lin(sd, f"{v}t_adapter.fc1", f).reshape(b, t, -1).transpose(1, 2)
    h = F.conv1d(h, sd[f"{v}t_adapter.conv.weight"], sd[f"{v}t_adapter.conv.bias"], padding=1, groups=h.shape[1])
    f = f + _lin(sd, f"{v}t_adapter.fc2", h.transpose(1, 2).reshape(b * t, -1))
    return f.reshape(b, t, -1).mean(1)


def ref_m2_text(sd: dict[str, Tensor], ids: Tensor) -> Tensor:
    """M2-CLIP ``encode_text``: CLIP's text blocks (not the last, MLM block), text adapters (GELU) before the MLP."""
    length = ids.shape[1]
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][:length]
    w = x.shape[-1]
    causal = torch.full((length, length), float("-inf")).triu(1)[None]
    for i in range(len(_layer_ids(sd, "transformer.resblocks.", ".attn.in_proj_weight"))):
        p = f"transformer.resblocks.{i}.adapter_pre_mlp"
        adapter = None
        if f"{p}.textad_fc1.weight" in sd:
            def adapter(h: Tensor, p: str = p) -> Tensor:
                return h + _lin(sd, f"{p}.textad_fc2", F.gelu(_lin(sd, f"{p}.textad_fc1", h)))
        x = ref_layer(x, sd, f"transformer.resblocks.{i}", w // 64, causal, adapter)
    x = F.layer_norm(x, (w,), sd["ln_final.weight"], sd["ln_final.bias"])
    return x[torch.arange(ids.shape[0]), ids.argmax(-1)] @ sd["text_projection"]


def _layer_ids(sd: dict[str, Tensor], prefix: str, suffix: str) -> list[int]:
    return sorted(int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix) and k.endswith(suffix))


def test_m2clip_outputs_equal_official_forward(tmp_path):
    sd = save_official("m2clip_12x", tmp_path / "checkpoint-11.pth")
    base = save_base(tmp_path / "ViT-B-16.pt")
    assert cli_main(["convert", str(tmp_path / "checkpoint-11.pth"), "--out", str(tmp_path / "out"), "--from", "auto",
                     "--base", str(tmp_path / "ViT-B-16.pt")]) == 0  # fmt: skip
    model, cfg = model_from(tmp_path / "out")
    rec = cfg["converted_from"]
    assert rec["method"] == "m2clip" and rec["from_base"]["keys"] == ["image_tower.*", "text_tower.*", "logit_scale"]
    assert rec["block"]["args"] == {"variant": "12x", "bottleneck": 32, "kernel_t": 3, "text_layers": [1],
                                    "text_bottleneck": 32, "frame_adapter": True, "text_position": "mlp",
                                    "text_up_init": "random", "diff_bias": True}  # fmt: skip
    assert set(rec["dropped"]) == {k for k in sd if k.startswith(("visual.adapter_fc.", "mlm_adapter.",
                                                                  "transformer.resblocks.2."))}  # fmt: skip
    assert model.pretrained_info["loaded_block"]
    official = {**base, **sd}  # what the official model holds: the CLIP it started from + the saved adapters
    video, ids, mask = inputs()
    with torch.no_grad():
        v = model.encode_video(video).embeds
        t = model.encode_text(ids, mask).embeds
        ref_v = ref_m2_video(official, video)
        ref_t = ref_m2_text(official, ids)
    assert (v - ref_v).abs().max() < 1e-5
    assert (t - ref_t).abs().max() < 1e-5
    plain_v = ref_image(base, "visual.", video.flatten(0, 1)).reshape(2, T, -1).mean(1)  # CLIP without adapters
    plain_t = ref_text(base, "", ids, base["token_embedding.weight"])
    assert (v - plain_v).abs().max() > 1e-3 and (t - plain_t).abs().max() > 1e-3  # the adapters act


def test_m2clip_without_base_names_the_missing_keys(tmp_path):
    save_official("m2clip_12x", tmp_path / "checkpoint-11.pth")
    with pytest.raises(ValueError, match=r"image_tower\.\*.*--base"):
        load_official(tmp_path / "checkpoint-11.pth")


def test_m2clip_24x_text_adapters_before_attention_refused():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "official_layouts", Path(__file__).parents[1] / "tools" / "official_layouts.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sd = random_layout(mod.m2clip(pre_attn=True))
    with pytest.raises(UnknownKeysError, match=r"transformer\.resblocks\.0\.adapter_pre_attn\.textad_fc1"):
        convert_official(sd)


def test_m2clip_with_tower_weights_converts_them_and_drops_the_mlm_block():
    """A file that also holds the towers (e.g. a full ``state_dict()``): converted; the MLM block is dropped."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "official_layouts", Path(__file__).parents[1] / "tools" / "official_layouts.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tl = mod.SMALL["tl"]
    keys = {**mod.openai_visual("visual."), **mod.openai_text(""), "logit_scale": [], **mod.m2clip(),
            **mod.openai_layer(f"transformer.resblocks.{tl}", mod.SMALL["tw"])}  # fmt: skip
    sd = random_layout(keys)
    conv = convert_official({"model": sd})
    assert conv.method == "m2clip" and conv.needs == []
    assert torch.equal(conv.state_dict["image_tower.conv1.weight"], sd["visual.conv1.weight"])
    assert not any(k.startswith(f"text_tower.transformer.resblocks.{tl}.") for k in conv.state_dict)
    assert {k for k in sd if k.startswith(f"transformer.resblocks.{tl}.")} <= set(conv.dropped)
    kept = sum(v.numel() for k, v in sd.items() if k not in conv.dropped)
    assert sum(v.numel() for v in conv.state_dict.values()) == kept
