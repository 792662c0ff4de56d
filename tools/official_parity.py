"""Parity with an authors' code: build the official model (random weights, CPU, fp32), save it in the official
layout, convert it with ``vidlang.models.official.load_official``, and report the max abs difference of the text
embeddings and the text->video logits between the official forward and vidlang's on the same inputs.

    python tools/official_parity.py clip4clip /path/to/CLIP4Clip-checkout [--head meanP|seqTransf|seqLSTM]
    python tools/official_parity.py xclip /path/to/VideoX/X-CLIP

The checkout is only read (its directory goes on ``sys.path``). Implemented: ``clip4clip``, ``xclip`` (the official
``XCLIP`` built from its constructor with random weights, T = 4; video embeddings, text embeddings and the logits
with video-specific class prompts, ``use_cache=False``; X-CLIP's modules import only torch, timm, PIL, torchvision,
tqdm and the tokenizer's ``ftfy`` / ``regex``, and nothing is downloaded). ViFi-CLIP and Prompt
Switch are not wired yet (their model code needs a CLIP download / the transformers ``from_pretrained`` hub call at
construction); for them the tests compare against hand-written official-layout forwards instead.

CLIP4Clip's ``modules/file_utils.py`` imports ``boto3`` / ``botocore`` / ``requests`` for downloads it never makes here;
when they are not installed, inert stand-in modules are registered so that the import succeeds (nothing is downloaded).
The official model casts CLIP to fp16 in its constructor (``convert_weights``); it is cast back to fp32 here.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.nn.functional as F

# a small OpenAI-CLIP configuration (CLIP4Clip reads every size from the state dict; heads = width / 64)
SMALL = {"vw": 128, "vl": 2, "patch": 8, "grid": 4, "tw": 64, "tl": 2, "ctx": 77, "vocab": 100, "embed": 64}


def _stub_boto() -> None:
    for name in ("boto3", "botocore", "botocore.exceptions", "requests"):
        if name not in sys.modules:
            try:
                __import__(name)
            except ImportError:
                mod = types.ModuleType(name)
                mod.ClientError = type("ClientError", (Exception,), {})  # only named in an except clause
                sys.modules[name] = mod


def _random_openai_clip(seed: int = 0) -> dict[str, torch.Tensor]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from official_layouts import openai_text, openai_visual

    g = torch.Generator().manual_seed(seed)
    keys = {**openai_visual("visual.", SMALL), **openai_text("", s=SMALL)}
    sd = {k: 0.05 * torch.randn(shape, generator=g) for k, shape in keys.items()}
    for k in sd:
        if k.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight")):
            sd[k] = 1 + 0.1 * torch.randn(sd[k].shape, generator=g)
    sd["logit_scale"] = torch.tensor(4.6)
    return sd


def clip4clip(repo: Path, head: str, frames: int = 4) -> dict[str, float]:
    _stub_boto()
    sys.path.insert(0, str(repo))
    from modules.modeling import CLIP4Clip
    from modules.module_cross import CrossConfig

    cross = CrossConfig.from_json_file(str(repo / "modules" / "cross-base" / "cross_config.json"))
    cross.hidden_size = SMALL["embed"]  # the frame position table has the cross width; it must be the embed dim
    task = types.SimpleNamespace(max_words=32, max_frames=frames, loose_type=True, linear_patch="2d", sim_header=head,
                                 cross_num_hidden_layers=2, local_rank=0)  # fmt: skip
    torch.manual_seed(0)
    model = CLIP4Clip(cross, _random_openai_clip(), task).float().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random heads (the constructor leaves some at init values)
        for k, p in model.named_parameters():
            if not k.startswith("clip."):
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    b = 2
    video = torch.randn(b, 1, frames, 1, 3, 32, 32, generator=g)
    video_mask = torch.ones(b, frames, dtype=torch.long)
    ids = torch.tensor([[98, 5, 17, 99, 0, 0], [98, 40, 41, 42, 43, 99]])
    attn = (torch.arange(6) <= ids.argmax(-1, keepdim=True)).long()
    with torch.no_grad():
        seq, vis = model.get_sequence_visual_output(ids, torch.zeros_like(ids), attn, video, video_mask)
        logits = model.get_similarity_logits(seq, vis, attn, video_mask, loose_type=True)[0]  # [A, B]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pytorch_model.bin.0"
        torch.save(model.state_dict(), path)
        from vidlang.models.clip.pretrained import save_vidlang
        from vidlang.models.factory import ModelConfig, build_model
        from vidlang.models.official import load_official

        sd, info = load_official(path, "clip4clip")
        save_vidlang(sd, info, Path(tmp) / "out")
        cfg = json.loads((Path(tmp) / "out" / "config.json").read_text())
        blk = cfg["converted_from"]["block"]
        mc = ModelConfig(image="vit_b32", image_overrides=cfg["vision"], text_overrides=cfg["text"], block=blk["name"],
                         block_args=blk["args"], pretrained=str(Path(tmp) / "out"), num_frames=frames)  # fmt: skip
        ours = build_model(mc).eval()
        with torch.no_grad():
            v = ours.encode_video(video.reshape(b, frames, 3, 32, 32)).embeds
            t = ours.encode_text(ids, attn).embeds
            our_logits = ours.logit_scale.exp() * F.normalize(t, dim=-1) @ F.normalize(v, dim=-1).T
    return {
        "text_embeds": (t - seq.squeeze(1)).abs().max().item(),
        "logits": (our_logits - logits).abs().max().item(),
        "logit_scale": ours.logit_scale.exp().item(),
    }


def xclip(repo: Path, frames: int = 4) -> dict[str, float]:
    sys.path.insert(0, str(repo))
    import clip  # noqa: F401  (the official package order: clip first, then models.xclip)
    from models.xclip import XCLIP

    s = SMALL
    torch.manual_seed(0)
    model = XCLIP(s["embed"], s["patch"] * s["grid"], s["vl"], s["vw"], s["patch"], s["ctx"], s["vocab"], s["tw"],
                  s["tw"] // 64, s["tl"], T=frames, mit_layers=1, prompts_alpha=0.1, prompts_layers=2,
                  use_cache=False).float().eval()  # fmt: skip
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every parameter off its init (alpha 0.1, zero biases, unit norms would hide mistakes)
        for k, p in model.named_parameters():
            if k != "logit_scale":
                p.add_((0.1 if p.ndim < 2 else 0.02) * torch.randn(p.shape, generator=g))
    b, size = 2, s["patch"] * s["grid"]
    video = torch.randn(b, frames, 3, size, size, generator=g)
    ids = torch.zeros(3, s["ctx"], dtype=torch.long)  # K = 3 class names: SOT ... EOT (the largest id), padding 0
    for row, words in enumerate([[5, 17], [40, 41, 42, 43], [7]]):
        ids[row, : len(words) + 2] = torch.tensor([98, *words, 99])
    attn = (torch.arange(s["ctx"]) <= ids.argmax(-1, keepdim=True)).long()
    with torch.no_grad():
        ref_video, _ = model.encode_video(video)  # [B, E]
        ref_text = model.encode_text(ids)  # [K, E]
        ref_logits = model(video, ids)  # [B, K]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k400_32_8.pth"
        torch.save({"model": model.state_dict(), "epoch": 29, "max_accuracy": 0.0}, path)
        from vidlang.models.clip.pretrained import save_vidlang
        from vidlang.models.factory import ModelConfig, build_model
        from vidlang.models.official import load_official

        sd, info = load_official(path, "xclip")
        save_vidlang(sd, info, Path(tmp) / "out")
        cfg = json.loads((Path(tmp) / "out" / "config.json").read_text())
        blk = cfg["converted_from"]["block"]
        mc = ModelConfig(image="vit_b32", image_overrides=cfg["vision"], text_overrides=cfg["text"], block=blk["name"],
                         block_args=blk["args"], pretrained=str(Path(tmp) / "out"), num_frames=frames)  # fmt: skip
        ours = build_model(mc).eval()
        with torch.no_grad():
            out = ours.encode_video(video)
            t = ours.encode_text(ids, attn).embeds
            text_b = F.normalize(ours.block.condition_text(t, out), dim=-1)  # [B, K, E]
            our_logits = ours.logit_scale.exp() * torch.einsum("be,bke->bk", F.normalize(out.embeds, dim=-1), text_b)
    return {
        "video_embeds": (out.embeds - ref_video).abs().max().item(),
        "text_embeds": (t - ref_text).abs().max().item(),
        "logits": (our_logits - ref_logits).abs().max().item(),
        "logit_scale": ours.logit_scale.exp().item(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("method", choices=["clip4clip", "xclip"])
    ap.add_argument("repo", type=Path, help="local checkout of the official repository (read only)")
    ap.add_argument("--head", default="all", choices=["all", "meanP", "seqTransf", "seqLSTM"])
    args = ap.parse_args()
    if args.method == "xclip":
        r = xclip(args.repo)
        print("| method | variant | max abs diff video embeds | text embeds | logits (scale ~14) |")
        print("|---|---|---|---|---|")
        print(f"| xclip | T4 | {r['video_embeds']:.2e} | {r['text_embeds']:.2e} | {r['logits']:.2e} |")
        return 0 if max(r["video_embeds"], r["text_embeds"], r["logits"] / r["logit_scale"]) <= 1e-5 else 1
    heads = ["meanP", "seqTransf", "seqLSTM"] if args.head == "all" else [args.head]
    print("| method | variant | max abs diff text embeds | max abs diff logits (scale ~100) |")
    print("|---|---|---|---|")
    worst = 0.0
    for head in heads:
        r = clip4clip(args.repo, head)
        worst = max(worst, r["text_embeds"], r["logits"] / r["logit_scale"])
        print(f"| clip4clip | {head} | {r['text_embeds']:.2e} | {r['logits']:.2e} |")
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
