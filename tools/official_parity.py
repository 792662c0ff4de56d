"""Parity with an authors' code: build the official model (random weights, CPU, fp32), save it in the official
layout, convert it with ``vidlang.models.official.load_official``, and report the max abs difference of the
embeddings and logits between the official forward and vidlang's on the same inputs.

    python tools/official_parity.py METHOD /path/to/official-checkout

``clip4clip`` (ArrowLuo/CLIP4Clip; ``--head meanP|seqTransf|seqLSTM``), ``xclip`` (microsoft/VideoX, its ``X-CLIP``
folder: the official ``XCLIP`` built by its constructor, T = 4, video-specific class prompts, ``use_cache=False``;
nothing is downloaded), ``ila`` (Francis-Rings/ILA),
``mugstan`` (farewellthree/STAN), ``videollama`` (DAMO-NLP-SG/Video-LLaMA), ``vifi_clip`` and ``vifi_clip_prompt``
(muzairkhattak/ViFi-CLIP), ``prompt_switch`` (bladewaltz1/PromptSwitch), ``m2clip`` (sallymmx/m2clip). The checkout
is only read (its directory goes on ``sys.path``, or single files are loaded from it); run one method per process
(the repositories reuse top-level names such as ``clip`` / ``models``). Exit status 0 when every checked difference
is <= 1e-5 (logits divided by their scale). Reported, not checked: the ViFi-CLIP fp16 columns (below) and
Video-LLaMA's fp32 ``llm_inputs`` (below; its float64 columns are checked). Mug-STAN and Video-LLaMA need
transformers 4.x (the venv below); the others run with the project's environment (Prompt Switch with both: the same
differences to within 3e-7).

Official commits the table was made with (the snapshots ``fetch`` gives): ArrowLuo/CLIP4Clip@508ffa3d,
microsoft/VideoX@1744b215, Francis-Rings/ILA@1a912d93, farewellthree/STAN@c9dc7b6a,
DAMO-NLP-SG/Video-LLaMA@64888c0a, muzairkhattak/ViFi-CLIP@e2d19483, bladewaltz1/PromptSwitch@6420d3f3,
sallymmx/m2clip@3c8c6613.

Only weight downloads and pieces that do not run here are replaced, never the math:

- CLIP4Clip: ``boto3`` / ``botocore`` / ``requests`` stand-ins when missing (downloads it never makes); its fp16 cast
  of CLIP is undone (``.float()``).
- ILA: built by its ``models.xclip.build_model`` from a random OpenAI CLIP state dict (what ``xclip.load`` does
  after reading the ``.pt`` file). ``logits`` is its K400 ``forward``: the class features plus the X-CLIP prompt
  generator's output (random and never optimised in the code; vidlang: ``video_prompts``), against
  ``condition_text``; ``video_tokens`` the generator's visual tokens (frame mean of ``encode_video``'s).
- Mug-STAN: ``CLIPConfig.from_pretrained`` / ``CLIPModel.from_pretrained`` (hub) return a random small CLIP;
  ``clip_stan_hf.py`` and ``mug_head.py`` are loaded as files with mmaction's registry, mmcv's ``DropPath`` (timm's:
  identity in evaluation, as mmcv's) and ``GatherLayer`` (training on CUDA only) stood in, the real ``mmengine``.
  It needs transformers 4.x (``CLIPEncoderLayer`` returning tuples): a separate venv, e.g. ``python -m venv
  /tmp/parity_venv`` + ``pip install transformers==4.46.3 mmengine``. Frames != 3 (its forward reads a dim 1 of
  size 3 as channels).
- Video-LLaMA: the Q-former file ``video_llama/models/Qformer.py`` is loaded as is; ``init_video_Qformer`` and
  ``encode_videoQformer_visual`` are compiled from their source in ``video_llama.py`` (the module itself imports
  LLaMA / EVA / ImageBind code); ``BertConfig.from_pretrained("bert-base-uncased")`` returns ``BertConfig()`` (the
  same values); the frozen EVA-ViT-g + BLIP-2 image Q-former are stand-ins passing given per-frame tokens through
  (vidlang's block reads CLIP frame tokens there). Compared: the video Q-former output and ``llama_proj``'s.
- ViFi-CLIP (full fine-tune): ``clip._download`` returns a saved random CLIP; the model's captured ``dtype`` (fp16
  after ``convert_weights``) is set to fp32 with the ``.float()`` cast. Its class-prompt embeddings are a buffer made
  at construction from the fp16 token embedding (the converter drops it and re-embeds class names in fp32): the
  checked text column runs the official text encoder on fp32 embeddings; ``text_embeds_fp16_class_buffer`` shows
  the buffer's fp16 rounding.
- ViFi-CLIP (prompt variant, ``vifi_clip_prompt``): as above, with ``PROMPT_MODEL: True``; the random CLIP state
  dict has fp16 values (as OpenAI's ``.pt``), so the class-prompt buffers are exact. The official forward casts the
  vision prompts and the deeper text prompts with ``.half()`` (its CUDA fp16 path; vidlang keeps fp32): the checked
  columns use prompts with fp16 values (the cast is lossless), ``*_fp16_prompt_cast`` shows the cast on fp32 values.
- Prompt Switch: ``CLIPConfig.from_pretrained`` returns a small ``CLIPConfig`` (with the hub config's ``dropout:
  0.0`` field, which transformers 4.46 no longer defines) and ``CLIPModel.from_pretrained`` builds the file's own
  ``CLIPModel`` from it (random weights) instead of downloading ``openai/clip-vit-base-patch32``.
- M2-CLIP: ``configs`` (the user's ``configs/config.py``, written from ``config.py.example``) is a namespace with the
  path constants and ``DWCONV3D_DISABLE_CUDNN``; ``torch.jit.load`` of the OpenAI ``.pt`` returns a random ViT-B/16
  state dict with fp16 values; the fp16 cast (``convert_weights``) is undone with ``.float()``. Full size (its
  factories fix every width; the text transformer runs ``i < 12`` of its 13 blocks, so it cannot be shrunk).
- Video-LLaMA, float64: the fp32 ``llama_proj`` difference (~1.2e-5 on values up to 7) is summation-order
  rounding: the official fp32 forward is itself ~1.4e-5 from its own float64 result, and with both sides cast to
  float64 after loading (``video_tokens_fp64`` / ``llm_inputs_fp64``) the difference is ~1e-14.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

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


def _random_openai_clip(seed: int = 0, s: dict | None = None) -> dict[str, torch.Tensor]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from official_layouts import openai_text, openai_visual

    s = s or SMALL
    g = torch.Generator().manual_seed(seed)
    keys = {**openai_visual("visual.", s), **openai_text("", s=s)}
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
        ours = _vidlang_model(path, "clip4clip", frames)
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
        ours = _vidlang_model(path, "xclip", frames)
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
def _vidlang_model(path: Path, method: str, frames: int, base: Path | None = None, **load_kw):
    """``load_official`` + ``save_vidlang`` + ``build_model`` (eval) of an official file."""
    from vidlang.models.clip.pretrained import save_vidlang
    from vidlang.models.factory import ModelConfig, build_model
    from vidlang.models.official import load_official

    sd, info = load_official(path, method, base=base, **load_kw)
    out = path.parent / "vidlang"
    save_vidlang(sd, info, out)
    cfg = json.loads((out / "config.json").read_text())
    blk = cfg["converted_from"]["block"]
    mc = ModelConfig(image="vit_b32", image_overrides=cfg["vision"], text_overrides=cfg["text"], block=blk["name"],
                     block_args=blk["args"], pretrained=str(out), num_frames=frames)  # fmt: skip
    return build_model(mc).eval()


def _randomise(module: torch.nn.Module, skip: tuple[str, ...] = (), seed: int = 1, std: float = 0.02) -> None:
    """Perturb every parameter (and BatchNorm statistics) not under a ``skip`` prefix: zero-initialised layers of
    an untrained official model become non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in module.named_parameters():
            if not k.startswith(skip):
                p.add_(std * torch.randn(p.shape, generator=g))
        for k, b in module.named_buffers():
            if k.endswith("running_mean") and not k.startswith(skip):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif k.endswith("running_var") and not k.startswith(skip):
                b.copy_(1 + 0.1 * torch.rand(b.shape, generator=g))


def _ids(length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two captions (SOT .. EOT = the largest id, pad 0) padded to ``length`` and their attention mask."""
    ids = torch.zeros(2, length, dtype=torch.long)
    ids[0, :4] = torch.tensor([98, 5, 17, 99])
    ids[1, :6] = torch.tensor([98, 40, 41, 42, 43, 99])
    return ids, (ids != 0).long()


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------
# ILA (Francis-Rings/ILA)
# ---------------------------------------------------------------------------------------------
def ila(repo: Path, frames: int = 3) -> dict[str, float]:
    """The official ``XCLIP`` of ILA built by its ``models.xclip.build_model`` from a random OpenAI CLIP state dict
    (what ``xclip.load`` does after reading ``ViT-B-32.pt``); its added modules randomised; evaluation mode with
    ``message_attn.is_training = False`` (as its ``validate``)."""
    sys.path.insert(0, str(repo))
    import clip  # noqa: F401  (the official import order: clip -> models.xclip -> clip.model)
    from models.xclip import build_model

    clip_sd = _random_openai_clip()
    log = types.SimpleNamespace(info=lambda *a, **k: None)
    torch.manual_seed(0)
    model = build_model(dict(clip_sd), T=frames, logger=log, prompts_alpha=1e-1, prompts_layers=2, mit_layers=1,
                        use_cache=False).float()  # fmt: skip
    _randomise(model, skip=tuple(k for k in clip_sd))
    model.eval()
    for blk in model.visual.transformer.resblocks:
        blk.message_attn.is_training = False
    g = torch.Generator().manual_seed(2)
    video = torch.randn(2, frames, 3, 32, 32, generator=g)
    ids, attn = _ids(SMALL["ctx"])
    with torch.no_grad():
        ov, o_img, _ = model.encode_video(video)  # [B, E], [B, T, N, E]
        ot = model.encode_text(ids)
        o_logits, _ = model(video, ids)  # [B, A]: the text features + the (untrained) prompt generator's output
        scale = model.logit_scale.exp()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "best.pth"
        torch.save({"model": {"module." + k: v for k, v in model.state_dict().items()}, "epoch": 0}, path)
        ours = _vidlang_model(path, "ila", frames)
        assert ours.block.conditions_text, "the converted K400 model must keep the prompt generator"
        with torch.no_grad():
            out = ours.encode_video(video)
            t = ours.encode_text(ids, attn).embeds
            cls = F.normalize(ours.block.condition_text(t, out), dim=-1)  # [B, A, E]
            logits = ours.logit_scale.exp() * torch.einsum("be,bae->ba", F.normalize(out.embeds, dim=-1), cls)
    return {"video_embeds": _diff(out.embeds, ov), "text_embeds": _diff(t, ot),
            "video_tokens": _diff(out.tokens, o_img.mean(1)), "logits": _diff(logits, o_logits),
            "logit_scale": scale.item()}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Mug-STAN (farewellthree/STAN)
# ---------------------------------------------------------------------------------------------
def _load_file(name: str, path: Path) -> types.ModuleType:
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _mmaction_stubs(repo: Path) -> None:
    """What ``clip_stan_hf.py`` / ``mug_head.py`` import from mmaction / mmcv, without importing the mmaction
    package (its ``__init__`` needs the compiled mmcv): a registry whose decorator returns the class, mmcv's
    ``DropPath`` (the timm one: identity in evaluation, as mmcv's), the real ``mmengine`` for ``constant_init``,
    the real ``mask_generator.py``, and ``GatherLayer`` (all-gather; only called while training on CUDA)."""
    from timm.layers import DropPath

    reg = types.SimpleNamespace(register_module=lambda *a, **k: (lambda cls: cls))
    for name in ("mmaction", "mmaction.models", "mmaction.models.recognizers", "mmaction.utils", "mmcv", "mmcv.cnn"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["mmaction.registry"] = types.SimpleNamespace(MODELS=reg)
    sys.modules["mmcv.cnn.bricks"] = types.SimpleNamespace(DropPath=DropPath)
    sys.modules["mmaction.models.recognizers.clip_similarity"] = types.SimpleNamespace(GatherLayer=None)
    _load_file("mmaction.utils.mask_generator", repo / "mmaction" / "utils" / "mask_generator.py")


def mugstan(repo: Path, frames: int = 4, depth: int = 2, layers: int = 3) -> dict[str, float]:
    """``VITCLIPPretrained_STAN(depth, return_mean=False)`` + ``CLIPTextPretrained(all_proj=True)`` + ``Mug_head``
    (the Mug-STAN MSR-VTT config) from a random transformers ``CLIPModel`` of a small configuration:
    ``CLIPConfig.from_pretrained`` / ``CLIPModel.from_pretrained`` (hub downloads) return it instead."""
    import transformers

    _mmaction_stubs(repo)
    stan = _load_file("mmaction.models.backbones.clip_stan_hf", repo / "mmaction/models/backbones/clip_stan_hf.py")
    mug = _load_file("mmaction.models.heads.mug_head", repo / "mmaction/models/heads/mug_head.py")
    vision = {"hidden_size": SMALL["vw"], "intermediate_size": 4 * SMALL["vw"], "num_hidden_layers": layers,
              "num_attention_heads": SMALL["vw"] // 64, "image_size": 32, "patch_size": SMALL["patch"]}
    text = {"hidden_size": SMALL["tw"], "intermediate_size": 4 * SMALL["tw"], "num_hidden_layers": SMALL["tl"],
            "num_attention_heads": SMALL["tw"] // 64, "vocab_size": SMALL["vocab"], "max_position_embeddings": 32,
            "eos_token_id": 99}  # fmt: skip
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=SMALL["embed"])
    torch.manual_seed(0)
    random_clip = transformers.CLIPModel(config).state_dict()

    def model_from_pretrained(*a, **k):
        m = transformers.CLIPModel(config)
        m.load_state_dict(random_clip)
        return m

    transformers.CLIPConfig.from_pretrained = lambda *a, **k: config
    stan.CLIPModel.from_pretrained = model_from_pretrained
    model = torch.nn.Module()
    model.backbone = stan.VITCLIPPretrained_STAN(depth=depth, return_mean=False)
    model.text_backbone = stan.CLIPTextPretrained(all_proj=True)
    _randomise(model, skip=("backbone.layers.", "backbone.class_embedding", "backbone.patch", "backbone.position",
                            "backbone.pre_", "backbone.post_", "backbone.visual_", "text_backbone."))  # fmt: skip
    head = mug.Mug_head(input_dim=SMALL["embed"], tau=100)
    model.eval()
    head.eval()
    g = torch.Generator().manual_seed(2)
    video = torch.randn(2, frames, 3, 32, 32, generator=g)
    ids, attn = _ids(32)
    with torch.no_grad():
        frames_o = model.backbone(video)  # [B, T, E]
        tokens_o, pooled_o = model.text_backbone(ids)  # [A, 32, E], [A, E]
        logits_o = head(tokens_o, frames_o, (ids != 0).long())  # [A, B]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mugstan.pth"
        torch.save({"meta": {"epoch": 1}, "state_dict": model.state_dict()}, path)
        ours = _vidlang_model(path, "mugstan", frames)
        from vidlang.models.similarity import mug_similarity

        with torch.no_grad():
            vo = ours.encode_video(video)
            to = ours.encode_text(ids, attn)
            logits = mug_similarity(to.tokens, to.mask, vo.frame_embeds)
    return {"video_embeds": _diff(vo.frame_embeds, frames_o), "text_embeds": _diff(to.embeds, pooled_o),
            "text_tokens": _diff(to.tokens[to.mask.bool()], tokens_o[ids != 0]), "logits": _diff(logits, logits_o),
            "logit_scale": 1.0}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Video-LLaMA (DAMO-NLP-SG/Video-LLaMA): the video Q-former and llama_proj
# ---------------------------------------------------------------------------------------------
def _official_function(path: Path, cls: str, name: str, namespace: dict) -> types.FunctionType:
    """The source of ``cls.name`` in ``path``, compiled as is (without importing the file's module)."""
    import ast
    import textwrap

    src = path.read_text()
    node = next(n for c in ast.parse(src).body if isinstance(c, ast.ClassDef) and c.name == cls for n in c.body
                if isinstance(n, ast.FunctionDef) and n.name == name)  # fmt: skip
    code = textwrap.dedent(ast.get_source_segment(src, node))
    code = "\n".join(line for line in code.splitlines() if not line.strip().startswith("@"))
    exec(compile(code, str(path), "exec"), namespace)  # noqa: S102 - the official source, read from the checkout
    return namespace[name]


def videollama(repo: Path, frames: int = 4, d_llm: int = 4096) -> dict[str, float]:
    """The video branch as ``VideoLLAMA`` builds and runs it: ``init_video_Qformer`` (its source, with the
    ``bert-base-uncased`` config made locally: ``BertConfig()`` has the same values), the deletions of
    ``__init__`` (l.192-198), ``nn.Embedding(32, 768)``, ``llama_proj``; ``encode_videoQformer_visual`` (its source)
    on per-frame tokens given directly: the frozen EVA-ViT-g / BLIP-2 image Q-former are stand-ins that pass
    ``[B*T, 32, 768]`` tokens through (vidlang's block reads CLIP frame tokens in their place)."""
    import contextlib

    import einops

    qf = _load_file("video_llama_Qformer", repo / "video_llama/models/Qformer.py")
    qf.BertConfig.from_pretrained = classmethod(lambda cls, *a, **k: cls())
    src = repo / "video_llama/models/video_llama.py"
    ns = {"BertConfig": qf.BertConfig, "BertLMHeadModel": qf.BertLMHeadModel, "nn": torch.nn, "torch": torch,
          "einops": einops}  # fmt: skip
    init_vq = _official_function(src, "VideoLLAMA", "init_video_Qformer", ns)
    encode = _official_function(src, "VideoLLAMA", "encode_videoQformer_visual", ns)
    torch.manual_seed(0)
    self = types.SimpleNamespace()
    self.Qformer = types.SimpleNamespace(config=qf.BertConfig())
    self.video_frame_position_embedding = torch.nn.Embedding(32, self.Qformer.config.hidden_size)
    self.video_Qformer, self.video_query_tokens = init_vq(None, num_query_token=32, vision_width=768,
                                                          num_hidden_layers=2)  # fmt: skip
    self.video_Qformer.cls = None
    self.video_Qformer.bert.embeddings.word_embeddings = None
    self.video_Qformer.bert.embeddings.position_embeddings = None
    for layer in self.video_Qformer.bert.encoder.layer:
        layer.output = None
        layer.intermediate = None
    self.llama_proj = torch.nn.Linear(768, d_llm)
    trained = torch.nn.Module()  # what the runner saves: the trainable video-branch parameters, by their names
    trained.video_Qformer = self.video_Qformer
    trained.video_frame_position_embedding = self.video_frame_position_embedding
    trained.llama_proj = self.llama_proj
    trained.video_query_tokens = self.video_query_tokens
    _randomise(trained, std=0.05)
    trained.eval()
    # the stand-ins: "image" [B, 32, T, 768, 1] -> per-frame tokens [B*T, 32, 768] unchanged
    self.visual_encoder = lambda x: x.squeeze(-1)
    self.ln_vision = torch.nn.Identity()
    self.query_tokens = torch.zeros(1, 32, 768)
    self.Qformer.bert = lambda **kw: types.SimpleNamespace(last_hidden_state=kw["encoder_hidden_states"])
    self.maybe_autocast = contextlib.nullcontext  # Blip2Base.maybe_autocast on CPU
    g = torch.Generator().manual_seed(2)
    frame_tokens = torch.randn(2, frames, 32, 768, generator=g)
    with torch.no_grad():
        llm_o, _ = encode(self, frame_tokens.permute(0, 2, 1, 3).unsqueeze(-1))  # [B, 32, d_llm]
        hidden_o = llm_o  # the Q-former output itself: recomputed below from the same official modules
        pos = self.video_frame_position_embedding(torch.arange(frames))[None, :, None]
        hidden_o = self.video_Qformer.bert(query_embeds=self.video_query_tokens.expand(2, -1, -1),
                                           encoder_hidden_states=(frame_tokens + pos).flatten(1, 2),
                                           encoder_attention_mask=torch.ones(2, frames * 32, dtype=torch.long),
                                           return_dict=True).last_hidden_state  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint_best.pth"
        torch.save({"model": trained.state_dict(), "epoch": 0}, path)
        base = Path(tmp) / "base.pt"
        torch.save(_random_openai_clip(s={**SMALL, "vw": 768, "vl": 1}), base)
        ours = _vidlang_model(path, "videollama", frames, base=base)
        with torch.no_grad():
            tokens = ours.block.query_tokens(frame_tokens, torch.zeros(2, frames, SMALL["embed"]))
            llm = ours.block.llm_head(tokens)
    # the same weights and inputs in float64 on both sides (the official modules cast after loading, vidlang's
    # model after converting): what is left of the fp32 differences beyond summation-order rounding
    trained.double()
    ours.double()
    self.query_tokens = self.query_tokens.double()
    with torch.no_grad():
        llm64_o, _ = encode(self, frame_tokens.double().permute(0, 2, 1, 3).unsqueeze(-1))
        hidden64_o = self.video_Qformer.bert(query_embeds=self.video_query_tokens.expand(2, -1, -1),
                                             encoder_hidden_states=(frame_tokens.double() + pos.double()).flatten(1, 2),
                                             encoder_attention_mask=torch.ones(2, frames * 32, dtype=torch.long),
                                             return_dict=True).last_hidden_state  # fmt: skip
        tokens64 = ours.block.query_tokens(frame_tokens.double(), torch.zeros(2, frames, SMALL["embed"]).double())
        llm64 = ours.block.llm_head(tokens64)
    print(f"videollama: largest |value| of the official outputs: Q-former {hidden_o.abs().max().item():.2f}, "
          f"llama_proj {llm_o.abs().max().item():.2f}; fp32 official vs its own float64: Q-former "
          f"{_diff(hidden_o.double(), hidden64_o):.2e}, llama_proj {_diff(llm_o.double(), llm64_o):.2e}; fp32 vidlang "
          f"vs the official float64: Q-former {_diff(tokens.double(), hidden64_o):.2e}, llama_proj "
          f"{_diff(llm.double(), llm64_o):.2e}")
    return {"video_tokens": _diff(tokens, hidden_o), "llm_inputs": _diff(llm, llm_o),
            "video_tokens_fp64": _diff(tokens64, hidden64_o), "llm_inputs_fp64": _diff(llm64, llm64_o),
            "logit_scale": 1.0}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# ViFi-CLIP (muzairkhattak/ViFi-CLIP), full fine-tune
# ---------------------------------------------------------------------------------------------
def _official_vifi(tmp: str, clip_sd: dict[str, torch.Tensor], classes: list[str],
                   **prompting: Any) -> tuple[Any, Path]:
    """ViFi-CLIP's ``returnCLIP`` built in fp32 from ``clip_sd`` (saved to ``tmp``, which ``clip._download``
    returns) with the ``TRAINER.ViFi_CLIP`` fields ``prompting``; returns the model and the saved base path."""
    from clip import clip as vclip
    from trainers import vificlip

    base = Path(tmp) / "ViT-B-16.pt"
    torch.save(clip_sd, base)
    vclip._download = lambda url, *a, **k: str(base)
    vc = types.SimpleNamespace(CTX_INIT="a photo of a", USE="both", ZS_EVAL=False, **prompting)
    cfg = types.SimpleNamespace(MODEL=types.SimpleNamespace(ARCH="ViT-B/16"), TRAINER=types.SimpleNamespace(
        ViFi_CLIP=vc))  # fmt: skip
    log = types.SimpleNamespace(info=lambda *a, **k: None)
    torch.manual_seed(0)
    model = vificlip.returnCLIP(cfg, log, classes).float().eval()
    model.dtype = model.text_encoder.dtype = torch.float32  # captured at build (fp16 after convert_weights)
    return model, base


def vifi_clip(repo: Path, frames: int = 3) -> dict[str, float]:
    """``trainers/vificlip.returnCLIP`` with the default config (``utils/config.py``: no prompts, CTX_INIT
    "a photo of a", fine-tune both towers) and two class names; ``clip._download`` (the CLIP download) returns a
    saved random OpenAI CLIP state dict (49408-token vocabulary: the class prompts use the real BPE)."""
    sys.path.insert(0, str(repo))
    with tempfile.TemporaryDirectory() as tmp:
        clip_sd = _random_openai_clip(s={**SMALL, "vocab": 49408})
        model, base = _official_vifi(tmp, clip_sd, ["archery", "playing guitar"], PROMPT_MODEL=False,
                                     N_CTX_VISION=0, N_CTX_TEXT=0, PROMPT_DEPTH_VISION=0, PROMPT_DEPTH_TEXT=1)
        g = torch.Generator().manual_seed(2)
        video = torch.randn(2, frames, 3, 32, 32, generator=g)
        ids = model.tokenized_prompts  # [2, 77] "a photo of a {class}."
        with torch.no_grad():
            ov = model.image_encoder(video.flatten(0, 1)).view(2, frames, -1).mean(1)
            o_buffer = model.text_encoder(model.prompt_learner(), ids)  # its class embeddings, made in fp16
            ot = model.text_encoder(clip_sd["token_embedding.weight"][ids], ids)  # the same, from fp32 embeddings
            o_logits = model.logit_scale.exp() * F.normalize(ov, dim=-1) @ F.normalize(ot, dim=-1).T
        path = Path(tmp) / "best.pth"
        torch.save({"model": {"module." + k: v for k, v in model.state_dict().items()}, "epoch": 0}, path)
        ours = _vidlang_model(path, "vifi_clip", frames, base=base)
        with torch.no_grad():
            v = ours.encode_video(video).embeds
            t = ours.encode_text(ids, (torch.arange(ids.shape[1]) <= ids.argmax(-1, keepdim=True)).long()).embeds
            logits = ours.logit_scale.exp() * F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).T
    return {"video_embeds": _diff(v, ov), "text_embeds": _diff(t, ot), "logits": _diff(logits, o_logits),
            "text_embeds_fp16_class_buffer": _diff(t, o_buffer), "logit_scale": ours.logit_scale.exp().item()}


# ---------------------------------------------------------------------------------------------
# Prompt Switch (bladewaltz1/PromptSwitch)
# ---------------------------------------------------------------------------------------------
def _small_hf_clip_config(config_cls, layers: int = 2, **vision_extra):
    """A small ``CLIPConfig`` (text width = projection dim, as ViT-B/32's 512 = 512)."""
    vision = {"hidden_size": SMALL["vw"], "intermediate_size": 4 * SMALL["vw"], "num_hidden_layers": layers,
              "num_attention_heads": SMALL["vw"] // 64, "image_size": 32, "patch_size": SMALL["patch"], **vision_extra}
    text = {"hidden_size": SMALL["tw"], "intermediate_size": 4 * SMALL["tw"], "num_hidden_layers": SMALL["tl"],
            "num_attention_heads": SMALL["tw"] // 64, "vocab_size": SMALL["vocab"], "max_position_embeddings": 32,
            "eos_token_id": 99, "dropout": 0.0}  # fmt: skip  (dropout: a field of the hub's config.json)
    return config_cls(text_config=text, vision_config=vision, projection_dim=SMALL["embed"])


def prompt_switch(repo: Path, num_prompts: int = 3, clip_frames: int = 6) -> dict[str, float]:
    """``model/prompt_clip.PromptCLIP`` with ``--arch prompt_clip --loss clip+caption`` (2 captioner layers, avg
    pooling), ``num_frames = num_prompts`` (the official defaults 6 / 6; here 3 / 3): ``CLIPConfig.from_pretrained``
    / ``CLIPModel.from_pretrained`` (hub downloads) return a random small configuration / model built by the file's
    own ``CLIPModel``. Test clips of ``clip_frames`` = 2 * Np frames (the official 12-frame test on a 6-frame model:
    the frames run as independent groups of Np). Also compared: the captioner's logits (``forward_captioner``)."""
    sys.path.insert(0, str(repo))
    from model import prompt_clip as pc

    pc.CLIPConfig.from_pretrained = classmethod(lambda cls, *a, **k: _small_hf_clip_config(cls))
    pc.CLIPModel.from_pretrained = classmethod(lambda cls, *a, config, **k: cls(config))
    args = types.SimpleNamespace(num_frames=num_prompts, num_test_frames=clip_frames, num_prompts=num_prompts,
                                 loss="clip+caption", num_captioner_layers=2, pooling_type="avg",
                                 pooling_type_test="avg", input_res=32)  # fmt: skip
    torch.manual_seed(0)
    model = pc.PromptCLIP(args)
    _randomise(model, std=0.05)  # zero-initialised aggregation output, unit norms, zero biases
    model.eval()
    g = torch.Generator().manual_seed(2)
    video = torch.randn(2, clip_frames, 3, 32, 32, generator=g)
    ids, attn = _ids(32)
    with torch.no_grad():
        out = model({"video": video, "text": {"input_ids": ids, "attention_mask": attn}})
        frames_o = model.clip.get_image_features(video.flatten(0, 1)).view(2, clip_frames, -1)  # [B, T, E] raw
        text_o = model.clip.get_text_features(input_ids=ids, attention_mask=attn)  # [A, E] raw
        scale = model.clip.logit_scale.exp()
        logits_o = scale * F.normalize(out["text_features"], dim=-1) @ F.normalize(out["video_features_pooled"],
                                                                                   dim=-1).T  # [A, B]  # fmt: skip
        caption_o = model.forward_captioner(frames_o, ids[:, :-1])  # [B, L-1, vocab]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model_best.pth"
        torch.save({"epoch": 1, "state_dict": model.state_dict()}, path)
        ours = _vidlang_model(path, "prompt_switch", clip_frames)
        with torch.no_grad():
            vo = ours.encode_video(video)
            t = ours.encode_text(ids, attn).embeds
            logits = ours.logit_scale.exp() * F.normalize(t, dim=-1) @ F.normalize(vo.embeds, dim=-1).T
            caption = ours.block.caption_head(ours.text_tower.embed_tokens(ids[:, :-1]), vo.frame_embeds)
    return {"video_embeds": _diff(vo.embeds, out["video_features_pooled"]), "frame_embeds": _diff(vo.frame_embeds,
            frames_o), "text_embeds": _diff(t, text_o), "logits": _diff(logits, logits_o),
            "caption_logits": _diff(caption, caption_o), "logit_scale": scale.item()}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# M2-CLIP (sallymmx/m2clip)
# ---------------------------------------------------------------------------------------------
B16 = {"vw": 768, "vl": 12, "patch": 16, "grid": 14, "tw": 512, "tl": 12, "ctx": 77, "vocab": 49408, "embed": 512}
# the factories compared; clip_vit_base_patch16_multimodal_adapter24x384 (the SSv2 script's) puts text adapters
# before attention too, which vidlang's ted block does not have: its conversion is refused, naming the key
M2_FACTORIES = {"B16-12x": "clip_vit_base_patch16_multimodal_adapter12x384",
                "B32-24x": "clip_vit_base_patch32_multimodal_adapter24x384"}


def m2clip(repo: Path, frames: int = 4, factory: str = "clip_vit_base_patch16_multimodal_adapter12x384",
           classes: int = 5) -> dict[str, float]:
    """``models_adapter.<factory>`` (default: the K400 script's configuration: ViT-B/16, 12 visual adapters before
    the MLP, text adapters in the last two of the 13 text blocks, the 13th being the MLM copy of the 12th; see
    ``M2_FACTORIES``) at full size (the factories fix every width), built from a random OpenAI ViT-B state dict with
    fp16 values (what the OpenAI ``.pt`` holds): ``torch.jit.load`` of ``CLIP_VIT_B*_PATH`` returns it and
    ``configs`` (the user's ``configs/config.py``, written from the example) gives the path constants. The fp16 cast
    of the towers (``convert_weights``) is undone with ``.float()`` (lossless on fp16 values). Saved as
    ``save_model`` does: only the trained parameters (names with "adapter"); vidlang converts it with ``--base`` =
    the CLIP state dict."""
    sys.path.insert(0, str(repo))
    sys.modules["configs"] = types.SimpleNamespace(CLIP_VIT_B16_PATH="ViT-B-16.pt", CLIP_VIT_B32_PATH="ViT-B-32.pt",
                                                   CLIP_VIT_L14_PATH="ViT-L-14.pt",
                                                   DWCONV3D_DISABLE_CUDNN=True)  # fmt: skip
    import models_adapter

    size = {**B16, "patch": 32, "grid": 7} if "patch32" in factory else B16
    clip_sd = {k: v.half().float() for k, v in _random_openai_clip(s=size).items()}
    jit_load = torch.jit.load
    torch.jit.load = lambda *a, _sd=clip_sd, **k: types.SimpleNamespace(state_dict=lambda: dict(_sd))
    try:
        torch.manual_seed(0)
        model = getattr(models_adapter, factory)(num_classes=classes, num_frames=frames, mlm_head_len=50)
    finally:
        torch.jit.load = jit_load
    model.float()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the trained parameters (main.py: names with "adapter"), off their zero init
        for k, p in model.named_parameters():
            if "adapter" in k:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    model.eval()
    video = torch.randn(2, 3, frames, 224, 224, generator=g)  # [B, C, T, H, W] (its VideoDataset layout)
    ids, attn = _ids(77)
    with torch.no_grad():
        ov, _, _ = model.encode_image(video)
        ot, _ = model.encode_text(ids)
        logits_o = model(video, ids)[0]  # [B, A]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint-11.pth"
        trained = {k: v for k, v in model.state_dict().items() if "adapter" in k}
        torch.save({"model": trained, "next_epoch": 12}, path)
        base = Path(tmp) / "ViT-B.pt"
        torch.save(clip_sd, base)
        del model, clip_sd
        ours = _vidlang_model(path, "m2clip", frames, base=base)
        with torch.no_grad():
            v = ours.encode_video(video.transpose(1, 2)).embeds
            t = ours.encode_text(ids, attn).embeds
            logits = ours.logit_scale.exp() * F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).T
    return {"video_embeds": _diff(v, ov), "text_embeds": _diff(t, ot), "logits": _diff(logits, logits_o),
            "logit_scale": ours.logit_scale.exp().item()}


def vifi_clip_prompt(repo: Path, frames: int = 3) -> dict[str, float]:
    """The vision-language prompting variant: ``returnCLIP`` with ``PROMPT_MODEL: True`` (the base-to-novel /
    few-shot prompting configs; here 4 vision / 5 text prompt tokens, depth 2 of 3 layers in both towers; > 4 text
    tokens: random context, "X X X X X {class}."), built from a random OpenAI CLIP state dict with fp16 values (as
    the OpenAI ``.pt``; the class-prompt buffers, made from the fp16 token embedding, are then exact). The official
    forward casts the vision prompts and the deeper text prompts to fp16 (``.half()``; vidlang keeps them fp32):
    the checked columns use prompts with fp16 values (the cast is then lossless); ``video_embeds_fp16_prompt_cast``
    / ``text_embeds_fp16_prompt_cast`` show the cast's effect on fp32-valued prompts."""
    sys.path.insert(0, str(repo))
    from clip import clip as vclip

    s = {**SMALL, "vocab": 49408, "vl": 3, "tl": 3}
    classes = ["archery", "playing guitar"]
    with tempfile.TemporaryDirectory() as tmp:
        clip_sd = {k: v.half().float() for k, v in _random_openai_clip(s=s).items()}
        model, base = _official_vifi(tmp, clip_sd, classes, PROMPT_MODEL=True, N_CTX_VISION=4, N_CTX_TEXT=5,
                                     PROMPT_DEPTH_VISION=2, PROMPT_DEPTH_TEXT=2)
        g = torch.Generator().manual_seed(2)
        video = torch.randn(2, frames, 3, 32, 32, generator=g)
        ids = torch.cat([vclip.tokenize(f"{c}.") for c in classes])  # [2, 77] the class names alone
        attn = (torch.arange(ids.shape[1]) <= ids.argmax(-1, keepdim=True)).long()

        def official() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            with torch.no_grad():
                ov = model.image_encoder(video.flatten(0, 1)).view(2, frames, -1).mean(1)
                ot = model.text_encoder(model.prompt_learner(), model.tokenized_prompts)
                return ov, ot, model(video)  # [B, E], [K, E], [B, K]

        def ours(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
            path = Path(tmp) / name / "best.pth"
            path.parent.mkdir()
            torch.save({"model": {"module." + k: v for k, v in model.state_dict().items()}, "epoch": 0}, path)
            m = _vidlang_model(path, "vifi_clip", frames, base=base)
            with torch.no_grad():
                v = m.encode_video(video).embeds
                t = m.encode_text(ids, attn).embeds
                scale = m.logit_scale.exp()
                return v, t, scale * F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).T, scale.item()

        cast = [p for k, p in model.named_parameters() if k.endswith(("VPT", "VPT_shallow"))]
        with torch.no_grad():
            for p in cast:  # trained prompts, off their N(0, 0.02) init
                p.add_(0.5 * torch.randn(p.shape, generator=g))
        ov32, ot32, _ = official()
        v32, t32, _, _ = ours("fp32_prompts")
        with torch.no_grad():
            for p in cast:
                p.copy_(p.half().float())
        ov, ot, o_logits = official()
        v, t, logits, scale = ours("fp16_prompts")
    return {"video_embeds": _diff(v, ov), "text_embeds": _diff(t, ot), "logits": _diff(logits, o_logits),
            "video_embeds_fp16_prompt_cast": _diff(v32, ov32), "text_embeds_fp16_prompt_cast": _diff(t32, ot32),
            "logit_scale": scale}  # fmt: skip


METHODS = {"clip4clip": None, "xclip": xclip, "ila": ila, "vifi_clip": vifi_clip, "mugstan": mugstan,
           "videollama": videollama, "prompt_switch": prompt_switch,
           "m2clip": m2clip, "vifi_clip_prompt": vifi_clip_prompt}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("method", choices=sorted(METHODS))
    ap.add_argument("repo", type=Path, help="local checkout of the official repository (read only)")
    ap.add_argument("--head", default="all", choices=["all", "meanP", "seqTransf", "seqLSTM"], help="clip4clip only")
    args = ap.parse_args()
    rows = []
    if args.method == "clip4clip":
        for head in ["meanP", "seqTransf", "seqLSTM"] if args.head == "all" else [args.head]:
            rows.append((head, clip4clip(args.repo, head)))
    elif args.method == "m2clip":
        for variant, factory in M2_FACTORIES.items():
            rows.append((variant, m2clip(args.repo, factory=factory)))
    else:
        rows.append(("", METHODS[args.method](args.repo)))
    cols = [c for c in COLUMNS if any(c in r for _, r in rows)]
    print("| method | variant | " + " | ".join(cols) + " | logit scale |")
    print("|---|---|" + "---|" * (len(cols) + 1))
    worst = 0.0
    for variant, r in rows:
        worst = max([worst] + [v / (r["logit_scale"] if "logits" in k else 1.0) for k, v in r.items()
                               if k in COLUMNS and k not in UNCHECKED])  # fmt: skip
        cells = [f"{r[c]:.2e}" for c in cols] + [f"{r['logit_scale']:.1f}"]
        print(f"| {args.method} | {variant} | " + " | ".join(cells) + " |")
    return 0 if worst <= 1e-5 else 1


COLUMNS = ["video_embeds", "frame_embeds", "text_embeds", "text_tokens", "video_tokens", "llm_inputs", "logits",
           "caption_logits", "text_embeds_fp16_class_buffer",
           "video_embeds_fp16_prompt_cast", "text_embeds_fp16_prompt_cast",
           "video_tokens_fp64", "llm_inputs_fp64"]  # fmt: skip
UNCHECKED = ("text_embeds_fp16_class_buffer", "video_embeds_fp16_prompt_cast",
             "text_embeds_fp16_prompt_cast", "llm_inputs")  # reported, explained in the docs


if __name__ == "__main__":
    sys.exit(main())
