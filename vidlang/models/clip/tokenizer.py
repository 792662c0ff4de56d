"""CLIP-style tokenizer: ``tok(texts, context_length) -> (input_ids [A, Lt], attention_mask [A, Lt])``.

Every row is ``BOS tokens... EOT`` followed by padding; truncation drops caption tokens, never
EOT (the text tower pools at the last real token, ``attention_mask.sum(-1) - 1``).

Loaded from a checkpoint directory (``tokenizer.json`` via ``tokenizers``, or ``vocab.json`` +
``merges.txt`` via transformers' ``CLIPTokenizerFast`` with ``local_files_only=True``), or trained
from scratch on captions with :func:`train_tokenizer` (byte-level BPE, lowercased) and saved as
``tokenizer.json`` + ``tokenizer_config.json`` so that :meth:`ClipTokenizer.from_dir` reloads it.

Checkpoints embed the tokenizer as plain strings and ints (:meth:`ClipTokenizer.state`, under
:data:`TOKENIZER_KEY`; safe for ``torch.load(weights_only=True)``), read back by :meth:`ClipTokenizer.from_state`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import Tensor

BOS_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
TOKENIZER_KEY = "vidlang_tokenizer"  # where a checkpoint embeds the tokenizer's state


def _token_name(value: Any) -> str | None:
    """A special token as stored in HF configs: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class ClipTokenizer:
    """Wraps a ``tokenizers.Tokenizer``; adds BOS/EOT itself and pads on the right."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        bos_token: str = BOS_TOKEN,
        eot_token: str = EOT_TOKEN,
        pad_token: str | None = None,
        context_length: int = 77,
    ) -> None:
        self.tokenizer = tokenizer
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.bos_token, self.eot_token = bos_token, eot_token
        self.bos_id = self._require_id(bos_token, "BOS")
        self.eot_id = self._require_id(eot_token, "EOT")
        if pad_token is None and tokenizer.token_to_id(PAD_TOKEN) is not None:
            pad_token = PAD_TOKEN
        self.pad_token = pad_token
        # Without a pad token pad with 0, as open_clip does; the attention mask marks padding anyway.
        self.pad_id = self._require_id(pad_token, "pad") if pad_token is not None else 0
        self.context_length = context_length

    def _require_id(self, token: str, role: str) -> int:
        idx = self.tokenizer.token_to_id(token)
        if idx is None:
            raise ValueError(f"tokenizer has no {role} token {token!r}")
        return idx

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    # -- loading / saving --------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path, context_length: int = 77) -> ClipTokenizer:
        """Load from a checkpoint directory (``tokenizer.json``, else ``vocab.json`` + ``merges.txt``)."""
        d = Path(path)
        special = cls._special_tokens(d)
        if (d / "tokenizer.json").is_file():
            tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            from transformers import CLIPTokenizerFast

            tok = CLIPTokenizerFast.from_pretrained(str(d), local_files_only=True).backend_tokenizer
        else:
            from vidlang.errors import InputNotFoundError

            raise InputNotFoundError(f"{d}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt)")
        return cls(tok, context_length=context_length, **special)

    @staticmethod
    def _special_tokens(d: Path) -> dict[str, str]:
        out: dict[str, str] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later files win
            f = d / name
            if not f.is_file():
                continue
            cfg = json.loads(f.read_text())
            for key, arg in (("bos_token", "bos_token"), ("eos_token", "eot_token"), ("pad_token", "pad_token")):
                tok = _token_name(cfg.get(key))
                if tok:
                    out[arg] = tok
        return out

    def save(self, out_dir: str | Path) -> Path:
        """Write ``tokenizer.json`` + ``tokenizer_config.json`` (loadable by ``from_dir`` and by transformers)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        from vidlang.io import atomic_path, atomic_write_text

        with atomic_path(out / "tokenizer.json") as tmp:
            self.tokenizer.save(str(tmp))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eot_token,
            "model_max_length": self.context_length,
        }
        if self.pad_token is not None:
            cfg["pad_token"] = self.pad_token
        atomic_write_text(out / "tokenizer_config.json", json.dumps(cfg, indent=2) + "\n")
        return out

    def state(self) -> dict[str, Any]:
        """This tokenizer as plain strings and ints (safe for ``torch.load(weights_only=True)``)."""
        return {
            "tokenizer_json": self.tokenizer.to_str(),
            "bos_token": self.bos_token,
            "eot_token": self.eot_token,
            "pad_token": self.pad_token,
            "context_length": self.context_length,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ClipTokenizer:
        """The tokenizer :meth:`state` describes."""
        tok = Tokenizer.from_str(state["tokenizer_json"])
        return cls(tok, state["bos_token"], state["eot_token"], state["pad_token"], state["context_length"])

    # -- encoding ----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOT."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def __call__(self, texts: Sequence[str] | str, context_length: int | None = None) -> tuple[Tensor, Tensor]:
        """``texts`` -> ``input_ids [A, Lt]`` (long) and ``attention_mask [A, Lt]`` (long, 1 = token).

        ``Lt = context_length`` (default: the tokenizer's); rows are ``BOS ... EOT pad...``.
        """
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        if length < 2:
            raise ValueError(f"context_length must be >= 2 (BOS and EOT), got {length}")
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        ids = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), length), dtype=torch.long)
        for row, enc in enumerate(encodings):
            seq = [self.bos_id, *enc.ids[: length - 2], self.eot_id]
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        return ids, mask

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()


def train_tokenizer(
    captions: Iterable[str],
    out_dir: str | Path,
    vocab_size: int = 8192,
    min_frequency: int = 2,
    context_length: int = 77,
) -> ClipTokenizer:
    """Train a lowercase byte-level BPE tokenizer on ``captions`` and save it to ``out_dir``.

    Special tokens: ``<|pad|>`` (0), ``<|startoftext|>`` (1), ``<|endoftext|>`` (2). Byte-level:
    any text encodes without unknown tokens, so ``vocab_size`` must be at least 259.
    """
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

    from vidlang.progress import interactive

    specials = [PAD_TOKEN, BOS_TOKEN, EOT_TOKEN]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(f"vocab_size {vocab_size} < {len(alphabet) + len(specials)} (bytes + special tokens)")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase(), normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=interactive(),  # its bars print blank lines into logs
    )
    tok.train_from_iterator(captions, trainer=trainer)
    bos, eot = tok.token_to_id(BOS_TOKEN), tok.token_to_id(EOT_TOKEN)
    # Lets other libraries (transformers) add BOS/EOT the same way; ClipTokenizer adds them itself.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOT_TOKEN}", special_tokens=[(BOS_TOKEN, bos), (EOT_TOKEN, eot)]
    )
    clip_tok = ClipTokenizer(tok, pad_token=PAD_TOKEN, context_length=context_length)
    clip_tok.save(out_dir)
    return clip_tok
