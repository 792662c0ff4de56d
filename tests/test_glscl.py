"""GLSCL (issue 20 item 2): the global / local interaction and the ICL / IDL regularisers against a hand-written
re-statement of the official code (zchoi/GLSCL ``tvr/models/modeling.py``: ``similarity``, ``_score``,
``margin_ranking_loss``), masking, chunked evaluation, gradients, the retrieval task's training, evaluation and
checkpoints, and the paper preset."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml
from test_retrieval_task import ColorVideos, tokenizer_dir  # noqa: F401  (tokenizer_dir: a fixture)
from torch import nn
from torch.utils.data import DataLoader

from vidlang.data.collate import collate_samples
from vidlang.data.transforms import normalize
from vidlang.errors import ConfigError
from vidlang.eval.retrieval import evaluate_similarity
from vidlang.losses.contrastive import ContrastiveLoss
from vidlang.models.contract import TextOutput, VideoOutput
from vidlang.models.factory import ModelConfig
from vidlang.models.glscl import GLSCLSimilarity, global_similarity, local_similarity
from vidlang.models.similarity import SIMILARITIES
from vidlang.tasks import RetrievalTask
from vidlang.tasks.config import ContrastiveConfig

ROOT = Path(__file__).resolve().parents[1]
E = 16
SMALL = {"queries": 4, "layers": 2, "heads": 4, "ffn": 32}


def head(**kw) -> GLSCLSimilarity:
    torch.manual_seed(0)
    return GLSCLSimilarity(E, **{**SMALL, **kw}).double().eval()


def rand(*shape: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- a re-statement of the official computations (one caption per video, no padding) -------------------------
def official_global(cls: torch.Tensor, video_feat: torch.Tensor, temp: float) -> torch.Tensor:
    """``DiCoSA.similarity`` with ``center 1`` (its unused ``weight_fc`` left out) and a full video mask."""
    v_weight = torch.softmax(torch.einsum("ad,bvd->abv", cls, video_feat) / temp, dim=-1)
    v_weight = torch.einsum("abv,bv->abv", v_weight, torch.ones(video_feat.shape[:2], dtype=cls.dtype))
    cond = torch.einsum("abv,bvd->abd", v_weight, video_feat)  # [a, b, d]
    t = cls / cls.norm(dim=-1, keepdim=True)
    v = cond / cond.norm(dim=-1, keepdim=True)
    return torch.einsum("ad,abd->ab", t, v)


def official_score(h: GLSCLSimilarity, text_feat: torch.Tensor, video_feat: torch.Tensor):
    """``DiCoSA._score`` with ``query_share 1`` / ``cross_att_share 1``: the seq-first decoder of the code holding the
    head's weights, the shared queries for both modalities."""
    layer = nn.TransformerDecoderLayer(E, SMALL["heads"], SMALL["ffn"], 0.1)  # seq-first, as the code's
    dec = nn.TransformerDecoder(layer, SMALL["layers"]).double().eval()
    dec.load_state_dict(h.decoder.state_dict())
    spatial_q = h.queries.expand(video_feat.size(0), -1, -1)
    noun_q = h.queries.expand(text_feat.size(0), -1, -1)
    spatial_out = dec(spatial_q.permute(1, 0, 2), video_feat.permute(1, 0, 2)).permute(1, 0, 2)
    noun_out = dec(noun_q.permute(1, 0, 2), text_feat.permute(1, 0, 2)).permute(1, 0, 2)
    spatial_out = spatial_out / spatial_out.norm(dim=-1, keepdim=True)
    noun_out = noun_out / noun_out.norm(dim=-1, keepdim=True)
    s = torch.matmul(noun_out.permute(1, 0, 2), spatial_out.permute(1, 2, 0)).sum(0) / h.num_queries
    return s, spatial_out, noun_out


def official_margin_ranking(sim: torch.Tensor, margin: float) -> torch.Tensor:
    n = sim.size(0)
    diagonal = sim.diag().view(n, 1)
    pos = torch.eye(n, dtype=torch.bool)
    cost_cap = (margin + sim - diagonal.expand_as(sim)).clamp(min=0).masked_fill(pos, 0)
    cost_vid = (margin + sim - diagonal.t().expand_as(sim)).clamp(min=0).masked_fill(pos, 0)
    return torch.sum(cost_cap / (n * (n - 1))) + torch.sum(cost_vid / (n * (n - 1)))


def official_regularisers(spatial_out, noun_out, alpha: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(inter-diversity x alpha, intra-consistency) as the code's ``similarity`` computes them in training."""
    div = official_margin_ranking(torch.einsum("abc,adc->abd", spatial_out, spatial_out).mean(0), 0.1) * alpha
    sim_metric = torch.einsum("abc,adc->abd", spatial_out, noun_out).sum(0) / spatial_out.shape[1]
    r = torch.diag(sim_metric).add(-0.75).pow(2).sum()
    return div, F.mse_loss(spatial_out.mean(0), noun_out.mean(0)) + r * beta


# -- the similarity and the regularisers ---------------------------------------------------------------------
def test_global_interaction_is_the_official_formula_in_any_blocking():
    cls, frames = rand(5, E, seed=1), rand(7, 6, E, seed=2)
    ref = official_global(cls, frames, 3.0)
    torch.testing.assert_close(global_similarity(cls, frames), ref)
    torch.testing.assert_close(global_similarity(cls, frames, chunk=2, video_chunk=3), ref)
    assert not torch.allclose(global_similarity(cls, frames, temperature=0.5), ref, atol=1e-3)  # tau matters
    assert global_similarity(cls.float(), frames.float()).dtype == torch.float32


def test_local_interaction_and_total_similarity_match_the_official_code():
    h = head()
    words, frames, cls = rand(4, 5, E, seed=3), rand(4, 6, E, seed=4), rand(4, E, seed=5)
    video = VideoOutput(embeds=frames.mean(1), frame_embeds=frames)
    text = TextOutput(embeds=cls, tokens=words, mask=torch.ones(4, 5, dtype=torch.bool))
    with torch.no_grad():
        vf, tf = h.features(video, text, None)
        s, spatial_out, noun_out = official_score(h, words, frames)
        torch.testing.assert_close(vf[2], spatial_out)
        torch.testing.assert_close(tf[1], noun_out)
        torch.testing.assert_close(local_similarity(tf[1], vf[2]), s)
        torch.testing.assert_close(h(tf, vf), official_global(cls, frames, 3.0) + 0.5 * s)  # training == evaluation
    # the glscl_global registry entry is the parameter-free global interaction alone
    torch.testing.assert_close(SIMILARITIES.get("glscl_global")(text, video), official_global(cls, frames, 3.0))


def test_regularisers_match_the_official_code():
    h = head()
    words, frames = rand(6, 5, E, seed=6), rand(6, 3, E, seed=7)
    with torch.no_grad():
        _, spatial_out, noun_out = official_score(h, words, frames)
        aux = h.aux_losses(spatial_out, noun_out, torch.arange(6))
    weights = GLSCLSimilarity.default_aux_weights
    div, cons = official_regularisers(spatial_out, noun_out, alpha=1e-4, beta=0.02)
    assert weights == {"glscl_icl": 1.0, "glscl_icl_diag": 0.02, "glscl_idl": 1e-4}  # train_msrvtt.sh's alpha / beta
    torch.testing.assert_close(weights["glscl_idl"] * aux["glscl_idl"], div)
    torch.testing.assert_close(aux["glscl_icl"] + weights["glscl_icl_diag"] * aux["glscl_icl_diag"], cons)
    assert aux["glscl_idl"] > 0 and aux["glscl_icl_diag"] > 0  # random queries: nothing is trivially zero
    # several captions per video: each caption is paired with its own video
    idx = torch.tensor([0, 0, 1, 2, 2, 2])
    got = h.aux_losses(spatial_out[:3], noun_out, idx)
    _, ref_cons = official_regularisers(spatial_out[:3][idx], noun_out, alpha=1e-4, beta=1.0)
    torch.testing.assert_close(got["glscl_icl"] + got["glscl_icl_diag"], ref_cons)


def test_padded_words_and_frames_are_left_out():
    h = head()
    words, frames, cls = rand(2, 4, E, seed=8), rand(2, 3, E, seed=9), rand(2, E, seed=10)
    junk_w, junk_f = rand(2, 3, E, seed=11, scale=10.0), rand(2, 2, E, seed=12, scale=10.0)
    padded_words, padded_frames = torch.cat([words, junk_w], 1), torch.cat([frames, junk_f], 1)
    wmask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]] * 2, dtype=torch.bool)
    fmask = torch.tensor([[1, 1, 1, 0, 0]] * 2, dtype=torch.bool)
    with torch.no_grad():
        alone = h.features(VideoOutput(frames.mean(1), frames), TextOutput(cls, words, torch.ones(2, 4).bool()), None)
        padded = h.features(VideoOutput(frames.mean(1), padded_frames), TextOutput(cls, padded_words, wmask), fmask)
        unmasked = h.features(VideoOutput(frames.mean(1), padded_frames),
                              TextOutput(cls, padded_words, torch.ones(2, 7).bool()), None)  # fmt: skip
        torch.testing.assert_close(padded[0][2], alone[0][2])  # video concepts
        torch.testing.assert_close(padded[1][1], alone[1][1])  # caption concepts
        torch.testing.assert_close(h(padded[1], padded[0]), h(alone[1], alone[0]))
        torch.testing.assert_close(global_similarity(cls, padded_frames, fmask), global_similarity(cls, frames))
        assert not torch.allclose(unmasked[0][2], alone[0][2], atol=1e-3)
        assert not torch.allclose(unmasked[1][1], alone[1][1], atol=1e-3)
        assert not torch.allclose(global_similarity(cls, padded_frames), global_similarity(cls, frames), atol=1e-3)
    with pytest.raises(ValueError, match="at least one real"):
        h.concepts(words, torch.zeros(2, 4, dtype=torch.bool))


def test_chunked_rows_equal_the_full_matrix():
    h = head()
    tf = (rand(11, E, seed=13), F.normalize(rand(11, 4, E, seed=14), dim=-1))
    vf = (rand(9, 5, E, seed=15), torch.ones(9, 5, dtype=torch.float64), F.normalize(rand(9, 4, E, seed=16), dim=-1))
    vf[1][3, 2:] = 0  # a short clip
    full = h(tf, vf)
    for chunk in (1, 4, 11, 64):
        rows = list(h.similarity_rows(tf, vf, chunk))
        assert [s for s, _ in rows] == list(range(0, 11, chunk))
        torch.testing.assert_close(torch.cat([r for _, r in rows]), full)


def test_gradients_reach_the_queries_and_the_inputs():
    h = GLSCLSimilarity(E, **SMALL).train()
    g = torch.Generator().manual_seed(17)
    words = torch.randn(4, 5, E, generator=g, requires_grad=True)
    frames = torch.randn(4, 3, E, generator=g, requires_grad=True)
    cls = torch.randn(4, E, generator=g, requires_grad=True)
    vf, tf = h.features(VideoOutput(frames.mean(1), frames), TextOutput(cls, words, torch.ones(4, 5).bool()), None)
    idx = torch.arange(4)
    out = ContrastiveLoss()(vf, tf, idx, torch.tensor(4.6), similarity=h)
    aux = h.aux_losses(vf[2], tf[1], idx)
    (out.loss + sum(w * aux[k] for k, w in h.default_aux_weights.items())).backward()
    missing = [n for n, p in h.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    assert all(x.grad.abs().sum() > 0 for x in (words, frames, cls))
    vf, tf = h.features(VideoOutput(frames.mean(1), frames), TextOutput(cls, words, torch.ones(4, 5).bool()), None)
    h.margin = 2.0  # every hinge active (cosines are <= 1)
    idl = h.aux_losses(vf[2], tf[1], idx)["glscl_idl"]  # IDL: the video concepts only (as the code)
    to_text, to_video = torch.autograd.grad(idl, [tf[1], vf[2]], allow_unused=True)
    assert to_text is None and to_video.abs().sum() > 0


# -- the retrieval task --------------------------------------------------------------------------------------
TINY = ModelConfig(image="vit_tiny", block="seq_transformer", block_args={"layers": 1, "normalize_frames": False},
                   num_frames=4)
CONTRASTIVE = {"similarity": "glscl", "similarity_args": {"queries": 4, "layers": 1, "heads": 4, "ffn": 64},
               "head_lr_mult": 3.0}


def make_task(tokenizer_dir, **kw) -> RetrievalTask:  # noqa: F811
    torch.manual_seed(0)
    args = dict(model=TINY, tokenizer=str(tokenizer_dir), contrastive=CONTRASTIVE,
                optim={"lr": 2e-3, "warmup_steps": 0, "warmup_ratio": None, "weight_decay": 0.0},
                evaluation={"text_chunk": 5, "write_plots": False, "dsl": False})
    return RetrievalTask(**{**args, **kw})


def trainer(tmp_path, **kw) -> pl.Trainer:
    args = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path)
    return pl.Trainer(**{**args, **kw})


class Losses(pl.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.values.append(float(outputs["loss"]))


def test_task_trains_with_the_aux_losses_and_the_loss_decreases(tmp_path, tokenizer_dir):  # noqa: F811
    task = make_task(tokenizer_dir)
    groups = {g["name"]: g for g in task.param_groups()}
    assert {"glscl_backbone_decay", "glscl_backbone_no_decay"} <= set(groups)
    assert groups["glscl_backbone_decay"]["lr"] == pytest.approx(3.0 * 2e-3)
    assert any(p is task.glscl.queries for p in groups["glscl_backbone_decay"]["params"])
    batch = collate_samples([ColorVideos()[i] for i in range(8)])
    batch["video"] = normalize(batch["video"], task.model.image_mean, task.model.image_std)
    total, out, aux = task.forward_loss(batch)
    assert set(aux) == {"glscl_icl", "glscl_icl_diag", "glscl_idl"}
    expected = out.loss + aux["glscl_icl"] + 0.02 * aux["glscl_icl_diag"] + 1e-4 * aux["glscl_idl"]
    torch.testing.assert_close(total, expected)
    total.backward()
    assert task.glscl.queries.grad.abs().sum() > 0 and task.model.image_tower.conv1.weight.grad.abs().sum() > 0
    task.zero_grad()
    losses = Losses()
    fixed = DataLoader(ColorVideos(), batch_size=8, shuffle=False, collate_fn=collate_samples)
    trainer(tmp_path, max_steps=25, callbacks=[losses]).fit(task, fixed)
    assert len(losses.values) == 25
    assert sum(losses.values[-5:]) / 5 < 0.7 * sum(losses.values[:5]) / 5, losses.values


def _direct_similarity(task: RetrievalTask) -> tuple[torch.Tensor, torch.Tensor]:
    data = ColorVideos(n=6)
    batch = collate_samples([data[i] for i in range(len(data))])
    video = normalize(batch["video"], task.model.image_mean, task.model.image_std)
    ids, mask = task.tokenize(list(batch["captions"]))
    with torch.no_grad():
        vf, tf = task.glscl.features(task.model.encode_video(video), task.model.encode_text(ids, mask), None)
        return task.glscl(tf, vf), batch["caption_index"]


def test_evaluation_and_checkpoint_round_trip(tmp_path, tokenizer_dir):  # noqa: F811
    task = make_task(tokenizer_dir)
    train = DataLoader(ColorVideos(), batch_size=4, shuffle=False, collate_fn=collate_samples)
    val = DataLoader(ColorVideos(n=6), batch_size=4, collate_fn=collate_samples)  # 2 batches, 5-caption chunks
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, max_steps=2, enable_checkpointing=True, callbacks=[ckpt]).fit(task, train)
    task.eval()
    trainer(tmp_path).validate(task, val, verbose=False)
    sim, index = _direct_similarity(task)
    ref = evaluate_similarity(sim, index, dsl=False).metrics
    got = task.last_metrics["val"]
    assert got["num_videos"] == 6 and got["num_texts"] == 12
    for key in ("t2v_R@1", "t2v_R@5", "v2t_R@1", "t2v_MnR", "v2t_MnR"):
        assert got[key] == pytest.approx(ref[key], abs=1e-6), key
    loaded = RetrievalTask.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", map_location="cpu").eval()
    assert loaded.contrastive.similarity_args == CONTRASTIVE["similarity_args"]
    assert loaded.glscl is not None and loaded.glscl.num_queries == 4
    torch.testing.assert_close(loaded.glscl.queries, task.glscl.queries)
    torch.testing.assert_close(_direct_similarity(loaded)[0], sim)


def test_config_checks_and_weight_overrides(tokenizer_dir):  # noqa: F811
    with pytest.raises(ConfigError, match="unknown contrastive.similarity_args"):
        ContrastiveConfig(similarity="glscl", similarity_args={"querys": 8})
    with pytest.raises(ConfigError, match="apply to similarity 'glscl'"):
        ContrastiveConfig(similarity="mug", similarity_args={"queries": 8})
    with pytest.raises(ConfigError, match="head_lr_mult"):
        ContrastiveConfig(similarity="glscl", head_lr_mult=-1.0)
    with pytest.raises(ConfigError, match="divisible"):
        make_task(tokenizer_dir, contrastive={"similarity": "glscl", "similarity_args": {"heads": 5}})
    task = make_task(tokenizer_dir, aux_loss_weights={"glscl_idl": 0.0, "glscl_icl": 2.0})
    aux = {"glscl_icl": torch.tensor(1.0), "glscl_icl_diag": torch.tensor(10.0), "glscl_idl": torch.tensor(5.0)}
    assert float(task.weigh_aux(aux)) == pytest.approx(2.0 + 0.02 * 10.0)


def test_paper_preset_has_the_official_glscl_settings():
    raw = yaml.safe_load((ROOT / "configs/papers/glscl_msrvtt_b32.yaml").read_text())["model"]["init_args"]
    con = ContrastiveConfig(**raw["contrastive"])
    assert con.similarity == "glscl" and con.temperature is None and con.head_lr_mult == 1000.0
    h = GLSCLSimilarity(512, **con.similarity_args)  # train_msrvtt.sh: 8 queries, 3 shared layers, temp 3, 0.5
    assert (h.num_queries, len(h.decoder.layers), h.global_temperature, h.local_weight) == (8, 3, 3.0, 0.5)
    assert h.decoder.layers[0].linear1.out_features == 2048 and h.decoder.layers[0].self_attn.num_heads == 8
    weights = {**GLSCLSimilarity.default_aux_weights, **raw.get("aux_loss_weights", {})}
    assert weights == {"glscl_icl": 1.0, "glscl_icl_diag": 0.02, "glscl_idl": 1e-4}
    assert raw["model"]["block"] == "seq_transformer" and raw["model"]["block_args"]["normalize_frames"] is False


def test_bench_interactions_counts_every_interaction(capsys):
    import argparse

    from vidlang.bench.model import bench_interactions

    args = argparse.Namespace(gallery="3,2,4,5", tight_rows=1, iters=1, warmup=0)
    out = bench_interactions(args, torch.device("cpu"), lambda: None)
    assert set(out) == {"cosine", "glscl_global", "glscl", "glscl_pairs", "mug", "tight"}
    per_pair = 2 * (5 * 4 * (4 * 512**2 + 2 * 512 * 2048) + 512**2 + 512)  # 4 layers x 5 tokens + pooler, score
    assert out["tight"]["gflops"] == pytest.approx(3 * 2 * per_pair / 1e9)  # counted on 1 caption, scaled x3
    assert out["glscl_pairs"]["gflops"] < out["glscl"]["gflops"] and out["cosine"]["gflops"] < out["mug"]["gflops"]
    layer = 2 * (4 * 512**2 + 4 * 512) + 2 * 512 * 2048 + 2048 + 512 + 6 * 512  # 2 attentions, MLP, 3 norms
    assert out["glscl"]["params"] == 8 * 512 + 3 * layer
    assert all(v["ms"] > 0 for v in out.values())
    assert "tight" in capsys.readouterr().out


def test_ddp_gathers_the_regularisers_and_the_evaluation(tmp_path, tokenizer_dir):  # noqa: F811
    """2 processes (gloo): loss and synchronised gradients (GLSCL head included) equal the single-process step on
    the global batch, for the global and the local loss; the gathered evaluation equals single-process evaluation."""
    import json

    from test_ddp import GradProbe, reference_step

    pl.seed_everything(0)
    contrastive = {**CONTRASTIVE, "similarity_args": {**CONTRASTIVE["similarity_args"], "dropout": 0.0}}
    task = GradProbe(TINY, tokenizer=str(tokenizer_dir), contrastive=contrastive, optim={"warmup_ratio": None},
                     evaluation={"write_plots": False})  # fmt: skip
    task.probe_dir, task.data = str(tmp_path), ColorVideos()
    pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=2, logger=False, default_root_dir=tmp_path,
               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               num_sanity_val_steps=0, use_distributed_sampler=False).fit(task)  # fmt: skip
    for step, local_loss in ((0, False), (1, True)):
        probes = [torch.load(tmp_path / f"step{step}_rank{r}.pt") for r in range(2)]
        params = torch.load(tmp_path / f"params_step{step}_rank0.pt")
        batch = collate_samples([task.data[4 * step + i] for i in range(4)])
        ref_loss, ref_grads = reference_step(task, params, batch, local_loss)
        torch.testing.assert_close((probes[0]["loss"] + probes[1]["loss"]) / 2, ref_loss, rtol=0, atol=1e-5)
        assert ref_grads["glscl.queries"].abs().sum() > 0
        for name, ref in ref_grads.items():
            for p in probes:
                torch.testing.assert_close(p["grads"][name], ref, rtol=1e-4, atol=1e-6, msg=name)
    report = json.loads((tmp_path / "val_metrics.json").read_text())
    ref = copy.deepcopy(task)
    ref.load_state_dict(torch.load(tmp_path / "params_val_rank0.pt"), strict=False)
    ref.eval()
    batch = ref.on_after_batch_transfer(collate_samples([task.data[i] for i in range(5)]), 0)
    with torch.no_grad():
        v, t = ref.model.encode_video(batch["video"]), ref.model.encode_text(*ref.tokenize(batch["captions"]))
        vf, tf = ref.glscl.features(v, t, None)
        expected = evaluate_similarity(ref.glscl(tf, vf), batch["caption_index"], dsl=True).metrics
    assert report["metrics"]["num_videos"] == 5 and report["metrics"] == pytest.approx(expected)
