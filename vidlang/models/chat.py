"""Video(+audio) -> LLM tokens, prompt assembly and generation (Video-LLaMA style chat encoder).

``ChatEncoder`` = a ``VideoTextModel`` whose temporal block outputs query tokens (the ``qformer`` block)
+ an optional ``AudioBranch`` + linear projections to the LLM hidden size + a frozen causal LM loaded
from a local directory (any ``transformers`` ``AutoModelForCausalLM``).

Prompts are text with ``<ImageHere>`` placeholders (``PLACEHOLDER``); each placeholder is replaced by
one clip's media tokens: its projected video query tokens ``[Qv, d_llm]`` followed, when the clip has
audio, by its projected audio query tokens ``[Qa, d_llm]`` (clips without audio contribute no audio
tokens). A prompt with k placeholders needs exactly k clips. Every sequence starts with the tokenizer's
BOS token (when it has one); text pieces are tokenized without special tokens.

Stage-1 captioning (``caption_loss``): ``BOS + media tokens + caption + EOS`` with the loss only on the
caption and EOS tokens (labels -100 elsewhere), sequences right-padded.
Generation (``answer``): the template (default ``DEFAULT_TEMPLATE``) with ``{question}`` filled in,
left-padded ``inputs_embeds`` through ``llm.generate``; ``stream=True`` yields text pieces from a
``TextIteratorStreamer`` fed by a background thread. The answer is cut at ``stop_text`` ("###").

Stage-2 instruction tuning (``conversation_loss``, ``prompt_style="chat"``): conversations rendered with the LLM
tokenizer's own chat template (:mod:`vidlang.models.chat_format`), the media tokens at the conversation's
placeholder, the loss on the assistant turns only; questions are then asked through the same template
(``answer``, ``answer_batch``) and multiple-choice candidates scored by their likelihood (``choice_scores``).
LoRA adapters on the LLM, 8/4-bit loading and size reports: :mod:`vidlang.models.chat_lora`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vidlang.models import chat_lora
from vidlang.models.audio.encoder import AudioBranch
from vidlang.models.chat_format import PLACEHOLDER, conversation_pieces, user_turn
from vidlang.models.optim import param_groups
from vidlang.models.video_clip import VideoTextModel

PROMPT_STYLES = ("template", "chat")
DEFAULT_TEMPLATE = "###Human: <Video><ImageHere></Video> {question} ###Assistant:"
CAPTION_TEMPLATE = PLACEHOLDER  # stage 1: BOS + query tokens + caption


def split_prompt(prompt: str, num_media: int) -> list[str]:
    """Split ``prompt`` at its ``<ImageHere>`` placeholders; their count must equal ``num_media``."""
    parts = prompt.split(PLACEHOLDER)
    if len(parts) - 1 != num_media:
        raise ValueError(
            f"prompt has {len(parts) - 1} {PLACEHOLDER} placeholder(s) but {num_media} video(s) were given: {prompt!r}"
        )
    return parts


def collection_media(num: int) -> str:
    """The prompt text standing for ``num`` retrieved clips: ``Clip 1: <ImageHere>`` ... one per line."""
    return "\n".join(f"Clip {i}: {PLACEHOLDER}" for i in range(1, num + 1))


def normalize_video(video: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 ``[..., 3, H, W]`` -> float normalised with the image mean/std; float input is returned as is."""
    if torch.is_floating_point(video):
        return video
    m = torch.tensor(mean, device=video.device).view(3, 1, 1)
    s = torch.tensor(std, device=video.device).view(3, 1, 1)
    return (video.float() / 255.0 - m) / s


def cut_at_stop(text: str, stop: str | None) -> str:
    return text.split(stop, 1)[0] if stop else text


def _stream_until_stop(pieces: Iterator[str], stop: str | None) -> Iterator[str]:
    """Yield text pieces until ``stop`` appears; a possible partial stop at the end is held back."""
    buffer = ""
    for piece in pieces:
        buffer += piece
        if stop and stop in buffer:
            head = buffer.split(stop, 1)[0]
            if head:
                yield head
            return
        keep = next((k for k in range(len(stop or ""), 0, -1) if buffer.endswith(stop[:k])), 0) if stop else 0
        if len(buffer) > keep:
            yield buffer[: len(buffer) - keep]
            buffer = buffer[len(buffer) - keep :]
    if buffer:
        yield buffer


class ChatEncoder(nn.Module):
    """Video Q-former (+ audio Q-former) -> ``Linear`` to ``d_llm`` -> a frozen causal LM.

    Trainable by default: the temporal block's Q-former (not its retrieval projection ``embed_proj``),
    the audio Q-former and segment embedding, and the projections; the image/text towers, the audio
    backbone and the LLM are frozen. Call ``.eval()`` before ``answer`` / ``embed`` at inference.
    """

    def __init__(
        self,
        visual: VideoTextModel,
        llm: nn.Module,
        tokenizer: Any,
        audio: AudioBranch | None = None,
        template: str = DEFAULT_TEMPLATE,
        caption_template: str = CAPTION_TEMPLATE,
        stop_text: str | None = "###",
        max_caption_tokens: int = 64,
        prompt_style: str = "template",
        system: str | None = None,
        chat_template: str | None = None,
        max_tokens: int = 1024,
    ) -> None:
        """``prompt_style``: ``template`` (stage 1: questions through ``template``) or ``chat`` (stage 2: the
        tokenizer's chat template, or ``chat_template``, with the ``system`` message). ``max_tokens``: longest
        training sequence (media included; longer ones are cut at the end)."""
        super().__init__()
        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {prompt_style!r}")
        block_dim = visual.block.token_dim
        if block_dim is None:
            raise ValueError(
                f"ChatEncoder needs a temporal block that outputs tokens (token_dim, e.g. 'qformer'), got "
                f"{type(visual.block).__name__}"
            )
        split_prompt(template.replace("{question}", ""), 1)
        split_prompt(caption_template, 1)
        self.visual, self.llm, self.tokenizer, self.audio = visual, llm, tokenizer, audio
        self.template, self.caption_template, self.stop_text = template, caption_template, stop_text
        self.max_caption_tokens = max_caption_tokens
        self.prompt_style, self.system, self.chat_template = prompt_style, system, chat_template
        self.max_tokens = int(max_tokens)
        self.d_llm = llm.get_input_embeddings().embedding_dim
        self.video_proj = nn.Linear(block_dim, self.d_llm)
        head = visual.block.llm_head  # e.g. Video-LLaMA's llama_proj from a converted checkpoint
        if head is not None:
            if head.out_features != self.d_llm:
                raise ValueError(f"the temporal block's LLM projection maps to width {head.out_features} but the LLM "
                                 f"has width {self.d_llm}: use the LLM it was trained with")  # fmt: skip
            self.video_proj.load_state_dict(head.state_dict())
        self.audio_proj = nn.Linear(audio.dim, self.d_llm) if audio is not None else None
        self._freeze()

    @classmethod
    def from_pretrained_llm(
        cls, visual: VideoTextModel, llm_dir: str, audio: AudioBranch | None = None, dtype: Any = None,
        bits: int | None = None, **kwargs: Any
    ) -> ChatEncoder:
        """Load the causal LM and its tokenizer from a local directory (never the network); ``bits`` 8 or 4 loads
        the LM quantised through ``bitsandbytes`` (CUDA only, :func:`vidlang.models.chat_lora.quantization_config`)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        quant = chat_lora.quantization_config(bits)
        extra: dict[str, Any] = {}
        if quant is not None:
            extra = {"quantization_config": quant, "device_map": {"": torch.cuda.current_device()}}
        try:
            tokenizer = AutoTokenizer.from_pretrained(llm_dir, local_files_only=True)
            llm = AutoModelForCausalLM.from_pretrained(llm_dir, local_files_only=True, dtype=dtype, **extra)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(
                f"cannot load a causal LM + tokenizer from local directory {llm_dir!r}: {err}"
            ) from err
        return cls(visual, llm, tokenizer, audio=audio, **kwargs)

    def _freeze(self) -> None:
        self.visual.requires_grad_(False)
        self.visual.block.requires_grad_(True)
        if self.visual.block.embed_head is not None:
            self.visual.block.embed_head.requires_grad_(False)  # retrieval head, unused by chat
        if self.visual.block.llm_head is not None:
            self.visual.block.llm_head.requires_grad_(False)  # copied into video_proj, which trains instead
        self.llm.requires_grad_(False)
        if self.audio is not None:
            self.audio.requires_grad_(True)
            self.audio.backbone.requires_grad_(False)
        self.llm.eval()

    def train(self, mode: bool = True) -> ChatEncoder:
        super().train(mode)
        self.llm.train(mode and self.has_lora)  # a frozen LLM never runs dropout; with LoRA the adapters do
        return self

    # -- LoRA ----------------------------------------------------------------------------------------
    @property
    def has_lora(self) -> bool:
        return chat_lora.is_lora(self.llm)

    def add_lora(self, r: int = 8, alpha: float = 16.0, dropout: float = 0.05,
                 target_modules: str | Sequence[str] = ("q_proj", "v_proj")) -> None:
        """Attach fresh LoRA adapters to the LLM (they train; its weights stay frozen)."""
        self.llm = chat_lora.add_lora(self.llm, r, alpha, dropout, target_modules)
        self.train(self.training)

    def load_adapter(self, adapter_dir: str, trainable: bool = True) -> None:
        """Attach the LoRA adapters saved in ``adapter_dir`` (:meth:`save_adapter`)."""
        self.llm = chat_lora.load_adapter(self.llm, adapter_dir, trainable)
        self.train(self.training)

    def save_adapter(self, out_dir: str) -> None:
        """Write the LoRA adapters alone (``adapter_config.json`` + ``adapter_model.safetensors``)."""
        chat_lora.save_adapter(self.llm, out_dir)

    def merge_lora(self) -> None:
        """Fold the adapters into the LLM's weights (serving); the LLM is a plain, frozen model again."""
        self.llm = chat_lora.merge_lora(self.llm).requires_grad_(False)
        self.train(self.training)

    def size_report(self) -> dict[str, Any]:
        """Parameter counts and memory (:func:`vidlang.models.chat_lora.size_report`) by part."""
        lora = [p for n, p in self.llm.named_parameters() if "lora_" in n]
        parts = {"visual": self.visual, "projections": nn.ModuleList([m for m in (self.video_proj, self.audio_proj)
                                                                       if m is not None]),
                 "audio": self.audio, "llm": self.llm}
        report = chat_lora.size_report(self, parts)
        report["lora"] = sum(p.numel() for p in lora)
        return report

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """Optimizer groups of the trainable parts (Q-former(s), projections) at ``lr`` / ``weight_decay`` with the
        usual no-decay exclusions (:func:`vidlang.models.optim.param_groups`; no per-module multipliers)."""
        return param_groups(self, lr, weight_decay)

    # -- media tokens --------------------------------------------------------------------------------
    def embed(self, video: Tensor) -> Tensor:
        """``video [B, T, 3, H, W]`` (uint8, or float already normalised) -> LLM tokens ``[B, Qv, d_llm]``."""
        video = normalize_video(video, self.visual.image_mean, self.visual.image_std)
        tokens = self.visual.encode_video(video).tokens  # [B, Qv, D]
        return self.video_proj(tokens)

    def media_tokens(
        self, video: Tensor, audio_mel: Tensor | None = None, audio_mask: Tensor | None = None
    ) -> list[Tensor]:
        """Per clip: video tokens, then audio tokens if the clip has audio -> B tensors ``[Q_b, d_llm]``."""
        tokens = self.embed(video)  # [B, Qv, d]
        if audio_mel is None:
            return list(tokens)
        if self.audio is None or self.audio_proj is None:
            raise ValueError("audio given but this ChatEncoder was built without an audio branch")
        out = self.audio(audio_mel, audio_mask)
        audio_tokens = self.audio_proj(out.tokens)  # [B, Qa, d]
        return [torch.cat([v, a]) if bool(m) else v for v, a, m in zip(tokens, audio_tokens, out.mask, strict=True)]

    # -- prompt assembly -----------------------------------------------------------------------------
    def _text_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _embed_ids(self, ids: list[int], device: torch.device) -> Tensor:
        table = self.llm.get_input_embeddings()
        return table(torch.tensor(ids, dtype=torch.long, device=device))  # [L, d]

    def build_sequence(
        self, prompt: str, media: Sequence[Tensor], target_ids: list[int] | None = None
    ) -> tuple[Tensor, Tensor]:
        """``prompt`` with ``len(media)`` placeholders (+ target ids) -> embeddings ``[L, d]``, labels ``[L]``."""
        parts = split_prompt(prompt, len(media))
        device = self.video_proj.weight.device
        dtype = self.llm.get_input_embeddings().weight.dtype
        bos = self.tokenizer.bos_token_id
        pieces: list[Tensor] = []
        for k, text in enumerate(parts):
            ids = ([bos] if k == 0 and bos is not None else []) + self._text_ids(text)
            if ids:
                pieces.append(self._embed_ids(ids, device))
            if k < len(media):
                pieces.append(media[k].to(dtype))
        n_context = sum(p.shape[0] for p in pieces)
        labels = [-100] * n_context
        if target_ids:
            pieces.append(self._embed_ids(target_ids, device))
            labels += target_ids
        return torch.cat(pieces), torch.tensor(labels, dtype=torch.long, device=device)

    def _assemble(self, pieces: Sequence[tuple[list[int], list[bool]]], media: Sequence[Tensor]
                  ) -> tuple[Tensor, Tensor]:
        """Text pieces ``(ids, is_target)`` with ``media[k]`` between pieces ``k`` and ``k+1`` -> embeddings
        ``[L, d]``, labels ``[L]`` (-100 off target; cut to ``max_tokens``)."""
        device = self.video_proj.weight.device
        dtype = self.llm.get_input_embeddings().weight.dtype
        chunks: list[Tensor] = []
        labels: list[int] = []
        for k, (ids, target) in enumerate(pieces):
            if ids:
                chunks.append(self._embed_ids(ids, device))
                labels += [i if t else -100 for i, t in zip(ids, target, strict=True)]
            if k < len(media):
                chunks.append(media[k].to(dtype))
                labels += [-100] * media[k].shape[0]
        embeds = torch.cat(chunks)[: self.max_tokens]
        return embeds, torch.tensor(labels[: self.max_tokens], dtype=torch.long, device=device)

    def build_conversation(self, messages: Sequence[dict[str, str]], media: Sequence[Tensor],
                           add_generation_prompt: bool = False) -> tuple[Tensor, Tensor]:
        """A conversation with ``len(media)`` placeholders, through the chat template -> embeddings ``[L, d]``,
        labels ``[L]`` on the assistant turns only (none with ``add_generation_prompt``)."""
        pieces = conversation_pieces(self.tokenizer, messages, len(media), self.chat_template, add_generation_prompt)
        return self._assemble(pieces, media)

    def question_sequence(self, media: Tensor, question: str, answer: str | None = None) -> tuple[Tensor, Tensor]:
        """One clip's media tokens + a question (+ the answer as the target) in this encoder's prompt style ->
        embeddings ``[L, d]``, labels ``[L]`` (on the answer and its end-of-turn marker only)."""
        if self.prompt_style == "chat":
            messages = user_turn(question, self.system)
            if answer is not None:
                messages.append({"role": "assistant", "content": answer})
            return self.build_conversation(messages, [media], add_generation_prompt=answer is None)
        prompt = self.template.replace("{question}", question)
        return self.build_sequence(prompt, [media], self.caption_ids(answer) if answer is not None else None)

    @staticmethod
    def pad_batch(seqs: Sequence[Tensor], labels: Sequence[Tensor], left: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Pad embeddings ``[L_i, d]`` -> ``inputs_embeds [B, L, d]``, ``attention_mask [B, L]``, ``labels [B, L]``."""
        length = max(s.shape[0] for s in seqs)
        b, d = len(seqs), seqs[0].shape[1]
        embeds = seqs[0].new_zeros(b, length, d)
        mask = torch.zeros(b, length, dtype=torch.long, device=seqs[0].device)
        lab = torch.full((b, length), -100, dtype=torch.long, device=seqs[0].device)
        for i, (s, y) in enumerate(zip(seqs, labels, strict=True)):
            sl = slice(length - s.shape[0], length) if left else slice(0, s.shape[0])
            embeds[i, sl], mask[i, sl], lab[i, sl] = s, 1, y
        return embeds, mask, lab

    def caption_ids(self, caption: str) -> list[int]:
        ids = self._text_ids(caption)[: self.max_caption_tokens]
        eos = self.tokenizer.eos_token_id
        return ids + ([eos] if eos is not None else [])

    # -- training ------------------------------------------------------------------------------------
    def caption_loss(self, media: Sequence[Tensor], captions: Sequence[str]) -> Tensor:
        """Stage-1 loss: ``BOS + media + caption + EOS``; cross-entropy on caption and EOS tokens only."""
        if len(media) != len(captions):
            raise ValueError(f"{len(media)} clips but {len(captions)} captions")
        built = [
            self.build_sequence(self.caption_template, [m], self.caption_ids(c))
            for m, c in zip(media, captions, strict=True)
        ]
        embeds, mask, labels = self.pad_batch([e for e, _ in built], [y for _, y in built], left=False)
        return self.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss

    def conversation_loss(self, media: Sequence[Tensor], conversations: Sequence[Sequence[dict[str, str]]]
                          ) -> Tensor:
        """Stage-2 loss: each conversation through the chat template with its clip's media tokens at the
        placeholder; cross-entropy on the assistant turns only."""
        if len(media) != len(conversations):
            raise ValueError(f"{len(media)} clips but {len(conversations)} conversations")
        built = [self.build_conversation(c, [m]) for m, c in zip(media, conversations, strict=True)]
        embeds, mask, labels = self.pad_batch([e for e, _ in built], [y for _, y in built], left=False)
        return self.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss

    def sequence_logprobs(self, seqs: Sequence[Tensor], labels: Sequence[Tensor]) -> Tensor:
        """Summed log-probability of each sequence's labelled tokens and their count -> ``[N, 2]``."""
        embeds, mask, lab = self.pad_batch(seqs, labels, left=False)
        logits = self.llm(inputs_embeds=embeds, attention_mask=mask).logits[:, :-1].float()  # [N, L-1, V]
        target = lab[:, 1:]
        valid = target.ne(-100)
        logp = logits.log_softmax(-1).gather(-1, target.clamp(min=0)[..., None])[..., 0]  # [N, L-1]
        return torch.stack([(logp * valid).sum(1), valid.sum(1).float()], dim=1)

    @torch.no_grad()
    def choice_scores(self, media: Tensor, question: str, choices: Sequence[str], reduce: str = "sum") -> Tensor:
        """Multiple choice by likelihood: the log-probability of each candidate answer (``sum`` over its tokens,
        or their ``mean``) after ``question`` about the clip whose media tokens are ``media [Q, d]`` -> ``[K]``."""
        if reduce not in ("sum", "mean"):
            raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
        built = [self.question_sequence(media, question, c) for c in choices]
        out = self.sequence_logprobs([e for e, _ in built], [y for _, y in built])
        return out[:, 0] if reduce == "sum" else out[:, 0] / out[:, 1].clamp(min=1)

    @torch.no_grad()
    def answer_batch(self, media: Sequence[Tensor], questions: Sequence[str], max_new_tokens: int = 16,
                     **generate_kwargs: Any) -> list[str]:
        """Greedy answers to ``questions[i]`` about the clip of ``media[i]`` (``[Q_i, d]``), in this encoder's
        prompt style."""
        built = [self.question_sequence(m, q) for m, q in zip(media, questions, strict=True)]
        embeds, mask, _ = self.pad_batch([e for e, _ in built], [y for _, y in built], left=True)
        ids = self.generate_ids(embeds, mask, max_new_tokens, **generate_kwargs)
        return [cut_at_stop(self.tokenizer.decode(row, skip_special_tokens=True), self.stop_text).strip()
                for row in ids]

    # -- generation ----------------------------------------------------------------------------------
    def prompt_inputs(self, prompts: Sequence[str], media: Sequence[Sequence[Tensor]]) -> tuple[Tensor, Tensor]:
        """Prompts with placeholders + their media -> left-padded ``inputs_embeds [B, L, d]``, ``attention_mask``."""
        built = [self.build_sequence(p, m) for p, m in zip(prompts, media, strict=True)]
        embeds, mask, _ = self.pad_batch([e for e, _ in built], [y for _, y in built], left=True)
        return embeds, mask

    def generate_ids(self, embeds: Tensor, mask: Tensor, max_new_tokens: int, **kwargs: Any) -> Tensor:
        """``llm.generate`` from embeddings -> new token ids ``[B, n]`` (greedy unless kwargs say otherwise)."""
        kwargs.setdefault("do_sample", False)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return self.llm.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad, **kwargs
        )

    def answer(
        self,
        video: Tensor,
        question: str,
        max_new_tokens: int = 64,
        stream: bool = False,
        audio_mel: Tensor | None = None,
        audio_mask: Tensor | None = None,
        **generate_kwargs: Any,
    ) -> str | Iterator[str]:
        """One clip ``[T, 3, H, W]`` or ``[1, T, 3, H, W]`` + a question -> the answer text (or, with
        ``stream=True``, an iterator of text pieces)."""
        video = video[None] if video.dim() == 4 else video
        if video.shape[0] != 1:
            raise ValueError(f"answer() takes one clip, got a batch of {video.shape[0]}")
        with torch.no_grad():
            media = self.media_tokens(video, audio_mel, audio_mask)
            seq, lab = self.question_sequence(media[0], question)
            embeds, mask, _ = self.pad_batch([seq], [lab], left=True)
        return self._answer_from(embeds, mask, max_new_tokens, stream, **generate_kwargs)

    def collection_sequence(self, media: Sequence[Tensor], question: str) -> tuple[Tensor, Tensor]:
        """Several clips' media tokens (``[Q_i, d]``, in rank order) + a question -> the generation prompt's
        embeddings ``[L, d]`` and labels ``[L]`` in this encoder's prompt style: the clips numbered one per line
        (:func:`collection_media`) where a single clip's placeholder would be."""
        if not media:
            raise ValueError("a collection question needs at least one clip")
        if PLACEHOLDER in question:
            raise ValueError(f"the question may not contain the placeholder {PLACEHOLDER}: {question!r}")
        clips = collection_media(len(media))
        if self.prompt_style == "chat":
            messages = user_turn(question, self.system)
            messages[-1]["content"] = messages[-1]["content"].replace(PLACEHOLDER, clips, 1)
            return self.build_conversation(messages, media, add_generation_prompt=True)
        prompt = self.template.replace(PLACEHOLDER, clips, 1).replace("{question}", question)
        return self.build_sequence(prompt, media)

    def answer_clips(
        self,
        video: Tensor,
        question: str,
        max_new_tokens: int = 64,
        stream: bool = False,
        audio_mel: Tensor | None = None,
        audio_mask: Tensor | None = None,
        **generate_kwargs: Any,
    ) -> str | Iterator[str]:
        """Clips ``[K, T, 3, H, W]`` (in rank order) + a question about them -> the answer (or, with ``stream``,
        an iterator of text pieces); every clip's media tokens go into one prompt (:meth:`collection_sequence`)."""
        if video.dim() != 5 or video.shape[0] < 1:
            raise ValueError(f"answer_clips() takes clips [K, T, 3, H, W], got {list(video.shape)}")
        with torch.no_grad():
            media = self.media_tokens(video, audio_mel, audio_mask)
            seq, lab = self.collection_sequence(media, question)
            embeds, mask, _ = self.pad_batch([seq], [lab], left=True)
        return self._answer_from(embeds, mask, max_new_tokens, stream, **generate_kwargs)

    def _answer_from(self, embeds: Tensor, mask: Tensor, max_new_tokens: int, stream: bool,
                     **generate_kwargs: Any) -> str | Iterator[str]:
        if stream:
            return self._stream(embeds, mask, max_new_tokens, **generate_kwargs)
        with torch.no_grad():
            ids = self.generate_ids(embeds, mask, max_new_tokens, **generate_kwargs)
        return cut_at_stop(self.tokenizer.decode(ids[0], skip_special_tokens=True), self.stop_text).strip()

    def _stream(self, embeds: Tensor, mask: Tensor, max_new_tokens: int, **kwargs: Any) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600.0)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with torch.no_grad():
                    self.generate_ids(embeds, mask, max_new_tokens, streamer=streamer, **kwargs)
            except BaseException as err:  # surfaced in the consumer's thread below
                errors.append(err)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        yield from _stream_until_stop(iter(streamer), self.stop_text)
        thread.join()
        if errors:
            raise RuntimeError(f"generation failed: {errors[0]}") from errors[0]
