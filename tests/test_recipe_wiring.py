"""The task-layer wiring of the paper recipes (issue 14 phase B): the retrieval similarity (cosine / Mug / tightTransf)
in the loss and in evaluation, fixed temperature and summed directions, the short-clip video mask reaching the
block, the block's tokenizer hook (Prompt Switch caption weights, ViFi-CLIP text context on fresh weights only), the
lr scaling rule, M2-CLIP's official losses, and the ILA / EMA callbacks."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from test_retrieval_task import ColorVideos, tokenizer_dir  # noqa: F401  (tokenizer_dir: a fixture)
from torch.utils.data import DataLoader

from vidlang.data.collate import collate_samples
from vidlang.data.transforms import normalize
from vidlang.errors import ConfigError
from vidlang.eval.retrieval import evaluate_similarity
from vidlang.losses.contrastive import ContrastiveLoss
from vidlang.models.factory import ModelConfig
from vidlang.models.similarity import mug_similarity
from vidlang.tasks import RetrievalTask
from vidlang.tasks.callbacks import EMA, ILAAlignDecay
from vidlang.tasks.config import ContrastiveConfig, OptimConfig

TINY = ModelConfig(image="vit_tiny", num_frames=4)
TINY_SQUARE = ModelConfig(image="vit_tiny", num_frames=4, text_overrides={"width": 32})  # text width == E
OPTIM = {"lr": 1e-3, "warmup_steps": 0, "warmup_ratio": None}


def trainer(tmp_path, **kw) -> pl.Trainer:
    args = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path, max_steps=2)
    args.update(kw)
    return pl.Trainer(**args)


def train_loader(batch_size: int = 4) -> DataLoader:
    return DataLoader(ColorVideos(), batch_size=batch_size, shuffle=False, collate_fn=collate_samples)


def val_loader() -> DataLoader:
    return DataLoader(ColorVideos(n=6), batch_size=4, collate_fn=collate_samples)


# -- the loss ----------------------------------------------------------------------------------------------
def test_similarity_function_equals_the_built_in_cosine():
    torch.manual_seed(0)
    v, t = torch.randn(3, 8), torch.randn(5, 8)
    idx, scale = torch.tensor([0, 0, 1, 2, 2]), torch.tensor(math.log(20.0))
    ref = ContrastiveLoss()(v, t, idx, scale)
    out = ContrastiveLoss()(F.normalize(v, dim=-1), F.normalize(t, dim=-1), idx, scale,
                            similarity=lambda a, b: a @ b.t())  # fmt: skip
    assert torch.allclose(ref.loss, out.loss, atol=1e-6) and torch.allclose(ref.loss_v2t, out.loss_v2t, atol=1e-6)


def test_fixed_temperature_and_summed_directions():
    torch.manual_seed(0)
    v, t, idx = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8), torch.arange(4)
    learnable = torch.tensor(math.log(5.0), requires_grad=True)
    out = ContrastiveLoss(temperature=0.01, directions="sum")(v, t, idx, learnable)
    assert float(out.scale) == pytest.approx(100.0)
    assert torch.allclose(out.loss, out.loss_t2v + out.loss_v2t)
    sim = F.normalize(t, dim=-1) @ F.normalize(v, dim=-1).t()
    assert torch.allclose(out.loss_t2v, F.cross_entropy(100 * sim, idx), atol=1e-5)
    out.loss.backward()
    assert learnable.grad is None or float(learnable.grad) == 0.0  # a fixed temperature ignores the parameter
    mean = ContrastiveLoss()(v, t, idx, learnable.detach())
    assert torch.allclose(mean.loss, (mean.loss_t2v + mean.loss_v2t) / 2)


@pytest.mark.parametrize("bad", [{"similarity": "dot"}, {"directions": "max"}, {"temperature": 0.0},
                                 {"similarity": "tight", "temperature": 0.01}])
def test_contrastive_config_refuses(bad):
    with pytest.raises(ConfigError):
        ContrastiveConfig(**bad)


# -- Mug and tightTransf in the retrieval task ------------------------------------------------------------
def _direct_similarity(task: RetrievalTask, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation similarity computed by hand over ColorVideos(n=6), and its caption index."""
    data = ColorVideos(n=6)
    batch = collate_samples([data[i] for i in range(len(data))])
    video = normalize(batch["video"], task.model.image_mean, task.model.image_std)
    ids, mask = task.tokenize(list(batch["captions"]))
    with torch.no_grad():
        v = task.model.encode_video(video)
        t = task.model.encode_text(ids, mask)
        if kind == "mug":
            sim = mug_similarity(t.tokens, t.mask, v.frame_embeds)
        else:
            sim = task.tight(t.embeds, v.frame_embeds)
    return sim, batch["caption_index"]


@pytest.mark.parametrize("kind", ["mug", "tight"])
def test_similarity_trains_and_evaluates(kind, tmp_path, tokenizer_dir):  # noqa: F811
    torch.manual_seed(0)
    contrastive = {"similarity": "mug", "temperature": 0.01, "directions": "sum"} if kind == "mug" else \
        {"similarity": "tight", "tight_layers": 1}
    model = TINY if kind == "mug" else TINY_SQUARE
    task = RetrievalTask(model=model, tokenizer=str(tokenizer_dir), contrastive=contrastive, optim=OPTIM,
                         evaluation={"text_chunk": 5, "write_plots": False})
    if kind == "tight":
        assert any(g["name"] == "tight" for g in task.param_groups())
        before = task.tight.score.weight.detach().clone()
    tower_before = task.model.image_tower.conv1.weight.detach().clone()
    batch = next(iter(train_loader()))
    batch["video"] = normalize(batch["video"], task.model.image_mean, task.model.image_std)
    total, out, _ = task.forward_loss(batch)
    if kind == "mug":
        assert float(out.scale) == pytest.approx(100.0) and torch.allclose(out.loss, out.loss_t2v + out.loss_v2t)
    total.backward()
    assert task.model.image_tower.conv1.weight.grad.abs().sum() > 0
    task.zero_grad()
    trainer(tmp_path).fit(task, train_loader())
    assert not torch.equal(tower_before, task.model.image_tower.conv1.weight)
    if kind == "tight":
        assert not torch.equal(before, task.tight.score.weight)
    task.eval()
    trainer(tmp_path).validate(task, val_loader(), verbose=False)
    sim, index = _direct_similarity(task, kind)
    ref = evaluate_similarity(sim, index).metrics
    got = task.last_metrics["val"]
    assert got["num_videos"] == 6 and got["num_texts"] == 12
    for key in ("t2v_R@1", "t2v_R@5", "v2t_R@1", "t2v_MnR", "v2t_MnR"):
        assert got[key] == pytest.approx(ref[key], abs=1e-6), key


def test_tight_needs_a_square_text_tower(tokenizer_dir):  # noqa: F811
    with pytest.raises(ConfigError, match="tight"):
        RetrievalTask(model=TINY, tokenizer=str(tokenizer_dir), contrastive={"similarity": "tight"})


# -- the video mask reaches the block --------------------------------------------------------------------------
def test_retrieval_video_mask_pools_the_real_frames_only(tokenizer_dir):  # noqa: F811
    torch.manual_seed(0)
    task = RetrievalTask(model=TINY, tokenizer=str(tokenizer_dir))
    batch = collate_samples([ColorVideos()[i] for i in range(2)])
    batch["video"] = normalize(batch["video"], task.model.image_mean, task.model.image_std)
    video = batch["video"].clone()
    video[:, 2:] = torch.randn_like(video[:, 2:])  # padded slots hold garbage
    batch["video"] = video
    batch["video_mask"] = torch.tensor([[True, True, False, False]] * 2)
    captured, inputs = {}, task.similarity_inputs

    def spy(v, t, mask):
        captured["v"] = v.embeds.detach()
        return inputs(v, t, mask)

    task.similarity_inputs = spy
    task.forward_loss(batch)
    with torch.no_grad():
        short = task.model.encode_video(batch["video"][:, :2]).embeds  # the first two frames only
    assert torch.allclose(captured["v"], short, atol=1e-5)


# -- the block's tokenizer hook --------------------------------------------------------------------------------
def test_prompt_switch_caption_weights_are_bound_when_training_starts(tmp_path, tokenizer_dir):  # noqa: F811
    model = ModelConfig(image="vit_tiny", num_frames=4, block="prompt_switch")
    task = RetrievalTask(model=model, tokenizer=str(tokenizer_dir), optim=OPTIM)
    assert task.block.caption_token_weights is None
    trainer(tmp_path, max_steps=1).fit(task, train_loader())
    weights = task.block.caption_token_weights
    assert weights is not None and (weights < 1).any() and (weights == 1).any()
    the = task.tokenizer.encode("the")[0]
    assert float(weights[the]) == pytest.approx(task.block.frequent_weight)


def test_vpt_text_context_is_initialised_on_fresh_weights_only(tmp_path, tokenizer_dir):  # noqa: F811
    model = ModelConfig(image="vit_tiny", num_frames=4, block="vpt",
                        block_args={"n_text": 4, "ctx_init": "a photo of a"})  # fmt: skip
    task = RetrievalTask(model=model, tokenizer=str(tokenizer_dir), optim={**OPTIM, "lr": 0.0})
    trainer(tmp_path, max_steps=1).fit(task, train_loader())
    ids = task.tokenizer.encode("a photo of a")[:4]
    emb = task.model.text_tower.token_embedding.weight[torch.tensor(ids)]
    assert torch.allclose(task.block.text_prompts[0], emb)  # lr 0: what fit set up is still there
    restored = RetrievalTask(model=model, tokenizer=str(tokenizer_dir), optim={**OPTIM, "lr": 0.0})
    trained = torch.randn_like(restored.block.text_prompts)
    restored.load_state_dict({**task.state_dict(), "model.block.text_prompts": trained})
    restored.on_load_checkpoint({})  # what Lightning calls when it restores weights
    trainer(tmp_path, max_steps=1).fit(restored, train_loader())
    assert torch.equal(restored.block.text_prompts, trained)
    # trained prompts that come with model.pretrained (a converted / vidlang directory) are not re-initialised
    import dataclasses

    from vidlang.models.clip.pretrained import save_vidlang

    sd = {**task.model.state_dict(), "block.text_prompts": trained}
    info = {"format": "vidlang", "source": "test", "unknown": [],
            "vision": dataclasses.asdict(task.model.image_tower.cfg),
            "text": dataclasses.asdict(task.model.text_tower.cfg)}  # fmt: skip
    save_vidlang(sd, info, tmp_path / "pretrained")
    from_dir = RetrievalTask(model=dataclasses.replace(model, pretrained=str(tmp_path / "pretrained")),
                             tokenizer=str(tokenizer_dir), optim={**OPTIM, "lr": 0.0})
    assert from_dir.video_text.block_weights_loaded
    trainer(tmp_path, max_steps=1).fit(from_dir, train_loader())
    assert torch.equal(from_dir.block.text_prompts, trained)


# -- the lr scaling rule ---------------------------------------------------------------------------------------
def test_lr_scaling_rule_uses_the_global_batch(tmp_path, tokenizer_dir, capsys):  # noqa: F811
    class Data(pl.LightningDataModule):
        loader = type("Loader", (), {"batch_size": 4})()

        def train_dataloader(self):
            return train_loader(4)

    assert OptimConfig(lr=1e-3, base_batch_size=256).scaled_lr(512) == pytest.approx(2e-3)
    task = RetrievalTask(model=TINY, tokenizer=str(tokenizer_dir),
                         optim={**OPTIM, "lr": 1e-3, "base_batch_size": 32})  # fmt: skip
    t = trainer(tmp_path, max_steps=1, accumulate_grad_batches=2)
    t.fit(task, datamodule=Data())
    assert task.global_batch_size() == 8
    lrs = {g["name"]: g["initial_lr"] for g in t.optimizers[0].param_groups}
    assert max(lrs.values()) == pytest.approx(1e-3 * 8 / 32)
    assert "lr 0.001 x global batch 8 / base 32 = 0.00025" in capsys.readouterr().out
    plain = RetrievalTask(model=TINY, tokenizer=str(tokenizer_dir), optim={**OPTIM, "base_batch_size": 32})
    with pytest.raises(ConfigError, match="base_batch_size"):
        trainer(tmp_path, max_steps=1).fit(plain, train_loader())


# -- callbacks ------------------------------------------------------------------------------------------------
def test_ila_align_decay_halves_offsets_from_the_start_epoch(tmp_path, tokenizer_dir):  # noqa: F811
    model = ModelConfig(image="vit_tiny", num_frames=4, block="ila")
    task = RetrievalTask(model=model, tokenizer=str(tokenizer_dir), optim={**OPTIM, "lr": 0.0})
    start = [layer.offsets.clone() for layer in task.block.layers]
    cb = ILAAlignDecay(start_epoch=1)
    trainer(tmp_path, max_steps=-1, max_epochs=3, limit_train_batches=1, callbacks=[cb]).fit(task, train_loader())
    assert cb.calls == [1, 2]
    for before, layer in zip(start, task.block.layers, strict=True):
        assert torch.allclose(layer.offsets, before * 0.25)
    with pytest.raises(ConfigError, match="ila"):
        trainer(tmp_path, callbacks=[ILAAlignDecay()]).fit(RetrievalTask(model=TINY, tokenizer=str(tokenizer_dir)),
                                                           train_loader())


def test_ema_evaluates_with_the_averaged_weights(tmp_path, tokenizer_dir):  # noqa: F811
    torch.manual_seed(0)
    task = RetrievalTask(model=TINY, tokenizer=str(tokenizer_dir), optim=OPTIM)
    w0 = task.model.image_tower.conv1.weight.detach().clone()
    seen = {}

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            seen.setdefault("raw", []).append(module.model.image_tower.conv1.weight.detach().clone())

        def on_validation_epoch_start(self, trainer, module):
            seen["val"] = module.model.image_tower.conv1.weight.detach().clone()

    decay = 0.5
    trainer(tmp_path, max_steps=2, callbacks=[EMA(decay=decay), Probe()], limit_val_batches=1,
            val_check_interval=2).fit(task, train_loader(), val_loader())  # fmt: skip
    w1, w2 = seen["raw"]
    assert not torch.equal(w0, w1) and not torch.equal(seen["val"], w2)  # validation ran on other weights
    assert torch.allclose(seen["val"], decay * w1 + (1 - decay) * w2, atol=1e-7)  # EMA: w1, then 0.5 w1 + 0.5 w2
    with pytest.raises(ConfigError):
        EMA(decay=1.0)


def test_video_to_text_convention_by_name(tmp_path, tokenizer_dir):  # noqa: F811
    from vidlang.eval.retrieval import evaluate_embeddings

    torch.manual_seed(0)
    task = RetrievalTask(model=TINY, tokenizer=str(tokenizer_dir), evaluation={"v2t": "clip4clip", "dsl": False})
    trainer(tmp_path).validate(task, val_loader(), verbose=False)
    data = ColorVideos(n=6)
    batch = collate_samples([data[i] for i in range(len(data))])
    with torch.no_grad():
        video = task.encode_video(normalize(batch["video"], task.model.image_mean, task.model.image_std))
        ids, mask = task.tokenize(list(batch["captions"]))
        text = F.normalize(task.model.encode_text(ids, mask).embeds, dim=-1)
    ref = evaluate_embeddings(text, video, batch["caption_index"], v2t="clip4clip").metrics
    other = evaluate_embeddings(text, video, batch["caption_index"], v2t="best_caption").metrics
    got = task.last_metrics["val"]
    assert got["v2t_MnR"] == pytest.approx(ref["v2t_MnR"]) and got["v2t_R@1"] == pytest.approx(ref["v2t_R@1"])
    assert ref["v2t_MnR"] != other["v2t_MnR"]  # the two conventions differ on this gallery
    report = (tmp_path / "val_metrics.json").read_text()
    assert '"v2t": "clip4clip"' in report
    with pytest.raises(ConfigError, match="v2t"):
        RetrievalTask(model=TINY, tokenizer=str(tokenizer_dir), evaluation={"v2t": "max"})


# -- feature-cache gradient accumulation in the task -----------------------------------------------------------
class GradProbe(pl.Callback):
    """The gradients (and the loss) of the first optimizer step."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, module, optimizer):
        if not self.grads:
            self.grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("size", [1, 3])
def test_micro_batches_give_the_full_batch_gradients(size, tmp_path, tokenizer_dir):  # noqa: F811
    """contrastive.micro_batch_size: the first step's gradients equal the whole batch's (1e-5), and training runs."""
    probes = {}
    for micro in (None, size):
        torch.manual_seed(0)
        task = RetrievalTask(model=ModelConfig(image="vit_tiny", num_frames=4, block="seq_transformer"),
                             tokenizer=str(tokenizer_dir), optim=OPTIM, contrastive={"micro_batch_size": micro})
        probes[micro] = GradProbe()
        trainer(tmp_path, max_steps=2, callbacks=[probes[micro]]).fit(task, train_loader(4))
        assert task.global_step == 2
    full, cached = probes[None].grads, probes[size].grads
    assert full.keys() == cached.keys() and len(full) > 10
    for name, g in full.items():
        assert torch.allclose(cached[name], g, atol=1e-5, rtol=1e-4), name


def test_micro_batches_refuse_what_cannot_be_cached(tmp_path, tokenizer_dir):  # noqa: F811
    with pytest.raises(ConfigError, match="cosine"):
        ContrastiveConfig(similarity="mug", micro_batch_size=2)
    task = RetrievalTask(model=ModelConfig(image="vit_tiny", num_frames=4, block="ila"), tokenizer=str(tokenizer_dir),
                         optim=OPTIM, contrastive={"micro_batch_size": 2})  # fmt: skip
    with pytest.raises(ConfigError, match="auxiliary"):
        trainer(tmp_path, max_steps=1).fit(task, train_loader(4))
