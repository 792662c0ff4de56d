"""Lightning DDP (2 CPU processes, gloo): the gathered loss and the synchronised gradients equal
single-process training on the same global batch, for the global and the local-loss variants;
evaluation gathered across ranks equals single-process evaluation of the same videos, with the
distributed sampler's padding counted once and a bad video skipped (not replaced)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from vidlang.data.collate import collate_samples
from vidlang.data.datasets import VideoTextDataset
from vidlang.data.sample import VideoSample
from vidlang.data.sampling import build_sampler
from vidlang.data.transforms import ClipTransform
from vidlang.eval.retrieval import evaluate_embeddings
from vidlang.models.clip.tokenizer import train_tokenizer
from vidlang.models.factory import ModelConfig
from vidlang.tasks import RetrievalTask

WORDS = ["red", "green", "blue", "yellow", "white", "black", "pink", "grey"]


class Videos(Dataset):
    """Random videos; video i has ``counts[i]`` captions."""

    def __init__(self, counts: list[int]) -> None:
        g = torch.Generator().manual_seed(0)
        self.videos = torch.randint(0, 256, (len(counts), 1, 4, 3, 32, 32), generator=g, dtype=torch.uint8)
        self.counts = counts

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, i: int) -> VideoSample:
        caps = [f"a {WORDS[i]} thing number {j}" for j in range(self.counts[i])]
        return VideoSample(video=self.videos[i], key=f"v{i}", captions=caps)


class GradProbe(RetrievalTask):
    """Step 0 uses the global loss, step 1 the local loss. Before each step it saves this rank's
    parameters; after each backward the loss and the (DDP-synchronised) gradients."""

    probe_dir: str = ""
    data: Dataset | None = None

    def train_dataloader(self) -> DataLoader:
        """Rank r gets videos (2r, 2r+1) at step 0 and (4+2r, 5+2r) at step 1: global batches 0-3, 4-7."""
        r = self.global_rank
        order = [2 * r, 2 * r + 1, 4 + 2 * r, 5 + 2 * r]
        return DataLoader(Subset(self.data, order), batch_size=2, shuffle=False, collate_fn=collate_samples)

    def val_dataloader(self) -> DataLoader:
        """Unequal shares (3 and 2 videos) plus a repeat of video 0 on rank 1, like sampler padding."""
        order = [0, 1, 2] if self.global_rank == 0 else [3, 4, 0]
        return DataLoader(Subset(self.data, order), batch_size=2, shuffle=False, collate_fn=collate_samples)

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        params = {n: p.detach().clone() for n, p in self.named_parameters()}
        torch.save(params, Path(self.probe_dir) / f"params_val_rank{self.global_rank}.pt")

    def on_train_batch_start(self, batch, batch_idx):
        self.loss.local_loss = batch_idx == 1
        params = {n: p.detach().clone() for n, p in self.named_parameters()}
        torch.save(params, Path(self.probe_dir) / f"params_step{batch_idx}_rank{self.global_rank}.pt")

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self._probe = {"loss": loss.detach().clone(), "keys": list(batch["key"]), "step": batch_idx}
        return loss

    def on_after_backward(self) -> None:
        grads = {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}
        step = self._probe["step"]
        torch.save({**self._probe, "grads": grads}, Path(self.probe_dir) / f"step{step}_rank{self.global_rank}.pt")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(
        [f"a {w} thing number {j}" for w in WORDS for j in range(3)],
        out,
        vocab_size=280,
        min_frequency=1,
        context_length=24,
    )
    return out


def reference_step(task: RetrievalTask, params: dict, batch: dict, local_loss: bool) -> tuple[torch.Tensor, dict]:
    """Single-process loss and gradients on the whole global batch from ``params``."""
    ref = copy.deepcopy(task)
    ref.load_state_dict(params, strict=False)
    ref.loss.local_loss = local_loss  # no process group here: identical to the global loss
    loss, _, _ = ref.forward_loss(ref.on_after_batch_transfer(batch, 0))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}


def test_ddp_gathered_loss_and_grads_match_single_process(tmp_path, tokenizer_dir):
    pl.seed_everything(0)
    task = GradProbe(ModelConfig(image="vit_tiny", num_frames=4), tokenizer=str(tokenizer_dir),
                     optim={"warmup_ratio": None})
    task.probe_dir = str(tmp_path)
    # global batch 0 = videos 0-3: 3 captions on rank 0, 4 on rank 1 (exercises the padded gather);
    # global batch 1 = videos 4-7 with equal shares, as the local loss requires.
    data = Videos([2, 1, 3, 1, 2, 2, 2, 2])
    task.data = data
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=2,
        logger=False,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    trainer.fit(task)  # data from GradProbe.train_dataloader (a fixed split per rank)

    for step, local_loss in ((0, False), (1, True)):
        probes = [torch.load(tmp_path / f"step{step}_rank{r}.pt") for r in range(2)]
        params = [torch.load(tmp_path / f"params_step{step}_rank{r}.pt") for r in range(2)]
        for name in params[0]:
            torch.testing.assert_close(params[0][name], params[1][name], rtol=0, atol=0)  # ranks in sync
        videos = [4 * step + i for i in range(4)]
        assert [probes[0]["keys"], probes[1]["keys"]] == [[f"v{i}" for i in videos[:2]], [f"v{i}" for i in videos[2:]]]
        batch = collate_samples([data[i] for i in videos])
        ref_loss, ref_grads = reference_step(task, params[0], batch, local_loss)
        if local_loss:  # each rank holds its share of the rows; their mean is the global loss
            torch.testing.assert_close((probes[0]["loss"] + probes[1]["loss"]) / 2, ref_loss, rtol=0, atol=1e-6)
        else:  # every rank computes the full gathered loss
            for p in probes:
                torch.testing.assert_close(p["loss"], ref_loss, rtol=0, atol=1e-6)
        assert set(probes[0]["grads"]) == set(ref_grads) and ref_grads["model.logit_scale"].abs() > 0
        for name, ref in ref_grads.items():
            for p in probes:
                torch.testing.assert_close(p["grads"][name], ref, rtol=1e-4, atol=1e-6, msg=name)

    # evaluation at the end of the epoch (after step 1), gathered over ranks, padding repeat dropped,
    # equals single-process evaluation of the same 5 videos
    report = json.loads((tmp_path / "val_metrics.json").read_text())
    ref = copy.deepcopy(task)
    ref.load_state_dict(torch.load(tmp_path / "params_val_rank0.pt"), strict=False)
    ref.eval()
    batch = ref.on_after_batch_transfer(collate_samples([data[i] for i in range(5)]), 0)
    with torch.no_grad():
        video = ref.encode_video(batch["video"])
        text = torch.nn.functional.normalize(ref.model.encode_text(*ref.tokenize(batch["captions"])).embeds, dim=-1)
    expected = evaluate_embeddings(text, video, batch["caption_index"], dsl=True).metrics
    assert report["metrics"]["num_videos"] == 5 and report["metrics"]["num_texts"] == sum(data.counts[:5])
    assert report["metrics"] == pytest.approx(expected)


class EvalProbe(RetrievalTask):
    """Evaluates ``entries`` with the real dataset in evaluation mode; Lightning gives the plain loader a
    ``DistributedSampler`` that pads the 7 entries to 8 (rank 0: 0, 2, 4, 6; rank 1: 1, 3, 5 and 0 again)."""

    entries: list = []

    def val_dataloader(self) -> DataLoader:
        ds = VideoTextDataset(self.entries, build_sampler("segment", num_frames=4), ClipTransform(32, "eval"),
                              backend="pyav", rank=self.global_rank, split="val")
        return DataLoader(ds, batch_size=2, collate_fn=collate_samples)


@pytest.fixture(scope="module")
def corpus_entries(tmp_path_factory) -> list:
    from vidlang.data.formats import build_index
    from vidlang.data.synthetic import generate_corpus

    out = tmp_path_factory.mktemp("corpus")
    generate_corpus(out, 7, seed=5, size=32, frames=8, workers=1, progress=False)
    return build_index("manifest", path=str(out / "manifest.csv")).entries


def test_ddp_eval_counts_padding_once_and_skips_bad_videos(tmp_path, corpus_entries):
    """Entries 1, 2, 3 are broken: rank 0 serves [0, -] [4, 6], rank 1 an all-skipped batch, then [5, 0 (padding)].
    Before the fix each bad entry was replaced by another video, and such a repeat made ``_gathered`` drop every
    later video; now the gallery is exactly the 4 good videos, each once, and the 3 bad ones are counted."""
    entries = copy.deepcopy(corpus_entries)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    for i in (1, 2, 3):
        entries[i].source = str(broken)
    tok = tmp_path / "tok"
    train_tokenizer([c for e in entries for c in e.captions], tok, vocab_size=300, min_frequency=1, context_length=32)
    pl.seed_everything(0)
    task = EvalProbe(ModelConfig(image="vit_tiny", num_frames=4), tokenizer=str(tok), evaluation={"write_plots": False})
    task.entries = entries
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, default_root_dir=tmp_path,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    out = trainer.validate(task, verbose=False)[0]
    good = [0, 4, 5, 6]
    n_captions = sum(len(entries[i].captions) for i in good)
    report = json.loads((tmp_path / "val_metrics.json").read_text())
    assert (report["num_videos"], report["num_captions"], report["num_skipped"]) == (4, n_captions, 3)
    assert (out["val/num_videos"], out["val/num_captions"], out["val/num_skipped"]) == (4, n_captions, 3)
    ds = VideoTextDataset(entries, build_sampler("segment", num_frames=4), ClipTransform(32, "eval"), backend="pyav")
    ref = task.eval()
    batch = ref.on_after_batch_transfer(collate_samples([ds[i] for i in good]), 0)
    with torch.no_grad():
        video = ref.encode_video(batch["video"])
        text = torch.nn.functional.normalize(ref.model.encode_text(*ref.tokenize(batch["captions"])).embeds, dim=-1)
    expected = evaluate_embeddings(text, video, batch["caption_index"], dsl=True).metrics
    assert report["metrics"] == pytest.approx(expected)


class MicroProbe(RetrievalTask):
    """contrastive.micro_batch_size under DDP: rank r trains on videos (2r, 2r+1); the parameters before the step and
    the (rank-averaged) gradients the optimizer sees are saved."""

    probe_dir: str = ""
    data: Dataset | None = None

    def train_dataloader(self) -> DataLoader:
        r = self.global_rank
        return DataLoader(Subset(self.data, [2 * r, 2 * r + 1]), batch_size=2, shuffle=False,
                          collate_fn=collate_samples)  # fmt: skip

    def on_train_batch_start(self, batch, batch_idx):
        params = {n: p.detach().clone() for n, p in self.named_parameters()}
        torch.save(params, Path(self.probe_dir) / f"micro_params_rank{self.global_rank}.pt")

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}
        torch.save(grads, Path(self.probe_dir) / f"micro_grads_rank{self.global_rank}.pt")


def test_ddp_micro_batches_match_the_single_process_global_batch(tmp_path, tokenizer_dir):
    """Feature-cache accumulation (one video per micro-batch) on 2 gloo ranks: every rank's gradients equal the
    single-process gradients of the global batch of 4 videos (the gather sees all negatives)."""
    pl.seed_everything(0)
    cfg = ModelConfig(image="vit_tiny", num_frames=4)
    task = MicroProbe(cfg, tokenizer=str(tokenizer_dir), optim={"warmup_ratio": None},
                      contrastive={"micro_batch_size": 1})  # fmt: skip
    task.probe_dir, task.data = str(tmp_path), Videos([2, 1, 3, 1])
    pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=1, logger=False, default_root_dir=tmp_path,
               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False).fit(task)  # fmt: skip
    grads = [torch.load(tmp_path / f"micro_grads_rank{r}.pt") for r in range(2)]
    params = torch.load(tmp_path / "micro_params_rank0.pt")
    ref = RetrievalTask(cfg, tokenizer=str(tokenizer_dir), optim={"warmup_ratio": None})
    ref.load_state_dict(params, strict=False)
    batch = ref.on_after_batch_transfer(collate_samples([task.data[i] for i in range(4)]), 0)
    loss, _, _ = ref.forward_loss(batch)
    loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert set(grads[0]) == set(ref_grads) and ref_grads["model.logit_scale"].abs() > 0
    for name, g in ref_grads.items():
        for rank in grads:
            torch.testing.assert_close(rank[name], g, rtol=1e-4, atol=1e-6, msg=name)
