"""``vidlang convert --from METHOD``: the authors' released layouts (issue 21).

The layouts are the JSON fixtures of ``tests/fixtures/official/`` (written by ``tools/official_layouts.py`` from the
authors' parameter naming, small configuration). Each test fills a layout with random tensors, saves it as the
authors' training script does (wrapper, DDP prefix), converts it and checks: every key mapped or dropped with a
reason, unknown keys refused by name, the recorded method / sha256 / block, a model that runs, and, where the math is
the same, outputs equal to a hand-written forward in the official layout.
"""

from __future__ import annotations

import fnmatch
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
        elif k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(100)
        elif k.endswith("running_var"):
            out[k] = 1 + 0.1 * torch.rand(shape, generator=g)
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


def ref_stem(sd: dict[str, Tensor], v: str, images: Tensor) -> Tensor:
    """OpenAI ``VisionTransformer`` up to ``ln_pre``: ``images [N, 3, H, W]`` -> ``[N, 1 + grid^2, C]``."""
    w = sd[f"{v}conv1.weight"]
    x = F.conv2d(images, w, stride=w.shape[-1]).flatten(2).transpose(1, 2)  # [N, grid^2, C]
    cls = sd[f"{v}class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd[f"{v}positional_embedding"]
    return F.layer_norm(x, (x.shape[-1],), sd[f"{v}ln_pre.weight"], sd[f"{v}ln_pre.bias"])


def ref_image(sd: dict[str, Tensor], v: str, images: Tensor) -> Tensor:
    """OpenAI ``VisionTransformer`` forward, tower prefix ``v`` -> ``[N, E]``."""
    x = ref_stem(sd, v, images)
    c = x.shape[-1]
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
    added = [k for k in conv.state_dict if any(fnmatch.fnmatchcase(k, pat) for pat in conv.added)]
    in_dict = [pat for pat in conv.added if "embed_proj" not in pat]  # the Q-former's head is added after --base
    assert all(any(fnmatch.fnmatchcase(k, pat) for k in conv.state_dict) for pat in in_dict)
    converted = sum(v.numel() for k, v in conv.state_dict.items() if k not in added)
    assert converted == official_values  # nothing lost, nothing invented (beyond the declared additions)
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
    x = ref_stem(sd, v, video.flatten(0, 1))
    c = x.shape[-1]
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


# ---------------------------------------------------------------------------------------------
# ILA (models/xclip.py, mat.py, align.py, mit.py), written from the official math, eval mode
# ---------------------------------------------------------------------------------------------
def _layouts_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "official_layouts", Path(__file__).parents[1] / "tools" / "official_layouts.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bn(sd: dict[str, Tensor], p: str, x: Tensor) -> Tensor:
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                        False, 0.0, 1e-5)  # fmt: skip


def _conv(sd: dict[str, Tensor], p: str, x: Tensor, **kw) -> Tensor:
    w = sd[f"{p}.weight"]
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[w.dim()]
    return conv(x, w, sd[f"{p}.bias"], **kw)


def _ila_mask(point: Tensor, n: int) -> Tensor:
    """``aligned_mask_generation`` for ``point [..., 2]`` (x, y) -> ``[..., n, n]``."""
    d = (torch.arange(n) / (n - 1) * 2 - 1)[:, None] - point[..., None, :]  # [..., n, 2]
    flat = ((d >= -0.25) & (d <= 0.25)).float()
    slope = 1 - (d.abs() - 0.25) * 1.5
    m = flat + F.relu((1 - flat) * slope * (slope >= 0))
    return m[..., 1].unsqueeze(-1) * m[..., 0].unsqueeze(-2)


def ref_ila_update(sd: dict[str, Tensor], p: str, x: Tensor, b: int, t: int) -> Tensor:
    """``MultiAxisAttentionBlock``'s two skip terms (evaluation) on ``x [B*T, 1+N, C]``."""
    c = x.shape[-1]
    n = round((x.shape[1] - 1) ** 0.5)
    m = F.layer_norm(_lin(sd, f"{p}.message_fc", x), (c,), sd[f"{p}.message_ln.weight"], sd[f"{p}.message_ln.bias"])
    m = m.view(b, t, -1, c)
    cls, maps = m[:, :, :1], m[:, :, 1:].reshape(b, t, n, n, c).permute(0, 1, 4, 2, 3)  # [B, T, C, n, n]
    pairs = torch.cat([maps[:, :-1], maps[:, 1:]], dim=2).flatten(0, 1)  # [B(T-1), 2C, n, n]
    a = f"{p}.message_attn"
    g = F.relu(_bn(sd, f"{a}.interactive_block.0.depthwise_conv.1", _conv(
        sd, f"{a}.interactive_block.0.depthwise_conv.0", pairs, padding=1, groups=2 * c)))
    pw = f"{a}.interactive_block.0.pointwise_conv"
    g = F.relu(_bn(sd, f"{pw}.1", _conv(sd, f"{pw}.0", g)))
    g = F.relu(_bn(sd, f"{a}.interactive_block.2", _conv(sd, f"{a}.interactive_block.1", g, padding=1)))
    h = F.relu(F.max_pool2d(_bn(sd, f"{a}.prediction_block.1", _conv(sd, f"{a}.prediction_block.0", g, padding=1)), 2))
    h = F.relu(F.max_pool2d(_bn(sd, f"{a}.prediction_block.5", _conv(sd, f"{a}.prediction_block.4", h, padding=1)), 2))
    h = h.amax(dim=(-2, -1)).view(b, t - 1, -1).transpose(1, 2)  # [B, 128, T-1]
    h = _conv(sd, f"{a}.prediction_block.12", F.relu(_conv(sd, f"{a}.prediction_block.10", h, groups=2)), groups=2)
    pts = torch.tanh(h).transpose(1, 2) * 0.75  # [B, T-1, 4]
    pre = _ila_mask(pts[..., :2], n)[:, :, None] * maps[:, :-1]  # [B, T-1, C, n, n]
    cur = _ila_mask(pts[..., 2:], n)[:, :, None] * maps[:, 1:]

    def roles(first: Tensor, second: Tensor) -> Tensor:  # per pair -> per frame (middle frames averaged)
        return torch.cat([first[:, :1], (first[:, 1:] + second[:, :-1]) / 2, second[:, -1:]], dim=1)

    aligned = roles(pre, cur).flatten(3).transpose(-1, -2)  # [B, T, N, C]
    aligned = torch.cat([cls, aligned], dim=2)
    g = g.view(b, t - 1, *g.shape[1:])
    half = g.shape[2] // 2
    feats = roles(g[:, :, :half], g[:, :, half:]).transpose(1, 2)  # [B, 128, T, n, n]
    feats = _conv(sd, f"{a}.conv", feats, padding=(1, 0, 0)).flatten(3).permute(0, 2, 3, 1)  # [B, T, N, 128]
    feats = torch.cat([cls, _lin(sd, f"{a}.fc", feats)], dim=2)
    out = _lin(sd, f"{p}.temporal_skip_align_fc", aligned) + _lin(sd, f"{p}.temporal_skip_fc", feats)
    return out.reshape(b * t, -1, c)


def ref_ila_video(sd: dict[str, Tensor], video: Tensor, with_tokens: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """ILA's ``encode_video`` video embedding: aligned CLIP -> per-frame CLS embeddings -> MIT (mean over T);
    ``with_tokens``: also the K400 forward's visual tokens ``[B, N, E]`` (last-layer patch tokens, before
    ``ln_post`` -> ``prompts_visual_ln`` -> ``@ prompts_visual_proj`` -> mean over frames)."""
    b, t = video.shape[:2]
    v = "visual."
    x = ref_stem(sd, v, video.flatten(0, 1))
    c = x.shape[-1]
    for i in range(len(_layer_ids(sd, f"{v}transformer.resblocks.", ".attn.in_proj_weight"))):
        p = f"{v}transformer.resblocks.{i}"
        x = ref_layer(x + ref_ila_update(sd, p, x, b, t), sd, p, c // 64)
    f = F.layer_norm(x[:, 0], (c,), sd[f"{v}ln_post.weight"], sd[f"{v}ln_post.bias"]) @ sd[f"{v}proj"]
    f = f.view(b, t, -1)
    y = ref_layer(f + sd["mit.positional_embedding"], sd, "mit.resblocks.0", f.shape[-1] // 64)
    if not with_tokens:
        return (y + f).mean(1)
    img = _ln(sd, "prompts_visual_ln", x[:, 1:]) @ sd["prompts_visual_proj"]  # [B*T, N, E]
    return (y + f).mean(1), img.view(b, t, -1, img.shape[-1]).mean(1)


def ref_video_specific_prompt(sd: dict[str, Tensor], text: Tensor, img: Tensor) -> Tensor:
    """``models/prompt.py`` ``VideoSpecificPrompt`` (eval) as ILA's K400 ``forward`` uses it: ``text [K, E]``,
    ``img [B, N, E]`` -> ``text + prompts_generator(text, img)`` ``[B, K, E]``."""
    b, e = img.shape[0], text.shape[-1]
    heads = e // 64
    x = text.unsqueeze(0).expand(b, -1, -1)
    mem = _ln(sd, "prompts_generator.norm", img)
    k = 0
    while f"prompts_generator.decoder.{k}.norm1.weight" in sd:
        g = f"prompts_generator.decoder.{k}"
        q = _ln(sd, f"{g}.norm1", x)

        def split(y: Tensor, name: str, g: str = g) -> Tensor:
            return (y @ sd[f"{g}.cross_attn.{name}_proj.weight"].T).view(b, y.shape[1], heads, -1).transpose(1, 2)

        att = (split(q, "q") @ split(mem, "k").transpose(-2, -1) * (e // heads) ** -0.5).softmax(-1)
        x = x + _lin(sd, f"{g}.cross_attn.proj", (att @ split(mem, "v")).transpose(1, 2).reshape(b, -1, e))
        h = _lin(sd, f"{g}.mlp.0", _ln(sd, f"{g}.norm3", x))
        x = x + _lin(sd, f"{g}.mlp.3", h * torch.sigmoid(1.702 * h))
        k += 1
    return text + sd["prompts_generator.alpha"] * x


def test_ila_outputs_equal_official_forward(tmp_path):
    sd = save_official("ila_k400", tmp_path / "best.pth")
    assert cli_main(["convert", str(tmp_path / "best.pth"), "--out", str(tmp_path / "out"), "--from", "auto"]) == 0
    model, cfg = model_from(tmp_path / "out")
    rec = cfg["converted_from"]
    assert rec["method"] == "ila" and rec["variant"] == "k400"
    assert rec["block"]["args"] == {"hidden": 256, "interaction": "dwsep", "pool": "mit", "mit_layers": 1,
                                    "max_frames": T, "video_prompts": True, "prompt_layers": 2}  # fmt: skip
    assert not rec["dropped"]  # the prompt generator is kept (it changes every K400 logit)
    assert model.block.conditions_text
    video, ids, mask = inputs()
    with torch.no_grad():
        out = model.encode_video(video)
        v = out.embeds
        t = model.encode_text(ids, mask).embeds
        ref_v, ref_img = ref_ila_video(sd, video, with_tokens=True)
        ref_t = ref_text(sd, "", ids, sd["token_embedding.weight"])
        plain = ref_image(sd, "visual.", video.flatten(0, 1)).reshape(2, T, -1)
        # the K400 forward's class logits: text features + the (frozen, untrained) prompt generator's output
        scale = sd["logit_scale"].exp()
        ref_cls = F.normalize(ref_video_specific_prompt(sd, ref_t, ref_img), dim=-1)  # [B, K, E]
        ref_logits = scale * torch.einsum("be,bke->bk", F.normalize(ref_v, dim=-1), ref_cls)
        cls = F.normalize(model.block.condition_text(t, out), dim=-1)
        logits = model.logit_scale.exp() * torch.einsum("be,bke->bk", F.normalize(v, dim=-1), cls)
        plain_logits = scale * F.normalize(ref_v, dim=-1) @ F.normalize(ref_t, dim=-1).T
    assert (v - ref_v).abs().max() < 1e-5
    assert (t - ref_t).abs().max() < 1e-5
    assert (out.tokens - ref_img).abs().max() < 1e-4 * ref_img.abs().max()
    assert (logits - ref_logits).abs().max() < 1e-5 * scale
    assert (v - plain.mean(1)).abs().max() > 1e-3  # the alignment and the MIT act
    assert (ref_logits - plain_logits).abs().max() > 1e-3 * scale  # the generator acts


def test_ila_ssv2_interaction_and_unknown_message_key():
    sd = random_layout(fixture("ila_k400")["keys"])
    p = "visual.transformer.resblocks.0.message_attn."
    sd[p + "interactive_block.0.extra.weight"] = torch.zeros(2)
    with pytest.raises(UnknownKeysError, match=r"resblocks\.0\.message_attn\.interactive_block\.0\.extra\.weight"):
        convert_official(sd)
    ssv2 = {k: v for k, v in random_layout(fixture("ila_k400")["keys"]).items() if ".interactive_block." not in k}
    c = 128
    for i in range(2):
        q = f"visual.transformer.resblocks.{i}.message_attn.interactive_block."
        ssv2.update({q + "0.weight": torch.zeros(256, 2 * c, 3, 3), q + "0.bias": torch.zeros(256),
                     q + "3.weight": torch.zeros(256, 256, 3, 3), q + "3.bias": torch.zeros(256)})  # fmt: skip
        for j in (1, 4):
            ssv2.update({q + f"{j}.{n}": torch.ones(256) for n in ("weight", "bias", "running_mean", "running_var")})
    conv = convert_official(ssv2)
    assert conv.variant == "ssv2" and conv.block_args["interaction"] == "conv" and conv.block_args["hidden"] == 256
    assert conv.state_dict["block.layers.1.interact.3.weight"].shape == (256, 256, 3, 3)


# ---------------------------------------------------------------------------------------------
# Mug-STAN (clip_stan_hf.py, mug_head.py), transformers CLIP names, patch-major branch as the official code
# ---------------------------------------------------------------------------------------------
def _hf_attn(x: Tensor, sd: dict[str, Tensor], p: str, heads: int, mask: Tensor | None = None) -> Tensor:
    n, length, w = x.shape
    q, k, v = (_lin(sd, f"{p}.{n_}_proj", x).view(n, length, heads, -1).transpose(1, 2) for n_ in "qkv")
    att = q @ k.transpose(-1, -2) * (w // heads) ** -0.5
    if mask is not None:
        att = att + mask
    return _lin(sd, f"{p}.out_proj", (att.softmax(-1) @ v).transpose(1, 2).reshape(n, length, w))


def _ln(sd: dict[str, Tensor], p: str, x: Tensor) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), sd[f"{p}.weight"], sd[f"{p}.bias"])


def _hf_mlp(sd: dict[str, Tensor], p: str, x: Tensor) -> Tensor:
    h = _lin(sd, f"{p}.fc1", x)
    return _lin(sd, f"{p}.fc2", h * torch.sigmoid(1.702 * h))


def ref_hf_layer(x: Tensor, sd: dict[str, Tensor], p: str, mask: Tensor | None = None) -> Tensor:
    heads = x.shape[-1] // 64
    x = x + _hf_attn(_ln(sd, f"{p}.layer_norm1", x), sd, f"{p}.self_attn", heads, mask)
    return x + _hf_mlp(sd, f"{p}.mlp", _ln(sd, f"{p}.layer_norm2", x))


def ref_stan_frames(sd: dict[str, Tensor], video: Tensor) -> Tensor:
    """``VITCLIPPretrained_STAN`` with ``return_mean=False`` -> per-frame embeddings ``[B, T, E]``."""
    b, t = video.shape[:2]
    bb = "backbone"
    w = sd[f"{bb}.patch_embedding.weight"]
    x = F.conv2d(video.flatten(0, 1), w, stride=w.shape[-1]).flatten(2).transpose(1, 2)
    pos = sd[f"{bb}.position_embedding.weight"]
    x = torch.cat([sd[f"{bb}.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1) + pos
    x = _ln(sd, f"{bb}.pre_layrnorm", x)
    c = x.shape[-1]
    heads = c // 64
    layers = len(_layer_ids(sd, f"{bb}.layers.", ".self_attn.q_proj.weight"))
    depth = len(_layer_ids(sd, f"{bb}.STAN_S_layers.", ".self_attn.q_proj.weight"))
    x2 = None
    for idx in range(layers):
        x = ref_hf_layer(x, sd, f"{bb}.layers.{idx}")
        if idx < layers - depth:
            continue
        j = idx - (layers - depth)
        x1 = x.view(b, t, -1, c)
        patches = x1[:, :, 1:]  # [B, T, N, C]
        if x2 is None:  # input_ini
            time = sd[f"{bb}.STAN_time_embed.weight"][:t]
            patches = patches + pos[1:] + time[:, None]
            cls = (x1[:, :, 0].mean(1, keepdim=True) + sd[f"{bb}.class_embedding"] + pos[0]) / 2
            seq = torch.cat([cls, patches.transpose(1, 2).flatten(1, 2)], dim=1)  # patch-major (l t)
        else:
            seq = x2 + torch.cat([x1[:, :, 0].mean(1, keepdim=True), patches.transpose(1, 2).flatten(1, 2)], dim=1)
        tl = f"{bb}.STAN_T_layers.{j}"
        q = seq[:, 1:].reshape(-1, t, c)  # [(B N), T, C]
        h = _lin(sd, f"{tl}.temporal_fc", _hf_attn(_ln(sd, f"{tl}.layer_norm1", q), sd, f"{tl}.self_attn", heads))
        seq = torch.cat([seq[:, :1], seq[:, 1:] + h.reshape(b, -1, c)], dim=1)
        sl = f"{bb}.STAN_S_layers.{j}"
        n = (seq.shape[1] - 1) // t
        frames = torch.cat([seq[:, :1].repeat_interleave(t, 0), seq[:, 1:].view(b, n, t, c).transpose(1, 2)
                            .reshape(b * t, n, c)], dim=1)  # fmt: skip
        a = _hf_attn(_ln(sd, f"{sl}.layer_norm1", frames), sd, f"{sl}.self_attn", heads)
        a_cls = a[:, :1].view(b, t, 1, c).mean(1)
        a_p = a[:, 1:].view(b, t, n, c).transpose(1, 2).reshape(b, n * t, c)
        seq = seq + torch.cat([a_cls, a_p], dim=1)
        x2 = seq + _hf_mlp(sd, f"{sl}.mlp", _ln(sd, f"{sl}.layer_norm2", seq))
    cls = x[:, 0] + x2[:, 0].repeat_interleave(t, 0)
    return (_ln(sd, f"{bb}.post_layernorm", cls) @ sd[f"{bb}.visual_projection.weight"].T).view(b, t, -1)


def ref_stan_text_tokens(sd: dict[str, Tensor], ids: Tensor) -> Tensor:
    """``CLIPTextPretrained(all_proj=True)``: projected token states after ``final_layer_norm`` ``[A, L, E]``."""
    t = "text_backbone.text_model"
    x = sd[f"{t}.embeddings.token_embedding.weight"][ids] + sd[f"{t}.embeddings.position_embedding.weight"][
        : ids.shape[1]]  # fmt: skip
    causal = torch.full((ids.shape[1],) * 2, float("-inf")).triu(1)
    for i in range(len(_layer_ids(sd, f"{t}.encoder.layers.", ".self_attn.q_proj.weight"))):
        x = ref_hf_layer(x, sd, f"{t}.encoder.layers.{i}", causal)
    return _ln(sd, f"{t}.final_layer_norm", x) @ sd["text_backbone.text_projection.weight"].T


def ref_mug_head(text: Tensor, video: Tensor, mask: Tensor, tau: float = 100.0) -> Tensor:
    """``Mug_head(mode='mug_frame_token_simple')`` -> ``[A, B]`` (padding found by exact zeros, as the code)."""
    text = text / text.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    video = video / video.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    s = torch.einsum("atd,bvd->abtv", text, video) * mask[:, None, :, None]
    inf = torch.tensor(float("-inf"))
    t2v = (s * (s * tau).softmax(-1)).sum(-1)
    v2t = (s * (torch.where(s == 0, inf, s) * tau).softmax(-2)).sum(-2)
    t2v = (t2v * (torch.where(t2v == 0, inf, t2v) * tau).softmax(-1)).sum(2)
    v2t = (v2t * (v2t * tau).softmax(-1)).sum(2)
    return (t2v + v2t) / 2


def test_mugstan_outputs_equal_official_forward(tmp_path):
    from vidlang.models.similarity import mug_similarity

    sd = save_official("mugstan", tmp_path / "mugstan.pth")
    assert cli_main(["convert", str(tmp_path / "mugstan.pth"), "--out", str(tmp_path / "out"), "--from", "auto"]) == 0
    model, cfg = model_from(tmp_path / "out")
    rec = cfg["converted_from"]
    assert rec["method"] == "mugstan" and rec["block"]["name"] == "stan"
    assert rec["block"]["args"] == {"depth": 2, "max_frames": 64, "drop_path": 0.1, "time_module": "attn",
                                    "cls_residue": False}  # fmt: skip
    assert model.logit_scale.exp().item() == pytest.approx(100.0)
    video, ids, mask = inputs()
    with torch.no_grad():
        vo = model.encode_video(video)
        to = model.encode_text(ids, mask)
        ref_f = ref_stan_frames(sd, video)
        ref_tok = ref_stan_text_tokens(sd, ids)
        ours = mug_similarity(to.tokens, to.mask, vo.frame_embeds)
        official = ref_mug_head(ref_tok, ref_f, (ids != 0).float())
    assert (vo.frame_embeds - ref_f).abs().max() < 1e-5
    assert (vo.embeds - ref_f.mean(1)).abs().max() < 1e-5
    assert (to.tokens[to.mask] - ref_tok[ids != 0]).abs().max() < 1e-5
    assert (ours - official).abs().max() < 1e-5


def test_mugstan_conv_time_module_and_3d_patch_refused():
    sd = random_layout(fixture("mugstan")["keys"])
    with pytest.raises(UnknownKeysError, match="time_module='conv'"):
        convert_official({**sd, "backbone.STAN_T_layers.0.conv.weight": torch.zeros(2)}, "mugstan")
    with pytest.raises(UnknownKeysError, match="patch_3d"):
        convert_official({**sd, "backbone.patch_embedding_3d.weight": torch.zeros(2)}, "mugstan")


# ---------------------------------------------------------------------------------------------
# Video-LLaMA: the video Q-former (BLIP-2 BERT, query path) and llama_proj
# ---------------------------------------------------------------------------------------------
def _bert_ln(sd: dict[str, Tensor], p: str, x: Tensor) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-12)


def _bert_attn(sd: dict[str, Tensor], p: str, x: Tensor, ctx: Tensor, heads: int) -> Tensor:
    n, q_len, d = x.shape
    q = _lin(sd, f"{p}.self.query", x).view(n, q_len, heads, -1).transpose(1, 2)
    k = _lin(sd, f"{p}.self.key", ctx).view(n, ctx.shape[1], heads, -1).transpose(1, 2)
    v = _lin(sd, f"{p}.self.value", ctx).view(n, ctx.shape[1], heads, -1).transpose(1, 2)
    o = ((q @ k.transpose(-1, -2) / (d // heads) ** 0.5).softmax(-1) @ v).transpose(1, 2).reshape(n, q_len, d)
    return _bert_ln(sd, f"{p}.output.LayerNorm", _lin(sd, f"{p}.output.dense", o) + x)


def ref_video_qformer(sd: dict[str, Tensor], frame_tokens: Tensor) -> tuple[Tensor, Tensor]:
    """``encode_videoQformer_visual`` from the per-frame tokens ``[B, T, M, Dc]`` -> (Q-former output, llama_proj)."""
    b, t = frame_tokens.shape[:2]
    ctx = (frame_tokens + sd["video_frame_position_embedding.weight"][:t, None]).flatten(1, 2)
    q = "video_Qformer.bert"
    h = _bert_ln(sd, f"{q}.embeddings.LayerNorm", sd["video_query_tokens"].expand(b, -1, -1))
    heads = h.shape[-1] // 64
    for i in range(len(_layer_ids(sd, f"{q}.encoder.layer.", ".attention.self.query.weight"))):
        p = f"{q}.encoder.layer.{i}"
        h = _bert_attn(sd, f"{p}.attention", h, h, heads)
        h = _bert_attn(sd, f"{p}.crossattention", h, ctx, heads)
        f = F.gelu(_lin(sd, f"{p}.intermediate_query.dense", h))
        h = _bert_ln(sd, f"{p}.output_query.LayerNorm", _lin(sd, f"{p}.output_query.dense", f) + h)
    return h, _lin(sd, "llama_proj", h)


def test_videollama_qformer_and_projection_equal_official_forward(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vidlang.models.chat import ChatEncoder
    from vidlang.serve.testing import tiny_llm

    sd = save_official("videollama", tmp_path / "checkpoint_best.pth")
    save_base(tmp_path / "base.pt")
    assert cli_main(["convert", str(tmp_path / "checkpoint_best.pth"), "--out", str(tmp_path / "out"), "--from",
                     "auto", "--base", str(tmp_path / "base.pt")]) == 0  # fmt: skip
    model, cfg = model_from(tmp_path / "out")
    rec = cfg["converted_from"]
    assert rec["method"] == "videollama" and rec["block"]["args"]["llm_dim"] == 32
    assert rec["dropped"] == {"video_Qformer.bert.embeddings.position_ids": rec["dropped"][
        "video_Qformer.bert.embeddings.position_ids"]}  # fmt: skip
    g = torch.Generator().manual_seed(3)
    frame_tokens = torch.randn(2, T, 17, 128, generator=g)
    video, ids, mask = inputs()
    with torch.no_grad():
        tokens = model.block.query_tokens(frame_tokens, torch.zeros(2, T, 64))
        ref_tokens, ref_llm = ref_video_qformer(sd, frame_tokens)
        out = model.encode_video(video)
        plain = ref_image(torch.load(tmp_path / "base.pt"), "visual.", video.flatten(0, 1)).reshape(2, T, -1).mean(1)
    assert (tokens - ref_tokens).abs().max() < 1e-5
    assert (model.block.llm_head(tokens) - ref_llm).abs().max() < 1e-5
    assert (out.embeds - plain).abs().max() < 1e-5  # pool "residual" with the zero head: frame-mean CLIP
    llm_dir = tiny_llm(tmp_path / "llm", ["a", "b"])
    enc = ChatEncoder(model, AutoModelForCausalLM.from_pretrained(llm_dir), AutoTokenizer.from_pretrained(llm_dir))
    assert torch.equal(enc.video_proj.weight, sd["llama_proj.weight"])
    assert torch.equal(enc.video_proj.bias, sd["llama_proj.bias"])
    assert not enc.visual.block.llm_head.weight.requires_grad and enc.video_proj.weight.requires_grad


def test_videollama_base_of_other_width_and_audio_only_refused(tmp_path):
    mod = _layouts_module()
    sd = random_layout(mod.videollama(s={**mod.SMALL, "vw": 192}))
    torch.save({"model": sd}, tmp_path / "vl.pth")
    save_base(tmp_path / "base.pt")
    with pytest.raises(ValueError, match=r"192-wide frame tokens .* 128 wide"):
        load_official(tmp_path / "vl.pth", base=tmp_path / "base.pt")
    audio = {"audio_query_tokens": torch.zeros(1, 8, 64), "audio_llama_proj.weight": torch.zeros(32, 64)}
    with pytest.raises(UnknownKeysError, match="audio branch only"):
        convert_official(audio, "videollama")


def test_the_layout_tool_writes_the_fixtures(tmp_path):
    """``tools/official_layouts.py`` reproduces every fixture of ``tests/fixtures/official`` exactly."""
    import subprocess
    import sys

    tool = Path(__file__).parents[1] / "tools" / "official_layouts.py"
    subprocess.run([sys.executable, str(tool), "--out", str(tmp_path)], check=True, capture_output=True)
    assert sorted(p.name for p in tmp_path.glob("*.json")) == sorted(p.name for p in FIXTURES.glob("*.json"))
    for p in FIXTURES.glob("*.json"):
        assert (tmp_path / p.name).read_text() == p.read_text(), p.name
