"""Lightning DDP (2 CPU processes, gloo) for the recognition and chat-encoder tasks, as tests/test_ddp.py does for
retrieval: the ranks stay in sync and their synchronised gradients equal single-process training on the same data;
the evaluation at the end of the epoch is gathered across ranks (recognition: the distributed sampler's padding
counted once, the report written once, to the checkpoint directory that every rank resolves; chat: the logged
caption loss is the mean over the ranks)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from test_chat_encoder import VISUAL, llm_dir, videos  # noqa: F401  (llm_dir: a fixture)
from test_recognition_eval import CLASSES, SINGLE, Clips, reference, tok  # noqa: F401  (tok: a fixture)
from torch.utils.data import DataLoader, Subset

from vidlang.data.collate import collate_samples
from vidlang.models.factory import ModelConfig
from vidlang.tasks.chat_encoder import ChatEncoderTask
from vidlang.tasks.recognition import RecognitionTask


def ddp_trainer(tmp_path: Path, **kw) -> pl.Trainer:
    args = dict(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=1, logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                num_sanity_val_steps=0, use_distributed_sampler=False, default_root_dir=tmp_path)  # fmt: skip
    args.update(kw)
    return pl.Trainer(**args)


def save(obj: object, probe_dir: str, name: str, rank: int) -> None:
    torch.save(obj, Path(probe_dir) / f"{name}_rank{rank}.pt")


def load(tmp_path: Path, name: str) -> list:
    return [torch.load(tmp_path / f"{name}_rank{r}.pt") for r in range(2)]


class ParamProbe:
    """Saves this rank's parameters before the training step and at the start of validation, and the loss and the
    (DDP-synchronised) gradients after the backward."""

    probe_dir: str = ""

    def _params(self) -> dict:
        return {n: p.detach().clone() for n, p in self.named_parameters()}

    def on_train_batch_start(self, batch, batch_idx):
        save(self._params(), self.probe_dir, "params_step", self.global_rank)

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        save(self._params(), self.probe_dir, "params_val", self.global_rank)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self._loss = loss.detach().clone()
        return loss

    def on_after_backward(self) -> None:
        grads = {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}
        save({"loss": self._loss, "grads": grads}, self.probe_dir, "step", self.global_rank)


def assert_ranks_in_sync(params: list[dict]) -> None:
    assert params[0].keys() == params[1].keys()
    for name in params[0]:
        torch.testing.assert_close(params[0][name], params[1][name], rtol=0, atol=0, msg=name)


# -- recognition ---------------------------------------------------------------------------------------------------
class RecognitionProbe(ParamProbe, RecognitionTask):
    """Rank r trains on clips (2r, 2r+1): one global batch of clips 0-3. Validation: rank 0 clips 0, 1, 2 and
    rank 1 clips 3 and 0 again (what a distributed sampler's padding serves)."""

    def train_dataloader(self) -> DataLoader:
        r = self.global_rank
        return DataLoader(Subset(Clips(SINGLE), [2 * r, 2 * r + 1]), batch_size=2, collate_fn=collate_samples)

    def val_dataloader(self) -> DataLoader:
        order = [0, 1, 2] if self.global_rank == 0 else [3, 0]
        return DataLoader(Subset(Clips(SINGLE), order), batch_size=2, collate_fn=collate_samples)


def test_ddp_recognition_grads_match_single_process_and_eval_is_gathered(tok, tmp_path):  # noqa: F811
    pl.seed_everything(0)
    probe = RecognitionProbe(ModelConfig(image="vit_tiny", num_frames=4), tokenizer=str(tok), class_names=CLASSES,
                             head={"enabled": True}, mix={"mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0},
                             optim={"lr": 1e-2, "warmup_steps": 0, "warmup_ratio": None},
                             evaluation={"write_plots": False})
    probe.probe_dir = str(tmp_path)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    ddp_trainer(tmp_path, enable_checkpointing=True, callbacks=[ckpt]).fit(probe)

    params, steps = load(tmp_path, "params_step"), load(tmp_path, "step")
    assert_ranks_in_sync(params)
    assert any(n.startswith("head.") for n in params[0])  # the task's own head trains too (its param group)
    ref = copy.deepcopy(probe)
    ref.load_state_dict(params[0])
    ref._head_ready = True
    batch = ref.on_after_batch_transfer(collate_samples([Clips(SINGLE)[i] for i in range(4)]), 0)
    loss, _ = ref.forward_loss(batch)  # the mean over the global batch of 4 = the mean of the ranks' means
    loss.backward()
    torch.testing.assert_close((steps[0]["loss"] + steps[1]["loss"]) / 2, loss.detach(), rtol=0, atol=1e-5)
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert set(steps[0]["grads"]) == set(ref_grads) and ref_grads["head.weight"].abs().sum() > 0
    for name, grad in ref_grads.items():
        for s in steps:
            torch.testing.assert_close(s["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)

    # evaluation at the end of the epoch: 4 distinct clips (the repeat dropped), reported once beside the checkpoint
    report = json.loads((tmp_path / "ckpt" / "val_metrics.json").read_text())
    assert report["metrics"]["num_videos"] == 4 and report["duplicates_dropped"] == 1
    assert len((tmp_path / "ckpt" / "val_metrics_history.jsonl").read_text().splitlines()) == 1
    ev = copy.deepcopy(probe)
    ev.load_state_dict(load(tmp_path, "params_val")[0])
    ev._head_ready = True
    expected = reference(ev, SINGLE[:4], "softmax")
    assert report["metrics"] == pytest.approx({**expected, "num_videos": 4, "num_skipped": 0})


# -- chat encoder --------------------------------------------------------------------------------------------------
CAPTIONS = {0: ["a red ball moves left", "the blue square grows"], 1: ["a circle beeps loudly", "red square"]}


def chat_batch(rank: int, split: str) -> dict:
    seed = rank + (10 if split == "val" else 0)
    return {"video": videos(2, seed=seed), "captions": CAPTIONS[rank], "caption_index": torch.tensor([0, 1])}


class ChatProbe(ParamProbe, ChatEncoderTask):
    """Rank r trains and validates on its own batch of 2 videos and 2 captions."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader([chat_batch(self.global_rank, "train")], batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader([chat_batch(self.global_rank, "val")], batch_size=None)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_chat_grads_match_single_process_and_val_loss_is_the_ranks_mean(llm_dir, tmp_path):  # noqa: F811
    """Two processes started by ``torch.distributed.run`` (tests/ddp_chat_worker.py), Lightning's ``ddp``."""
    import os
    import subprocess
    import sys

    tests = Path(__file__).resolve().parent
    path = os.pathsep.join([str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(tests / "ddp_chat_worker.py"), llm_dir, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    params, steps = load(tmp_path, "params_step"), load(tmp_path, "step")
    assert_ranks_in_sync(params)
    pl.seed_everything(0)
    ref = ChatEncoderTask(model=VISUAL, llm=llm_dir)
    ref.load_state_dict(params[0])
    ref.train()
    grads = []
    for rank in range(2):  # DDP averages the ranks' gradients: the reference is the mean of each rank's
        ref.zero_grad()
        loss = ref.caption_loss(chat_batch(rank, "train"))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None})
        torch.testing.assert_close(steps[rank]["loss"], loss.detach(), rtol=0, atol=1e-5)
    mean_grads = {n: (grads[0][n] + grads[1][n]) / 2 for n in grads[0]}
    assert mean_grads and set(steps[0]["grads"]) == set(mean_grads)
    assert not any(n.startswith("encoder.llm.") for n in mean_grads)  # the LLM stays frozen
    for name, grad in mean_grads.items():
        for s in steps:
            torch.testing.assert_close(s["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)

    ref.load_state_dict(load(tmp_path, "params_val")[0])
    ref.eval()
    with torch.no_grad():
        expected = sum(ref.caption_loss(chat_batch(r, "val")) for r in range(2)) / 2
    for metrics in load(tmp_path, "metrics"):  # synchronised: every rank logs the mean over the ranks
        assert metrics["val/loss_caption"].item() == pytest.approx(expected.item(), abs=1e-5)
