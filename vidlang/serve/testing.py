"""Tiny fixtures for the index/serve/CLI tests and ``tools/load_test_serve.py``: random tiny retrieval and
recognition checkpoints saved by a real ``pl.Trainer`` (one optimisation step) and a folder of synthetic videos.
No downloads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

WORDS = "a the red green blue yellow square circle triangle moves left right up down grows shrinks ball box"


def fit_one_step(task: Any, batches: list[dict], path: Path) -> Path:
    """Train ``task`` one step on ``batches`` (already collated) with a real ``pl.Trainer``; save it to ``path``."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=path.parent)
    trainer.fit(task, DataLoader(batches, batch_size=None))
    trainer.save_checkpoint(path)
    return path


def tiny_retrieval_checkpoint(out_dir: str | Path, num_frames: int = 4, block: str = "mean",
                              block_args: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """Train a ``vit_tiny`` :class:`RetrievalTask` for one step on random clips; returns ``out_dir/tiny.ckpt``."""
    import pytorch_lightning as pl

    from vidlang.models.clip.tokenizer import train_tokenizer
    from vidlang.models.factory import ModelConfig
    from vidlang.tasks.retrieval import RetrievalTask

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(seed, verbose=False)
    tok = train_tokenizer([WORDS] * 4, out / "tokenizer", vocab_size=300, min_frequency=1, context_length=24)
    cfg = ModelConfig(image="vit_tiny", num_frames=num_frames, block=block, block_args=dict(block_args or {}),
                      freeze="full")
    task = RetrievalTask(cfg, optim={"lr": 1e-3, "warmup_steps": 0, "warmup_ratio": None},
                         evaluation={"write_plots": False})
    task.set_tokenizer(tok)
    g = torch.Generator().manual_seed(seed)
    words = WORDS.split()
    batches = [{
        "video": torch.randint(0, 256, (4, num_frames, 3, 32, 32), generator=g, dtype=torch.uint8),
        "captions": [" ".join(words[3 * i: 3 * i + 4]) for i in range(4)],
        "caption_index": torch.arange(4),
    }]
    return fit_one_step(task, batches, out / "tiny.ckpt")


def tiny_recognition_checkpoint(out_dir: str | Path, num_frames: int = 4,
                                class_names: tuple[str, ...] = ("moving left", "moving right", "growing"),
                                seed: int = 0) -> Path:
    """Train a ``vit_tiny`` :class:`RecognitionTask` with a linear head for one step on random clips; returns
    ``out_dir/tiny_recognition.ckpt``."""
    import pytorch_lightning as pl

    from vidlang.models.clip.tokenizer import train_tokenizer
    from vidlang.models.factory import ModelConfig
    from vidlang.tasks.recognition import RecognitionTask

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(seed, verbose=False)
    tok = train_tokenizer([WORDS + " moving growing"] * 4, out / "tokenizer", vocab_size=300, min_frequency=1,
                          context_length=24)
    cfg = ModelConfig(image="vit_tiny", num_frames=num_frames, block="mean", freeze="full")
    task = RecognitionTask(cfg, class_names=list(class_names), head={"enabled": True},
                           optim={"lr": 1e-3, "warmup_steps": 0, "warmup_ratio": None},
                           mix={"mixup": 0.0, "cutmix": 0.0}, evaluation={"write_plots": False})
    task.set_tokenizer(tok)
    g = torch.Generator().manual_seed(seed)
    batches = [{"video": torch.randint(0, 256, (4, num_frames, 3, 32, 32), generator=g, dtype=torch.uint8),
                "label": torch.arange(4) % len(class_names)}]
    return fit_one_step(task, batches, out / "tiny_recognition.ckpt")


def synthetic_videos(out_dir: str | Path, n: int = 8, seed: int = 0, size: int = 32, frames: int = 8) -> Path:
    """``n`` synthetic corpus videos; returns the folder holding them (``out_dir/videos``)."""
    from vidlang.data.synthetic import generate_corpus

    generate_corpus(out_dir, n, seed=seed, size=size, frames=frames, workers=1, progress=False)
    return Path(out_dir) / "videos"


SPECIALS = ("<unk>", "<pad>", "<s>", "</s>")  # ids 0..3: unknown, padding, begin, end of sequence


def tiny_llm(out_dir: str | Path, words: list[str], *, layers: int = 1, max_positions: int = 128,
             init: float = 0.2, extra_specials: tuple[str, ...] = (), chat_template: str | None = None) -> Path:
    """A random tiny Llama (width 32, 4 heads) with a whitespace word-level tokenizer saved to ``out_dir``.

    Vocabulary: :data:`SPECIALS`, ``extra_specials`` (special tokens), then ``words`` in the given order
    (repeats dropped). ``init``: the initializer range (0.2: soft prompts can steer the logits; with the default
    0.02 they are near uniform). The weights are drawn after ``torch.manual_seed(0)``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    vocab = {w: i for i, w in enumerate(dict.fromkeys([*SPECIALS, *extra_specials, *words]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"additional_special_tokens": list(extra_specials)} if extra_specials else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", **extra)
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_positions,
                      pad_token_id=1, bos_token_id=2, eos_token_id=3, initializer_range=init)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def tiny_chat_checkpoint(path: str | Path, llm_dir: str | Path) -> tuple[Path, Any]:
    """A :class:`ChatEncoderTask` checkpoint (``vit_tiny`` + a Q-former of 4 queries, 1 layer) over the LLM at
    ``llm_dir``, saved to ``path`` without the LLM's weights (as the task saves them); returns the path and the
    task."""
    import pytorch_lightning as pl

    from vidlang.models.factory import ModelConfig
    from vidlang.tasks.chat_encoder import ChatEncoderTask

    visual = ModelConfig(image="vit_tiny", num_frames=4, block="qformer", block_args={"num_queries": 4,
                                                                                      "num_layers": 1})
    task = ChatEncoderTask(model=visual, llm=str(llm_dir))
    state = {k: v for k, v in task.state_dict().items() if not k.startswith("encoder.llm.")}
    ckpt = {"state_dict": state, "hyper_parameters": dict(task.hparams), "pytorch-lightning_version": pl.__version__}
    torch.save(ckpt, path)
    return Path(path), task
