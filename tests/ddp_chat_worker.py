"""One rank of the chat-encoder DDP test (tests/test_ddp_tasks.py), started by ``torch.distributed.run`` (the
video Q-former block holds lambdas, so the task cannot be pickled to ``ddp_spawn`` workers): trains one step and
validates once with Lightning's ``ddp`` strategy under torchelastic. Usage: ``ddp_chat_worker.py LLM_DIR OUT``."""

from __future__ import annotations

import sys

import pytorch_lightning as pl
from test_chat_encoder import VISUAL
from test_ddp_tasks import ChatProbe, ddp_trainer, save


def main(llm_dir: str, out: str) -> None:
    pl.seed_everything(0, verbose=False)
    probe = ChatProbe(model=VISUAL, llm=llm_dir, optim={"lr": 1e-3, "warmup_steps": 0, "warmup_ratio": None})
    probe.probe_dir = out
    trainer = ddp_trainer(out, strategy="ddp")
    trainer.fit(probe)
    save({k: v.detach().clone() for k, v in trainer.callback_metrics.items()}, out, "metrics", trainer.global_rank)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
