"""ClipTokenizer: BOS ... EOT rows, right padding, truncation keeping EOT, training + reload, HF files."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import pre_tokenizers

from vidlang.models.clip.tokenizer import ClipTokenizer, train_tokenizer

CAPTIONS = [
    "A man is playing a guitar on stage.",
    "A woman slices a tomato in the kitchen",
    "Two dogs run along the beach at sunset",
    "a man is cooking pasta, then he eats it",
    "Children are playing football in the park",
] * 20


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[ClipTokenizer, object]:
    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer(CAPTIONS, out, vocab_size=320, context_length=12), out


def test_special_ids_and_vocab(trained):
    tok, _ = trained
    assert (tok.pad_id, tok.bos_id, tok.eot_id) == (0, 1, 2)
    assert 259 < tok.vocab_size <= 320


def test_rows_are_bos_tokens_eot_then_padding(trained):
    tok, _ = trained
    ids, mask = tok(["a man is playing", "dogs"], context_length=10)
    assert ids.shape == mask.shape == (2, 10) and ids.dtype == torch.long
    for row in range(2):
        n = int(mask[row].sum())
        assert ids[row, 0] == tok.bos_id and ids[row, n - 1] == tok.eot_id
        assert bool((mask[row, :n] == 1).all()) and bool((mask[row, n:] == 0).all())
        assert bool((ids[row, n:] == tok.pad_id).all())
        assert tok.eot_id not in ids[row, 1 : n - 1].tolist()
    assert tok.decode(ids[0]) == "a man is playing"


def test_truncation_keeps_eot(trained):
    tok, _ = trained
    long = " ".join(["children playing football in the park"] * 5)
    full = tok.encode(long)
    ids, mask = tok([long], context_length=6)
    assert bool(mask.all())
    assert ids[0].tolist() == [tok.bos_id, *full[:4], tok.eot_id]


def test_default_context_length_and_lowercase(trained):
    tok, _ = trained
    ids, _ = tok("A MAN Is Playing")
    assert ids.shape == (1, 12)
    assert torch.equal(ids, tok("a man is playing")[0])
    with pytest.raises(ValueError, match="context_length"):
        tok(["x"], context_length=1)


def test_reload_is_identical(trained):
    tok, out = trained
    assert {p.name for p in out.iterdir()} >= {"tokenizer.json", "tokenizer_config.json"}
    again = ClipTokenizer.from_dir(out, context_length=12)
    assert (again.vocab_size, again.bos_id, again.eot_id, again.pad_id) == (
        tok.vocab_size, tok.bos_id, tok.eot_id, tok.pad_id,
    )  # fmt: skip
    texts = CAPTIONS[:5] + ["unseen wörds: zebra!"]
    for a, b in zip(tok(texts), again(texts), strict=True):
        assert torch.equal(a, b)


def test_training_is_byte_level_no_unknowns(trained):
    tok, _ = trained
    ids, mask = tok(["ünïcödé ✓ 42"], context_length=40)
    n = int(mask.sum())
    assert n > 3 and tok.decode(ids[0, :n]) == "ünïcödé ✓ 42"
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(CAPTIONS, "/nonexistent-not-written", vocab_size=100)


def _clip_style_vocab_dir(d, pad_token: str | None) -> list[str]:
    """vocab.json + merges.txt in OpenAI CLIP's style (``</w>`` word ends), as HF CLIP repos ship them."""
    alpha = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = alpha + [a + "</w>" for a in alpha] + ["ma", "man</w>", "<|startoftext|>", "<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (d / "merges.txt").write_text("#version: 0.2\nm a\nma n</w>\n")
    if pad_token is not None:
        (d / "tokenizer_config.json").write_text(json.dumps({"pad_token": pad_token, "eos_token": "<|endoftext|>"}))
    return vocab


def test_from_vocab_and_merges_via_transformers(tmp_path):
    pytest.importorskip("transformers")
    vocab = _clip_style_vocab_dir(tmp_path, pad_token="<|endoftext|>")
    tok = ClipTokenizer.from_dir(tmp_path)
    assert tok.bos_id == vocab.index("<|startoftext|>") and tok.eot_id == tok.pad_id == vocab.index("<|endoftext|>")
    ids, mask = tok(["A  Man", "man a"], context_length=6)
    assert [vocab[i] for i in ids[0, :4]] == ["<|startoftext|>", "a</w>", "man</w>", "<|endoftext|>"]
    assert [vocab[i] for i in ids[1, :4]] == ["<|startoftext|>", "man</w>", "a</w>", "<|endoftext|>"]
    assert mask.sum(-1).tolist() == [4, 4]


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        ClipTokenizer.from_dir(tmp_path)


def test_state_round_trip_is_plain_data_and_identical(trained, tmp_path):
    """What a checkpoint embeds (``ClipTokenizer.state``) is plain strings and ints, loads with
    ``weights_only=True`` and gives back a tokenizer that encodes exactly as the original."""
    from vidlang.models.clip.tokenizer import TOKENIZER_KEY

    tok, _ = trained
    torch.save({TOKENIZER_KEY: tok.state()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)[TOKENIZER_KEY]
    assert all(isinstance(v, (str, int, type(None))) for v in state.values())
    back = ClipTokenizer.from_state(state)
    assert (back.bos_id, back.eot_id, back.pad_id, back.context_length) == (tok.bos_id, tok.eot_id, tok.pad_id, 12)
    for a, b in zip(back(CAPTIONS[:5]), tok(CAPTIONS[:5]), strict=True):
        assert torch.equal(a, b)
