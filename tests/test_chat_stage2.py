"""Chat encoder stage 2 (issue 18): instruction / VideoQA readers, chat-template loss masking, LoRA, VideoQA evaluation,
``vidlang chat``; end to end: instruction tuning on the synthetic corpus lifts answer accuracy far above chance.

The LLM is a tiny random Llama with a word-level tokenizer built here (as in ``test_chat_encoder.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vidlang.data.formats import build_index
from vidlang.data.formats.base import FormatError
from vidlang.data.synthetic.instruct import QUESTIONS, VALUES, chance_accuracy, write_instruction_sets
from vidlang.eval.videoqa import normalize_answer, qa_metrics
from vidlang.models.chat import ChatEncoder
from vidlang.models.chat_format import FALLBACK_CHAT_TEMPLATE, PLACEHOLDER, conversation_pieces
from vidlang.models.factory import ModelConfig, build_model
from vidlang.tasks.chat_encoder import ChatEncoderTask

VISUAL = ModelConfig(image="vit_tiny", block="qformer", block_args={"num_queries": 4, "num_layers": 1})
EXTRA = "### Human : Assistant hello hi there describe it a the red ball you are helpful".split()
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _words() -> list[str]:
    words = set(EXTRA) | {"system", "user", "assistant"}
    for q in QUESTIONS.values():
        words |= set(q.split())
    for values in VALUES.values():
        words |= set(values)
    return sorted(words)


def make_llm(path: Path, chat_template: str | None = None, init: float = 0.2) -> str:
    from vidlang.serve.testing import tiny_llm

    return str(tiny_llm(path, _words(), layers=2, max_positions=256, init=init,
                        extra_specials=("<|im_start|>", "<|im_end|>"), chat_template=chat_template))


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return make_llm(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    return make_llm(tmp_path_factory.mktemp("tiny_chatml"), CHATML)


def encoder(llm: str, seed: int = 0, **kwargs) -> ChatEncoder:
    torch.manual_seed(seed)
    return ChatEncoder.from_pretrained_llm(build_model(VISUAL), llm, prompt_style="chat", **kwargs)


def videos(b: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 4, 3, 32, 32), generator=g, dtype=torch.uint8)


def write_json(path: Path, data) -> str:
    path.write_text(json.dumps(data, indent=1))
    return str(path)


# -- readers ---------------------------------------------------------------------------------------
def test_instruct_reader_reads_the_three_layouts(tmp_path):
    items = [
        {"video": "a.mp4", "QA": [{"i": "you are helpful", "q": "describe it", "a": "a red ball"},
                                  {"q": "hi", "a": "hello"}]},
        {"id": "x", "video": "b.mp4", "conversations": [{"from": "human", "value": "<video>\ndescribe it"},
                                                        {"from": "gpt", "value": "a ball"}]},
        {"video": "/abs/c.mp4", "messages": [{"role": "system", "content": "you are helpful"},
                                             {"role": "user", "content": "hi <Video><ImageHere></Video> there"},
                                             {"role": "assistant", "content": "hello"}]},
    ]
    ix = build_index("video_instruct", path=write_json(tmp_path / "inst.json", items))
    assert [e.path for e in ix.entries] == [str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4"), "/abs/c.mp4"]
    a, b, c = (e.meta["conversation"] for e in ix.entries)
    assert a == [{"role": "user", "content": f"{PLACEHOLDER}\nyou are helpful\ndescribe it"},
                 {"role": "assistant", "content": "a red ball"},
                 {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert b[0]["content"] == f"{PLACEHOLDER}\ndescribe it" and ix.entries[1].key == "x"
    assert [m["role"] for m in c] == ["system", "user", "assistant"] and c[1]["content"] == f"hi {PLACEHOLDER} there"


@pytest.mark.parametrize("item, reason", [
    ({"QA": [{"q": "hi", "a": "x"}]}, "missing 'video'"),
    ({"video": "a.mp4", "QA": [{"q": "hi", "a": ""}]}, r"QA\[0\].a: expected a non-empty string"),
    ({"video": "a.mp4", "conversations": [{"from": "bot", "value": "x"}]}, "unknown from 'bot'"),
    ({"video": "a.mp4", "conversations": [{"from": "human", "value": "x"}]}, "must end with an assistant turn"),
    ({"video": "a.mp4", "conversations": [{"from": "human", "value": "<video> <video>"},
                                          {"from": "gpt", "value": "x"}]}, "2 <ImageHere> placeholder"),
    ({"video": "a.mp4", "captions": ["x"]}, "expected 'QA', 'conversations' or 'messages'"),
])  # fmt: skip
def test_instruct_reader_names_file_line_and_reason(tmp_path, item, reason):
    path = write_json(tmp_path / "bad.json", [{"video": "ok.mp4", "QA": [{"q": "hi", "a": "x"}]}, item])
    with pytest.raises(FormatError, match=rf"bad.json:\d+: item 1: .*{reason}"):
        build_index("video_instruct", path=path)


def test_videoqa_readers_group_questions_by_video(tmp_path):
    rows = [{"question": "what is it ?", "answer": "ball", "video_id": 7, "id": 0, "category_id": 2},
            {"question": "what color ?", "answer": "red", "video_id": 7, "id": 1},
            {"question": "who ?", "answer": "man", "video_id": 9, "id": 2}]
    ix = build_index("msrvtt_qa", path=write_json(tmp_path / "test_qa.json", rows), video_root="/v")
    assert [(e.path, e.key, len(e.meta["qa"])) for e in ix.entries] == [("/v/video7.mp4", "video7", 2),
                                                                        ("/v/video9.mp4", "video9", 1)]
    assert ix.entries[0].meta["qa"][0] == {"id": "0", "question": "what is it ?", "answer": "ball", "type": "2"}
    conv = ix.entries[0].meta["conversation"]
    assert [m["role"] for m in conv] == ["user", "assistant"] * 2 and conv[0]["content"].startswith(PLACEHOLDER)
    (tmp_path / "youtube_mapping.txt").write_text("-4wsuPCjDBc_5_15 vid1\nabc_1_2 vid2\n")
    msvd = [{"question": "who ?", "answer": "man", "video_id": 2, "id": 5}]
    ix = build_index("msvd_qa", path=write_json(tmp_path / "msvd.json", msvd), video_root="/m")
    assert ix.entries[0].path == "/m/abc_1_2.avi"
    with pytest.raises(FormatError, match=r"msvd.json:\d+: item 0: video_id 3 is not in"):
        build_index("msvd_qa", path=write_json(tmp_path / "msvd.json", [{**msvd[0], "video_id": 3}]), video_root="/m")


def test_multiple_choice_answers_by_text_index_or_letter(tmp_path):
    cands = ["left", "right", "up"]
    rows = [{"video": "a.mp4", "question": "q1", "candidates": cands, "answer": "up"},
            {"video": "a.mp4", "question": "q2", "options": cands, "answer": 1},
            {"video": "b.mp4", "question": "q3", "choices": cands, "answer": "(A)"}]
    ix = build_index("video_qa", path=write_json(tmp_path / "mc.json", rows))
    got = [(q["answer_index"], q["answer"]) for e in ix.entries for q in e.meta["qa"]]
    assert got == [(2, "up"), (1, "right"), (0, "left")]
    with pytest.raises(FormatError, match=r"mc.json:\d+: item 0: answer 'down' is none of the candidates"):
        build_index("video_qa", path=write_json(tmp_path / "mc.json", [{**rows[0], "answer": "down"}]))


def test_answer_normalisation_and_metrics():
    assert normalize_answer("The Counter-Clockwise!") == "counterclockwise"
    assert normalize_answer("  an  Apple.") == "apple" and normalize_answer("Two dogs") == "2 dogs"
    preds = [{"correct": True, "type": "color"}, {"correct": False, "type": "shape"},
             {"correct": True, "choices": ["a", "b"], "type": "color"}]
    m = qa_metrics(preds)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["open_accuracy"] == 0.5 and m["mc_accuracy"] == 1.0
    assert m["accuracy_by_type"] == {"color": 1.0, "shape": 0.0}


# -- chat template and loss mask -------------------------------------------------------------------
def test_tokenizer_chat_template_masks_all_but_assistant_turns(chatml_dir):
    enc = encoder(chatml_dir, system="you are helpful").eval()
    tok = enc.tokenizer
    assert tok.chat_template == CHATML
    messages = [{"role": "system", "content": "you are helpful"},
                {"role": "user", "content": f"{PLACEHOLDER}\ndescribe it"},
                {"role": "assistant", "content": "a red ball"},
                {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]  # fmt: skip
    media = torch.randn(4, 32)
    embeds, labels = enc.build_conversation(messages, [media])
    (ids0, t0), (ids1, t1) = conversation_pieces(tok, messages, 1)
    # the media tokens sit exactly where the placeholder was
    torch.testing.assert_close(embeds[len(ids0) : len(ids0) + 4], media)
    assert labels[len(ids0) : len(ids0) + 4].eq(-100).all()
    targets = [i for i in labels.tolist() if i != -100]
    assert tok.decode(targets) == "a red ball <|im_end|> hello there <|im_end|>"  # answers + their end markers
    assert not any(t0)  # system + first user turn: no loss
    # the generation prompt is exactly the training text up to the first answer
    gen = conversation_pieces(tok, [*messages[:2]], 1, add_generation_prompt=True)
    assert gen[0][0] == ids0 and ids1[: len(gen[1][0])] == gen[1][0]
    assert tok.convert_ids_to_tokens(gen[1][0][-2:]) == ["<|im_start|>", "assistant"]


def test_fallback_template_for_tokenizers_without_one(llm_dir):
    enc = encoder(llm_dir).eval()
    assert enc.tokenizer.chat_template is None
    _, labels = enc.question_sequence(torch.randn(4, 32), "what color is the big shape ?", "red")
    assert enc.tokenizer.convert_ids_to_tokens([i for i in labels.tolist() if i != -100]) == ["red", "</s>"]
    pieces = conversation_pieces(enc.tokenizer, [{"role": "user", "content": f"{PLACEHOLDER} hi"}], 1,
                                 add_generation_prompt=True)
    assert enc.tokenizer.decode(pieces[0][0] + pieces[1][0]) == "<s> ### Human : hi ### Assistant :"
    assert "###Assistant" in FALLBACK_CHAT_TEMPLATE


def test_template_that_rewrites_earlier_turns_is_refused(llm_dir):
    rewriting = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}X{% endif %}"
    enc = encoder(llm_dir, chat_template=rewriting)
    with pytest.raises(ValueError, match="not render a conversation as a prefix"):
        enc.question_sequence(torch.randn(4, 32), "hi", "hello")


# -- LoRA ------------------------------------------------------------------------------------------
def test_lora_trains_adapters_only_and_saves_loads_merges(llm_dir, tmp_path):
    enc = encoder(llm_dir)
    plain = enc.size_report()
    enc.add_lora(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    rep = enc.size_report()
    # q_proj, v_proj: 32 -> 32 in each of 2 layers; A [4, 32] + B [32, 4] each
    assert rep["lora"] == 2 * 2 * (4 * 32 + 32 * 4) == rep["trainable"] - plain["trainable"]
    trainable_llm = {n for n, p in enc.llm.named_parameters() if p.requires_grad}
    assert trainable_llm and all("lora_" in n for n in trainable_llm)
    opt = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad], lr=1e-2)
    media = enc.media_tokens(videos(2))
    conv = [[{"role": "user", "content": f"{PLACEHOLDER}\nhi"}, {"role": "assistant", "content": "hello"}]] * 2
    base_before = {n: p.clone() for n, p in enc.llm.named_parameters() if not p.requires_grad}
    for _ in range(3):
        loss = enc.conversation_loss(enc.media_tokens(videos(2)), conv)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(p, base_before[n]) for n, p in enc.llm.named_parameters() if not p.requires_grad)
    enc.eval()
    with torch.no_grad():
        media = enc.media_tokens(videos(2))
        ref = enc.choice_scores(media[0], "hi", ["hello", "red ball", "there"])
    enc.save_adapter(str(tmp_path / "adapter"))
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["README.md", "adapter_config.json",
                                                                          "adapter_model.safetensors"]
    other = encoder(llm_dir)
    other.load_state_dict({k: v for k, v in enc.state_dict().items() if "llm." not in k}, strict=False)
    other.load_adapter(str(tmp_path / "adapter"))
    other.eval()
    torch.testing.assert_close(other.choice_scores(media[0], "hi", ["hello", "red ball", "there"]), ref)
    other.merge_lora()
    assert not other.has_lora and not any("lora_" in n for n, _ in other.llm.named_parameters())
    torch.testing.assert_close(other.choice_scores(media[0], "hi", ["hello", "red ball", "there"]), ref,
                               rtol=1e-4, atol=1e-4)


def test_lora_target_that_matches_nothing_names_the_layers(llm_dir):
    with pytest.raises(ValueError, match="match no layer.*q_proj"):
        encoder(llm_dir).add_lora(target_modules=["query_key_value"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the gpu test loads 8-bit")
def test_kbit_loading_without_cuda_is_a_clear_error(llm_dir):
    with pytest.raises(RuntimeError, match="8-bit loading of the LLM .* needs a CUDA GPU"):
        encoder(llm_dir, bits=8)


@pytest.mark.gpu
def test_8bit_llm_with_lora_trains_on_cuda(llm_dir):
    pytest.importorskip("bitsandbytes")
    enc = encoder(llm_dir, bits=8)
    enc.add_lora(r=4, target_modules=["q_proj", "v_proj"])
    enc.visual.cuda()
    enc.video_proj.cuda()
    assert enc.llm.is_loaded_in_8bit
    conv = [[{"role": "user", "content": f"{PLACEHOLDER}\nhi"}, {"role": "assistant", "content": "hello"}]]
    loss = enc.conversation_loss(enc.media_tokens(videos(1).cuda()), conv)
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None for n, p in enc.llm.named_parameters() if "lora_" in n)


# -- the task: stage 1 -> stage 2, checkpoints -----------------------------------------------------
def _trainer(tmp_path, steps: int):
    import pytorch_lightning as pl

    return pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)


def _instruction_batch() -> dict:
    conv = [{"role": "user", "content": f"{PLACEHOLDER}\nwhat color is the big shape ?"},
            {"role": "assistant", "content": "red"}]
    return {"video": videos(2), "captions": [], "caption_index": torch.zeros(0, dtype=torch.long),
            "key": ["a", "b"], "meta": [{"conversation": conv}, {"conversation": conv}]}


def test_stage2_starts_from_stage1_and_checkpoints_keep_only_adapters(llm_dir, tmp_path, capsys):
    torch.manual_seed(0)
    stage1 = ChatEncoderTask(model=VISUAL, llm=llm_dir, optim={"lr": 1e-3, "warmup_steps": 0, "warmup_ratio": None})
    cap = {"video": videos(2), "captions": ["a red ball", "the ball"], "caption_index": torch.tensor([0, 1])}
    trainer = _trainer(tmp_path, 2)
    trainer.fit(stage1, torch.utils.data.DataLoader([cap] * 2, batch_size=None))
    trainer.save_checkpoint(tmp_path / "stage1.ckpt")

    torch.manual_seed(1)
    stage2 = ChatEncoderTask(model=VISUAL, llm=llm_dir, chat={"style": "chat"}, init_from=str(tmp_path / "stage1.ckpt"),
                             lora={"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]},
                             optim={"lr": 0.0, "warmup_steps": 0, "warmup_ratio": None})  # fmt: skip
    assert not torch.equal(stage2.encoder.video_proj.weight, stage1.encoder.video_proj.weight)
    trainer = _trainer(tmp_path, 1)
    trainer.fit(stage2, torch.utils.data.DataLoader([_instruction_batch()], batch_size=None))
    out = capsys.readouterr().out
    assert "stage 2 starts from" in out and "trainable" in out and "AdamW state" in out
    torch.testing.assert_close(stage2.encoder.video_proj.weight, stage1.encoder.video_proj.weight)  # lr 0
    with torch.no_grad():  # give the adapters non-zero B so that the round trip is checked
        for n, p in stage2.encoder.llm.named_parameters():
            if "lora_B" in n:
                p.normal_()
    trainer.save_checkpoint(tmp_path / "stage2.ckpt")
    state = torch.load(tmp_path / "stage2.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    llm_keys = [k for k in state if k.startswith("encoder.llm.")]
    assert llm_keys and all("lora_" in k for k in llm_keys)  # the adapters, never the frozen LLM
    loaded = ChatEncoderTask.load_from_checkpoint(tmp_path / "stage2.ckpt")
    assert loaded.encoder.has_lora and loaded.encoder.prompt_style == "chat"
    for k, v in stage2.encoder.llm.state_dict().items():
        torch.testing.assert_close(loaded.encoder.llm.state_dict()[k], v)


def test_init_from_a_retrieval_checkpoint_is_refused(llm_dir, tmp_path):
    from vidlang.errors import CheckpointError

    torch.save({"state_dict": {"model.x": torch.zeros(1)}, "hyper_parameters": {}}, tmp_path / "r.ckpt")
    task = ChatEncoderTask(model=VISUAL, llm=llm_dir, init_from=str(tmp_path / "r.ckpt"))
    with pytest.raises(CheckpointError, match="r.ckpt"):
        task.setup("fit")


# -- end to end on the synthetic corpus ------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from vidlang.data.synthetic import generate_corpus

    root = tmp_path_factory.mktemp("corpus")
    generate_corpus(root, 90, seed=0, size=32, frames=8, workers=1, progress=False)
    return root


def _decoded(path: Path, fmt: str, root: Path) -> list:
    from vidlang.data.datasets import VideoTextDataset
    from vidlang.data.sampling import build_sampler
    from vidlang.data.transforms import ClipTransform

    ix = build_index(fmt, path=str(path), video_root=str(root))
    ds = VideoTextDataset(ix.entries, build_sampler("segment", num_frames=4), ClipTransform(32, "eval"))
    return [ds[i] for i in range(len(ds))]


def _evaluate(task, samples) -> dict:
    from vidlang.data.collate import collate_samples

    task.eval()
    rows = []
    for i in range(0, len(samples), 16):
        rows += task.answer_questions(collate_samples(samples[i : i + 16]))
    task.train()
    return qa_metrics(rows)


def _tune(task, train: list, steps: int, lr: float = 3e-3) -> list[float]:
    from vidlang.data.collate import collate_samples

    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(0)
    losses = []
    task.train()
    for _ in range(steps):
        batch = collate_samples([train[i] for i in torch.randint(len(train), (16,), generator=g).tolist()])
        loss = task.conversation_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _stage2_task(llm: str) -> ChatEncoderTask:
    torch.manual_seed(0)
    return ChatEncoderTask(model=VISUAL, llm=llm, chat={"style": "chat"},
                           lora={"enabled": True, "r": 8, "dropout": 0.0, "target_modules": "all-linear"})


def test_instruction_tuning_lifts_videoqa_accuracy_far_above_chance(llm_dir, corpus, tmp_path, capsys):
    """Colour questions: held-out open-ended accuracy from ~0 to well above chance (1/8) in 250 steps; then
    ``vidlang test`` style evaluation writes the predictions, and ``vidlang chat`` answers from the checkpoint."""
    import pytorch_lightning as pl

    from vidlang.data.datamodule import VideoDataModule

    sets = write_instruction_sets(corpus, attributes=["color"], out_dir=tmp_path)
    train = _decoded(sets["instruct_train"], "video_instruct", corpus)
    held_out = _decoded(sets["qa_val"], "video_qa", corpus) + _decoded(sets["qa_test"], "video_qa", corpus)
    task = _stage2_task(llm_dir)
    before = _evaluate(task, held_out)
    losses = _tune(task, train, 250)
    after = _evaluate(task, held_out)
    chance = chance_accuracy(["color"])
    with capsys.disabled():
        print(f"\ncolour QA, held-out: before {before['accuracy']:.3f}, after {after['accuracy']:.3f}, "
              f"chance {chance:.3f}")
    assert before["accuracy"] <= 2 * chance
    assert after["accuracy"] >= 3 * chance, (before, after, losses[::25])
    assert sum(losses[-25:]) < 0.5 * sum(losses[:25])

    # evaluation through the Lightning test loop, as `vidlang test` runs it: metrics + predictions written
    dm = VideoDataModule(test={"format": "video_qa", "path": str(sets["mc_test"]), "video_root": str(corpus)},
                         sampling={"num_frames": 4}, transform={"image_size": 32}, loader={"batch_size": 8})
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False,
                         default_root_dir=tmp_path / "run")
    trainer.test(task, datamodule=dm)
    metrics = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    preds = [json.loads(line) for line in (tmp_path / "run" / "test_predictions.jsonl").read_text().splitlines()]
    questions = json.loads(Path(sets["mc_test"]).read_text())
    assert metrics["num_questions"] == len(preds) == len(questions) and metrics["mc_questions"] == len(preds)
    assert metrics["mc_accuracy"] == pytest.approx(sum(p["correct"] for p in preds) / len(preds))
    assert all(p["prediction"] in p["choices"] and len(p["scores"]) == 4 for p in preds)
    assert metrics["mc_accuracy"] >= 0.5  # chance 1/4
    with capsys.disabled():
        print(f"colour multiple choice (4 candidates), test split: {metrics['mc_accuracy']:.3f}")

    # vidlang chat from the checkpoint: streams the same answer the model gives in-process
    from vidlang.commands.chat import ChatCommand
    from vidlang.serve.inference import load_bundle

    ckpt = tmp_path / "stage2.ckpt"
    trainer.save_checkpoint(ckpt)
    video = str(corpus / questions[0]["video"])
    bundle = load_bundle(ckpt, kinds=("chat",))
    expected = bundle.answer(video, QUESTIONS["color"], max_new_tokens=4)
    bundle.chat.merge_lora()
    assert bundle.answer(video, QUESTIONS["color"], max_new_tokens=4) == expected  # merged: same answer
    import argparse

    parser = argparse.ArgumentParser()
    ChatCommand().add_arguments(parser)
    capsys.readouterr()
    assert ChatCommand().run(parser.parse_args(["--ckpt", str(ckpt), "--video", video, "--max-new-tokens", "4",
                                                *QUESTIONS["color"].split()])) == 0
    assert capsys.readouterr().out.strip() == expected and expected in VALUES["color"]


@pytest.mark.slow
def test_instruction_tuning_on_colour_shape_and_motion(llm_dir, corpus, tmp_path):
    """The longer run: three attributes, 1000 steps; held-out and training accuracy well above chance."""
    sets = write_instruction_sets(corpus, out_dir=tmp_path)
    train = _decoded(sets["instruct_train"], "video_instruct", corpus)
    seen = _decoded(sets["qa_train"], "video_qa", corpus)
    held_out = _decoded(sets["qa_val"], "video_qa", corpus) + _decoded(sets["qa_test"], "video_qa", corpus)
    task = _stage2_task(llm_dir)
    before = _evaluate(task, held_out)
    _tune(task, train, 1000)
    after, after_seen = _evaluate(task, held_out), _evaluate(task, seen)
    chance = chance_accuracy()
    print(f"colour/shape/motion QA: held-out before {before['accuracy']:.3f} after {after['accuracy']:.3f}, "
          f"training videos {after_seen['accuracy']:.3f}, chance {chance:.3f}; {after['accuracy_by_type']}")
    assert after["accuracy"] >= 1.6 * chance and after_seen["accuracy"] >= 3 * chance
