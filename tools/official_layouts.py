"""Write the official state-dict layouts (key -> shape, small configuration) as JSON fixtures.

``python tools/official_layouts.py [--out tests/fixtures/official]`` writes one file per released layout:
``clip4clip_meanp``, ``clip4clip_seqtransf``, ``clip4clip_seqlstm``, ``vifi_clip_full``, ``vifi_clip_prompt``,
``prompt_switch``, ``m2clip_12x``, ``xclip_t4``, ``ila_k400``, ``mugstan``, ``videollama``.
The key names follow the authors' model code (see
:mod:`vidlang.models.official`); they are generated here from that naming, for a tiny configuration
(:data:`SMALL`), not read from the authors' code.
Each fixture also records the top-level wrapper of the file the authors' training script saves.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# vision width 128 (2 heads of 64), 2 layers, patch 8, image 32 (4x4 grid); text width 64 (1 head) = embed dim
SMALL = {"vw": 128, "vl": 2, "patch": 8, "grid": 4, "tw": 64, "tl": 2, "ctx": 16, "vocab": 100, "embed": 64}
Layout = dict[str, list[int]]


def openai_layer(prefix: str, w: int) -> Layout:
    """One OpenAI-CLIP residual block (``nn.MultiheadAttention`` + ``c_fc`` / ``c_proj`` MLP)."""
    return {
        f"{prefix}.attn.in_proj_weight": [3 * w, w],
        f"{prefix}.attn.in_proj_bias": [3 * w],
        f"{prefix}.attn.out_proj.weight": [w, w],
        f"{prefix}.attn.out_proj.bias": [w],
        f"{prefix}.ln_1.weight": [w],
        f"{prefix}.ln_1.bias": [w],
        f"{prefix}.mlp.c_fc.weight": [4 * w, w],
        f"{prefix}.mlp.c_fc.bias": [4 * w],
        f"{prefix}.mlp.c_proj.weight": [w, 4 * w],
        f"{prefix}.mlp.c_proj.bias": [w],
        f"{prefix}.ln_2.weight": [w],
        f"{prefix}.ln_2.bias": [w],
    }


def openai_visual(prefix: str, s: dict = SMALL) -> Layout:
    vw = s["vw"]
    out = {
        f"{prefix}conv1.weight": [vw, 3, s["patch"], s["patch"]],
        f"{prefix}class_embedding": [vw],
        f"{prefix}positional_embedding": [s["grid"] ** 2 + 1, vw],
        f"{prefix}ln_pre.weight": [vw],
        f"{prefix}ln_pre.bias": [vw],
    }
    for i in range(s["vl"]):
        out.update(openai_layer(f"{prefix}transformer.resblocks.{i}", vw))
    out.update({f"{prefix}ln_post.weight": [vw], f"{prefix}ln_post.bias": [vw], f"{prefix}proj": [vw, s["embed"]]})
    return out


def openai_text(prefix: str, token_embedding: bool = True, s: dict = SMALL) -> Layout:
    tw = s["tw"]
    out = {f"{prefix}token_embedding.weight": [s["vocab"], tw]} if token_embedding else {}
    out[f"{prefix}positional_embedding"] = [s["ctx"], tw]
    for i in range(s["tl"]):
        out.update(openai_layer(f"{prefix}transformer.resblocks.{i}", tw))
    out.update(
        {f"{prefix}ln_final.weight": [tw], f"{prefix}ln_final.bias": [tw], f"{prefix}text_projection": [tw, s["embed"]]}
    )
    return out


def hf_layer(prefix: str, w: int) -> Layout:
    out: Layout = {}
    for p in ("q", "k", "v", "out"):
        out[f"{prefix}.self_attn.{p}_proj.weight"] = [w, w]
        out[f"{prefix}.self_attn.{p}_proj.bias"] = [w]
    for n in ("layer_norm1", "layer_norm2"):
        out[f"{prefix}.{n}.weight"] = [w]
        out[f"{prefix}.{n}.bias"] = [w]
    out.update({f"{prefix}.mlp.fc1.weight": [4 * w, w], f"{prefix}.mlp.fc1.bias": [4 * w],
                f"{prefix}.mlp.fc2.weight": [w, 4 * w], f"{prefix}.mlp.fc2.bias": [w]})  # fmt: skip
    return out


def clip4clip(head: str, s: dict = SMALL) -> Layout:
    out = {**openai_visual("clip.visual.", s), **openai_text("clip.", s=s), "clip.logit_scale": []}
    if head in ("seqTransf", "seqLSTM"):
        out["frame_position_embeddings.weight"] = [s["ctx"], s["embed"]]  # max_position_embeddings = context
    if head == "seqTransf":
        for i in range(2):  # cross_num_hidden_layers (4 in the paper; 2 here)
            out.update(openai_layer(f"transformerClip.resblocks.{i}", s["tw"]))
    if head == "seqLSTM":
        e = s["embed"]
        out.update({"lstm_visual.weight_ih_l0": [4 * e, e], "lstm_visual.weight_hh_l0": [4 * e, e],
                    "lstm_visual.bias_ih_l0": [4 * e], "lstm_visual.bias_hh_l0": [4 * e]})  # fmt: skip
    return out


def vifi_clip(prompt: bool, s: dict = SMALL, n_ctx: int = 3, n_cls: int = 5) -> Layout:
    out = {**openai_visual("image_encoder.", s), **openai_text("text_encoder.", token_embedding=False, s=s)}
    out["logit_scale"] = []
    if prompt:  # depth 2 in both towers
        out["image_encoder.VPT"] = [n_ctx, s["vw"]]
        out["image_encoder.transformer.resblocks.1.VPT_shallow"] = [n_ctx, s["vw"]]
        out["prompt_learner.ctx"] = [n_ctx, s["tw"]]
        out["text_encoder.transformer.resblocks.1.VPT_shallow"] = [n_ctx, s["tw"]]
        out["prompt_learner.token_prefix"] = [n_cls, 1, s["tw"]]
        out["prompt_learner.token_suffix"] = [n_cls, s["ctx"] - 1 - n_ctx, s["tw"]]
    else:
        out["prompt_learner.complete_text_embeddings"] = [n_cls, s["ctx"], s["tw"]]
    return out


def prompt_switch(s: dict = SMALL, num_prompts: int = 2, caption_layers: int = 2) -> Layout:
    vw, tw, e = s["vw"], s["tw"], s["embed"]
    out: Layout = {
        "clip.vision_model.embeddings.class_embedding": [vw],
        "clip.vision_model.embeddings.patch_embedding.weight": [vw, 3, s["patch"], s["patch"]],
        "clip.vision_model.embeddings.position_embedding.weight": [s["grid"] ** 2 + 1, vw],
        "clip.vision_model.embeddings.position_ids": [1, s["grid"] ** 2 + 1],
        "clip.vision_model.pre_layrnorm.weight": [vw],
        "clip.vision_model.pre_layrnorm.bias": [vw],
        "clip.vision_model.encoder.prompt_embedding": [num_prompts, num_prompts, vw],
    }
    for i in range(s["vl"]):
        out.update(hf_layer(f"clip.vision_model.encoder.layers.{i}", vw))
    out.update({
        "clip.vision_model.post_layernorm.weight": [vw], "clip.vision_model.post_layernorm.bias": [vw],
        "clip.vision_model.attn.in_proj_weight": [3 * vw, vw], "clip.vision_model.attn.in_proj_bias": [3 * vw],
        "clip.vision_model.attn.out_proj.weight": [vw, vw], "clip.vision_model.attn.out_proj.bias": [vw],
        "clip.text_model.embeddings.token_embedding.weight": [s["vocab"], tw],
        "clip.text_model.embeddings.position_embedding.weight": [s["ctx"], tw],
        "clip.text_model.embeddings.position_ids": [1, s["ctx"]],
    })  # fmt: skip
    for i in range(s["tl"]):
        out.update(hf_layer(f"clip.text_model.encoder.layers.{i}", tw))
    out.update({
        "clip.text_model.final_layer_norm.weight": [tw], "clip.text_model.final_layer_norm.bias": [tw],
        "clip.visual_projection.weight": [e, vw], "clip.text_projection.weight": [e, tw], "clip.logit_scale": [],
        "caption_prenorm.weight": [tw], "caption_prenorm.bias": [tw],
    })  # fmt: skip
    for i in range(caption_layers):
        p = f"caption_transformer.layers.{i}"
        for att in ("self_attn", "multihead_attn"):
            out.update({f"{p}.{att}.in_proj_weight": [3 * tw, tw], f"{p}.{att}.in_proj_bias": [3 * tw],
                        f"{p}.{att}.out_proj.weight": [tw, tw], f"{p}.{att}.out_proj.bias": [tw]})  # fmt: skip
        out.update({f"{p}.linear1.weight": [4 * tw, tw], f"{p}.linear1.bias": [4 * tw],
                    f"{p}.linear2.weight": [tw, 4 * tw], f"{p}.linear2.bias": [tw]})  # fmt: skip
        for n in ("norm1", "norm2", "norm3"):
            out.update({f"{p}.{n}.weight": [tw], f"{p}.{n}.bias": [tw]})
    out.update({"caption_transformer.norm.weight": [tw], "caption_transformer.norm.bias": [tw],
                "caption_head.weight": [s["vocab"], tw], "caption_head.bias": [s["vocab"]]})  # fmt: skip
    return out


def m2clip(s: dict = SMALL, r: int = 32, n_cls: int = 5, mlm_words: int = 7, pre_attn: bool = False) -> Layout:
    """What M2-CLIP's ``save_model`` keeps: the parameters whose names contain ``adapter`` (the trained ones).

    Text transformer of ``tl + 1`` blocks (the last = the MLM block); text adapters before the MLP of the last two
    blocks (as B/16 12x: ``text_adapter_layers=2``), bottleneck ``r`` (384 in the paper). ``pre_attn``: the 24x
    multimodal model (adapters before attention too, text adapters in every block).
    """
    vw, tw, e = s["vw"], s["tw"], s["embed"]
    out: Layout = {}
    for i in range(s["vl"]):
        for pos in ("attn", "mlp") if pre_attn else ("mlp",):
            for sub in ("", "offset_adapter."):
                p = f"visual.transformer.resblocks.{i}.adapter_pre_{pos}.{sub}"
                conv = [r, 1, 1, 3, 3] if sub else [r, 1, 3]  # depthwise Conv3d (1,3,3) / Conv1d k=3
                out.update({f"{p}fc1.weight": [r, vw], f"{p}fc1.bias": [r], f"{p}conv.weight": conv,
                            f"{p}conv.bias": [r], f"{p}fc2.weight": [vw, r], f"{p}fc2.bias": [vw]})  # fmt: skip
    h = e // 2
    out.update({"visual.t_adapter.fc1.weight": [h, e], "visual.t_adapter.fc1.bias": [h],
                "visual.t_adapter.conv.weight": [h, 1, 3], "visual.t_adapter.conv.bias": [h],
                "visual.t_adapter.fc2.weight": [e, h], "visual.t_adapter.fc2.bias": [e],
                "visual.adapter_fc.weight": [n_cls, vw], "visual.adapter_fc.bias": [n_cls]})  # fmt: skip
    for i, pos in [(i, pos) for i in range(s["tl"] + 1) for pos in ("attn", "mlp")] if pre_attn else \
            [(s["tl"] - 1, "mlp"), (s["tl"], "mlp")]:  # fmt: skip
        p = f"transformer.resblocks.{i}.adapter_pre_{pos}."
        out.update({f"{p}textad_fc1.weight": [r, tw], f"{p}textad_fc1.bias": [r],
                    f"{p}textad_fc2.weight": [tw, r], f"{p}textad_fc2.bias": [tw]})  # fmt: skip
    m = "mlm_adapter."
    out.update({f"{m}bias": [mlm_words], f"{m}transform.dense.weight": [tw, tw], f"{m}transform.dense.bias": [tw],
                f"{m}transform.LayerNorm.weight": [tw], f"{m}transform.LayerNorm.bias": [tw],
                f"{m}decoder.weight": [mlm_words, tw]})  # fmt: skip
    return out

def video_prompt_layout(vw: int, e: int, layers: int) -> Layout:
    """X-CLIP's video-specific prompt generator and its visual-token projection (``prompts_*``; ILA's K400 model
    has the same)."""
    out: Layout = {"prompts_visual_ln.weight": [vw], "prompts_visual_ln.bias": [vw], "prompts_visual_proj": [vw, e],
                   "prompts_generator.alpha": [e], "prompts_generator.norm.weight": [e],
                   "prompts_generator.norm.bias": [e]}  # fmt: skip
    for i in range(layers):
        p = f"prompts_generator.decoder.{i}."
        out.update({f"{p}cross_attn.{n}_proj.weight": [e, e] for n in "qkv"})
        out.update({f"{p}cross_attn.proj.weight": [e, e], f"{p}cross_attn.proj.bias": [e],
                    f"{p}norm1.weight": [e], f"{p}norm1.bias": [e], f"{p}norm3.weight": [e], f"{p}norm3.bias": [e],
                    f"{p}mlp.0.weight": [4 * e, e], f"{p}mlp.0.bias": [4 * e], f"{p}mlp.3.weight": [e, 4 * e],
                    f"{p}mlp.3.bias": [e]})  # fmt: skip
    return out


def xclip(s: dict = SMALL, frames: int = 4, mit_layers: int = 1, prompt_layers: int = 2) -> Layout:
    """X-CLIP's ``XCLIP.state_dict()``: OpenAI CLIP (both towers, ``logit_scale``), cross-frame message modules in
    every image layer, the MIT (``[1, T, E]`` positions + OpenAI-style layers), the prompt generator and the visual
    token projection (checked against the official model built from ``microsoft/VideoX`` @ 1744b21)."""
    vw, e = s["vw"], s["embed"]
    out = {**openai_visual("visual.", s), **openai_text("", s=s), "logit_scale": []}
    for i in range(s["vl"]):
        p = f"visual.transformer.resblocks.{i}."
        out.update({f"{p}message_fc.weight": [vw, vw], f"{p}message_fc.bias": [vw], f"{p}message_ln.weight": [vw],
                    f"{p}message_ln.bias": [vw], f"{p}message_attn.in_proj_weight": [3 * vw, vw],
                    f"{p}message_attn.in_proj_bias": [3 * vw], f"{p}message_attn.out_proj.weight": [vw, vw],
                    f"{p}message_attn.out_proj.bias": [vw]})  # fmt: skip
    out["mit.positional_embedding"] = [1, frames, e]
    for i in range(mit_layers):
        out.update(openai_layer(f"mit.resblocks.{i}", e))
    out.update(video_prompt_layout(vw, e, prompt_layers))
    return out


def batchnorm(prefix: str, c: int) -> Layout:
    return {f"{prefix}.weight": [c], f"{prefix}.bias": [c], f"{prefix}.running_mean": [c],
            f"{prefix}.running_var": [c], f"{prefix}.num_batches_tracked": []}  # fmt: skip


def ila_layer(prefix: str, c: int, hidden: int = 256) -> Layout:
    """ILA's additions to one visual layer (``mat.MultiAxisAttentionBlock``; K400 ``align.ILA``). The official
    code hard-codes ``hidden`` 256 (and its half, 128)."""
    half, m = hidden // 2, f"{prefix}.message_attn"
    out: Layout = {f"{prefix}.message_fc.weight": [c, c], f"{prefix}.message_fc.bias": [c],
                   f"{prefix}.message_ln.weight": [c], f"{prefix}.message_ln.bias": [c],
                   f"{m}.interactive_block.0.depthwise_conv.0.weight": [2 * c, 1, 3, 3],
                   f"{m}.interactive_block.0.depthwise_conv.0.bias": [2 * c]}  # fmt: skip
    out.update(batchnorm(f"{m}.interactive_block.0.depthwise_conv.1", 2 * c))
    out.update({f"{m}.interactive_block.0.pointwise_conv.0.weight": [hidden, 2 * c, 1, 1],
                f"{m}.interactive_block.0.pointwise_conv.0.bias": [hidden]})  # fmt: skip
    out.update(batchnorm(f"{m}.interactive_block.0.pointwise_conv.1", hidden))
    out.update({f"{m}.interactive_block.1.weight": [hidden, hidden, 3, 3], f"{m}.interactive_block.1.bias": [hidden]})
    out.update(batchnorm(f"{m}.interactive_block.2", hidden))
    out.update({f"{m}.fc.weight": [c, half], f"{m}.fc.bias": [c], f"{m}.conv.weight": [half, half, 3, 1, 1],
                f"{m}.conv.bias": [half], f"{m}.prediction_block.0.weight": [half, hidden, 3, 3],
                f"{m}.prediction_block.0.bias": [half]})  # fmt: skip
    out.update(batchnorm(f"{m}.prediction_block.1", half))
    out.update({f"{m}.prediction_block.4.weight": [half, half, 3, 3], f"{m}.prediction_block.4.bias": [half]})
    out.update(batchnorm(f"{m}.prediction_block.5", half))
    out.update({f"{m}.prediction_block.10.weight": [half // 2, half // 2, 1], f"{m}.prediction_block.10.bias":
                [half // 2], f"{m}.prediction_block.12.weight": [4, half // 4, 1], f"{m}.prediction_block.12.bias": [4],
                f"{prefix}.temporal_skip_fc.weight": [c, c], f"{prefix}.temporal_skip_fc.bias": [c],
                f"{prefix}.temporal_skip_align_fc.weight": [c, c],
                f"{prefix}.temporal_skip_align_fc.bias": [c]})  # fmt: skip
    return out


def ila(s: dict = SMALL, frames: int = 3, mit_layers: int = 1, prompt_layers: int = 2) -> Layout:
    """ILA's K400 ``XCLIP`` (``models/xclip.py``): CLIP + an alignment module per visual layer + the MIT (its
    ``positional_embedding [1, T, E]``) + X-CLIP's prompt generator (``prompts_*``, 2 layers)."""
    vw, e = s["vw"], s["embed"]
    out: Layout = {}
    for k, shape in openai_visual("visual.", s).items():
        out[k] = shape
        if k.endswith(".ln_2.bias"):  # after each visual layer's CLIP weights
            out.update(ila_layer(k[: -len(".ln_2.bias")], vw))
    out.update(openai_text("", s=s))
    out["logit_scale"] = []
    out["mit.positional_embedding"] = [1, frames, e]
    for i in range(mit_layers):
        out.update(openai_layer(f"mit.resblocks.{i}", e))
    out.update(video_prompt_layout(vw, e, prompt_layers))
    return out


def mugstan(s: dict = SMALL, depth: int = 2, time_rows: int = 64) -> Layout:
    """Mug-STAN's mmaction ``CLIPSimilarity_split``: ``backbone`` (``VITCLIPPretrained_STAN``, transformers CLIP
    vision names + the branch) and ``text_backbone`` (``CLIPTextPretrained``)."""
    vw, tw, e = s["vw"], s["tw"], s["embed"]
    b = "backbone"
    out: Layout = {f"{b}.class_embedding": [vw], f"{b}.patch_embedding.weight": [vw, 3, s["patch"], s["patch"]],
                   f"{b}.position_embedding.weight": [s["grid"] ** 2 + 1, vw],
                   f"{b}.pre_layrnorm.weight": [vw], f"{b}.pre_layrnorm.bias": [vw]}  # fmt: skip
    for i in range(s["vl"]):
        out.update(hf_layer(f"{b}.layers.{i}", vw))
    out.update({f"{b}.post_layernorm.weight": [vw], f"{b}.post_layernorm.bias": [vw],
                f"{b}.visual_projection.weight": [e, vw]})  # fmt: skip
    for j in range(depth):
        out.update(hf_layer(f"{b}.STAN_S_layers.{j}", vw))
    for j in range(depth):
        p = f"{b}.STAN_T_layers.{j}"
        for n in ("q", "k", "v", "out"):
            out.update({f"{p}.self_attn.{n}_proj.weight": [vw, vw], f"{p}.self_attn.{n}_proj.bias": [vw]})
        out.update({f"{p}.layer_norm1.weight": [vw], f"{p}.layer_norm1.bias": [vw],
                    f"{p}.temporal_fc.weight": [vw, vw], f"{p}.temporal_fc.bias": [vw]})  # fmt: skip
    out[f"{b}.STAN_time_embed.weight"] = [time_rows, vw]
    t = "text_backbone.text_model"
    out.update({f"{t}.embeddings.token_embedding.weight": [s["vocab"], tw],
                f"{t}.embeddings.position_embedding.weight": [s["ctx"], tw],
                f"{t}.embeddings.position_ids": [1, s["ctx"]]})  # fmt: skip
    for i in range(s["tl"]):
        out.update(hf_layer(f"{t}.encoder.layers.{i}", tw))
    out.update({f"{t}.final_layer_norm.weight": [tw], f"{t}.final_layer_norm.bias": [tw],
                "text_backbone.text_projection.weight": [e, tw]})  # fmt: skip
    return out


def videollama(s: dict = SMALL, d: int = 64, queries: int = 4, layers: int = 2, frame_rows: int = 8,
               llm: int = 32) -> Layout:
    """What Video-LLaMA's runner saves of the video branch (trained parameters only): the video Q-former (BERT
    width ``d``; frame tokens as wide as the image tower here, 768 in the release), its queries, the frame
    position embedding and ``llama_proj`` (to an LLM of width ``llm``)."""
    c = s["vw"]
    q = "video_Qformer.bert"
    out: Layout = {f"{q}.embeddings.position_ids": [1, 32], f"{q}.embeddings.LayerNorm.weight": [d],
                   f"{q}.embeddings.LayerNorm.bias": [d]}  # fmt: skip
    for i in range(layers):
        p = f"{q}.encoder.layer.{i}"
        for att, kv in (("attention", d), ("crossattention", c)):
            out.update({f"{p}.{att}.self.query.weight": [d, d], f"{p}.{att}.self.query.bias": [d],
                        f"{p}.{att}.self.key.weight": [d, kv], f"{p}.{att}.self.key.bias": [d],
                        f"{p}.{att}.self.value.weight": [d, kv], f"{p}.{att}.self.value.bias": [d],
                        f"{p}.{att}.output.dense.weight": [d, d], f"{p}.{att}.output.dense.bias": [d],
                        f"{p}.{att}.output.LayerNorm.weight": [d],
                        f"{p}.{att}.output.LayerNorm.bias": [d]})  # fmt: skip
        out.update({f"{p}.intermediate_query.dense.weight": [4 * d, d], f"{p}.intermediate_query.dense.bias": [4 * d],
                    f"{p}.output_query.dense.weight": [d, 4 * d], f"{p}.output_query.dense.bias": [d],
                    f"{p}.output_query.LayerNorm.weight": [d], f"{p}.output_query.LayerNorm.bias": [d]})  # fmt: skip
    out.update({"video_query_tokens": [1, queries, d], "video_frame_position_embedding.weight": [frame_rows, c],
                "llama_proj.weight": [llm, d], "llama_proj.bias": [llm]})  # fmt: skip
    return out


# name -> (method, layout, wrapper of the saved file: null = the bare state dict, or the key holding it, and
# whether the keys carry DDP's "module." prefix)
LAYOUTS = {
    "clip4clip_meanp": ("clip4clip", lambda: clip4clip("meanP"), None, False),
    "clip4clip_seqtransf": ("clip4clip", lambda: clip4clip("seqTransf"), None, False),
    "clip4clip_seqlstm": ("clip4clip", lambda: clip4clip("seqLSTM"), None, False),
    "vifi_clip_full": ("vifi_clip", lambda: vifi_clip(False), "model", True),
    "vifi_clip_prompt": ("vifi_clip", lambda: vifi_clip(True), "model", True),
    "prompt_switch": ("prompt_switch", prompt_switch, "state_dict", False),
    "m2clip_12x": ("m2clip", m2clip, "model", False),
    "xclip_t4": ("xclip", xclip, "model", False),
    "ila_k400": ("ila", ila, "model", True),
    "mugstan": ("mugstan", mugstan, "state_dict", False),
    "videollama": ("videollama", videollama, "model", False),
}
NEEDS_BASE = {"vifi_clip", "m2clip", "videollama"}  # methods whose files lack weights of the CLIP they started from


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "official"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, (method, make, wrapper, ddp) in LAYOUTS.items():
        doc = {"method": method, "config": SMALL, "wrapper": wrapper, "ddp_prefix": ddp,
               "needs_base": method in NEEDS_BASE, "keys": make()}  # fmt: skip
        (out / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
        print(f"{out / name}.json: {len(doc['keys'])} keys")


if __name__ == "__main__":
    main()
