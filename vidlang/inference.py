"""Load a trained checkpoint into an :class:`InferenceBundle`: model + tokenizer + preprocessing.

Two checkpoint kinds are recognised from their state-dict keys (:data:`CHECKPOINT_KINDS`):

* ``retrieval`` -- a :class:`~vidlang.tasks.retrieval.RetrievalTask` checkpoint (``model.*`` keys, the
  tokenizer embedded under ``vidlang_tokenizer``): video and text embeddings. A task trained with audio
  (hyper-parameter ``audio``) loads as an audio-visual model: each video's audio track is decoded and fused
  (clips without audio take the masked, video-only path).
* ``chat`` -- a :class:`~vidlang.tasks.chat_encoder.ChatEncoderTask` checkpoint (``encoder.*`` keys): video
  embeddings / query tokens and, with its causal LM directory, chat answers. It has no CLIP tokenizer,
  so :meth:`InferenceBundle.embed_texts` is unavailable.

Checkpoints are read with ``torch.load(weights_only=True)`` (no arbitrary pickles). The model config's
``pretrained`` source is ignored: every weight comes from the checkpoint.

Preprocessing of one video (the evaluation path of the data pipeline): decode (``open_video``), one clip
of ``num_frames`` frames from the ``segment`` sampler (centre of each segment), short-side resize + centre
crop to the tower's image size, normalise with the tower's mean/std. Embeddings are L2-normalised.
A video that cannot be decoded raises :class:`~vidlang.data.decoding.VideoDecodeError` naming it; nothing is
zero-filled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vidlang.registry import Registry

CHECKPOINT_KINDS: Registry[Callable[..., InferenceBundle]] = Registry("checkpoint kind")
VideoInput = str | os.PathLike | bytes


@dataclass
class VideoEmbedding:
    """Normalised embeddings ``[B, E]`` and, for query-token blocks, the tokens ``[B, Q, D]``."""

    embeds: Tensor
    tokens: Tensor | None


def file_fingerprint(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A Lightning checkpoint as a dict, loaded with ``weights_only=True``; clear errors for bad files."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: checkpoint not found")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors, truncated zip, ...
        raise ValueError(f"{p}: cannot read the checkpoint safely (weights_only=True): {err}") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{p}: not a Lightning checkpoint (no 'state_dict')")
    return ckpt


def checkpoint_kind(ckpt: dict[str, Any]) -> str:
    keys = ckpt["state_dict"].keys()
    if any(k.startswith("encoder.") for k in keys):
        return "chat"
    if any(k.startswith("model.") for k in keys):
        return "retrieval"
    raise ValueError("checkpoint holds neither a RetrievalTask ('model.*') nor a ChatEncoderTask ('encoder.*')")


class InferenceBundle:
    """A model in eval mode with its tokenizer and preprocessing; thread-safe (inference under a lock)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any | None,
        num_frames: int,
        device: str | torch.device = "cpu",
        fingerprint: str = "",
        backend: str = "auto",
        chat: Any | None = None,
        audio_frontend: Any | None = None,
        audio_model: Any | None = None,
    ) -> None:
        """``model``: a ``VideoTextModel``. ``audio_model``: an ``AudioVisualModel`` wrapping ``model`` (with
        ``audio_frontend``, a ``LogMelFrontend``): video embeddings then fuse each video's audio."""
        from vidlang.data.sampling import build_sampler
        from vidlang.data.transforms import ResizeCenterCrop

        self.device = torch.device(device)
        self.model = model.to(self.device).eval()  # VideoTextModel
        self.tokenizer = tokenizer
        self.num_frames = int(num_frames)
        self.image_size = int(model.image_tower.cfg.image_size)
        self.backend = backend
        self.sampler = build_sampler("segment", num_frames=self.num_frames)
        self.transform = ResizeCenterCrop(self.image_size)
        self.chat = chat.to(self.device).eval() if chat is not None else None  # ChatEncoder
        self.audio_frontend = audio_frontend
        self.audio_model = audio_model.to(self.device).eval() if audio_model is not None else None
        if self.audio_model is not None:
            if audio_frontend is None:
                raise ValueError("an audio-visual model needs its audio_frontend (LogMelFrontend)")
            self.audio_frontend = audio_frontend.to(self.device)
        self.lock = threading.Lock()  # one forward at a time through the shared model
        self.chat_lock = threading.Lock()
        self.fingerprint = hashlib.sha256(
            f"{fingerprint}|frames={self.num_frames}|size={self.image_size}|sampler=segment".encode()
        ).hexdigest()[:32]

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    # -- video -------------------------------------------------------------------------------------
    def decode_clip(self, source: VideoInput, name: str | None = None) -> Tensor:
        """One video -> eval clip ``uint8 [T, 3, S, S]``; :class:`VideoDecodeError` when it cannot be decoded."""
        from vidlang.data.decoding import VideoDecodeError, open_video
        from vidlang.data.sampling import sample_clip

        label = name or (str(source) if isinstance(source, (str, os.PathLike)) else f"<{len(source)} bytes>")
        src = bytes(source) if isinstance(source, (bytearray, memoryview)) else source
        try:
            with open_video(src, backend=self.backend) as reader:
                clip = sample_clip(reader, self.sampler, training=False)[0]  # [T, C, H, W]
        except VideoDecodeError:
            raise
        except (ValueError, RuntimeError, OSError) as err:  # a sampler/backend failure on odd input
            raise VideoDecodeError(label, self.backend, str(err)) from err
        return self.transform(clip)

    def decode_audio(self, source: VideoInput) -> Tensor | None:
        """The whole audio track (mono, at the frontend's sample rate, else 16 kHz) ``[S]``, ``None`` without audio."""
        from vidlang.data.decoding import open_video

        rate = int(getattr(self.audio_frontend, "sample_rate", 16000))
        src = bytes(source) if isinstance(source, (bytearray, memoryview)) else source
        with open_video(src, backend="pyav") as reader:
            return reader.get_audio(rate) if reader.metadata.has_audio else None

    def _decode(self, source: VideoInput, name: str | None = None) -> tuple[Tensor, Tensor | None]:
        """Clip ``uint8 [T, 3, S, S]`` and, for an audio-visual model, the audio track (else None)."""
        clip = self.decode_clip(source, name)
        return clip, (self.decode_audio(source) if self.audio_model is not None else None)

    def normalize(self, clips: Tensor) -> Tensor:
        from vidlang.data.transforms import normalize

        return normalize(clips.to(self.device), self.model.image_mean, self.model.image_std)

    @torch.inference_mode()
    def encode_clips(self, clips: Tensor, audio: Sequence[Tensor | None] | None = None) -> VideoEmbedding:
        """``uint8 [B, T, 3, S, S]`` (+ per clip a waveform ``[S]`` or None, for an audio-visual model) ->
        normalised embeddings ``[B, E]`` (+ tokens ``[B, Q, D]``). Without ``audio`` every clip is
        treated as having no audio track."""
        with self.lock:
            if self.audio_model is not None:
                mel, mask = self.audio_frontend(list(audio) if audio is not None else [None] * clips.shape[0])
                out = self.audio_model.encode_video(self.normalize(clips), mel, mask)
            else:
                out = self.model.encode_video(self.normalize(clips))
        tokens = out.tokens.float().cpu() if out.tokens is not None else None
        return VideoEmbedding(F.normalize(out.embeds.float(), dim=-1).cpu(), tokens)

    def embed_video(self, source: VideoInput, name: str | None = None) -> VideoEmbedding:
        """One video (path or bytes) -> :class:`VideoEmbedding` with B = 1."""
        clip, audio = self._decode(source, name)
        return self.encode_clips(clip[None], [audio])

    def iter_embed(
        self, sources: Sequence[VideoInput], batch_size: int = 8
    ) -> Iterator[tuple[list[int], Tensor | None, list[tuple[int, Exception]]]]:
        """Batches of ``(indices, embeds [b, E] or None, [(index, error)])``; decode errors are collected."""
        for start in range(0, len(sources), batch_size):
            clips, audio, ok, bad = [], [], [], []
            for i in range(start, min(start + batch_size, len(sources))):
                try:
                    clip, wave = self._decode(sources[i])
                    clips.append(clip)
                    audio.append(wave)
                    ok.append(i)
                except Exception as err:  # VideoDecodeError and friends, reported by the caller
                    bad.append((i, err))
            yield ok, (self.encode_clips(torch.stack(clips), audio).embeds if clips else None), bad

    def embed_videos(self, sources: Sequence[VideoInput], batch_size: int = 8) -> Tensor:
        """Videos (paths or bytes) -> normalised embeddings ``[N, E]``; the first bad video raises."""
        rows: list[Tensor] = []
        for _, embeds, bad in self.iter_embed(sources, batch_size):
            if bad:
                raise bad[0][1]
            rows.append(embeds)
        return torch.cat(rows) if rows else torch.empty(0, self.embed_dim)

    def warmup(self) -> None:
        """Import the decoder and run one forward of each tower (first requests are then not slower)."""
        from vidlang.data.decoding import resolve_backend

        resolve_backend(self.backend)
        clip = torch.full((1, self.num_frames, 3, self.image_size, self.image_size), 128, dtype=torch.uint8)
        self.encode_clips(clip)
        if self.tokenizer is not None:
            self.embed_texts(["warm up"])

    # -- text --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        """Captions -> normalised embeddings ``[A, E]``."""
        if self.tokenizer is None:
            raise RuntimeError("this checkpoint has no text tokenizer (a chat-encoder checkpoint): no text embeddings")
        if isinstance(texts, str):
            texts = [texts]
        ids, mask = self.tokenizer(list(texts), self.model.text_tower.cfg.context_length)
        with self.lock:
            out = self.model.encode_text(ids.to(self.device), mask.to(self.device))
        return F.normalize(out.embeds.float(), dim=-1).cpu()

    # -- chat --------------------------------------------------------------------------------------
    def answer(self, source: VideoInput, question: str, max_new_tokens: int = 64, stream: bool = False) -> Any:
        """Video + question -> answer text (or an iterator of text pieces). Needs a loaded chat encoder."""
        if self.chat is None:
            raise RuntimeError("no chat model loaded (start with --llm)")
        clip = self.normalize(self.decode_clip(source)[None])  # [1, T, 3, S, S]
        mel = mask = None
        if getattr(self.chat, "audio", None) is not None and self.audio_frontend is not None:
            mel, mask = self.audio_frontend([self.decode_audio(source)])
        # The visual model is shared with embed_video: hold its lock. With stream=True only the media tokens
        # are computed inside answer() (generation runs while the caller iterates, outside this lock).
        with self.lock:
            return self.chat.answer(clip, question, max_new_tokens=max_new_tokens, stream=stream,
                                    audio_mel=mel, audio_mask=mask)


# -- loading ---------------------------------------------------------------------------------------
def _model_config(hparams: dict[str, Any]) -> Any:
    from vidlang.models.factory import ModelConfig

    model = hparams.get("model")
    if not isinstance(model, dict):
        raise ValueError("checkpoint hyper-parameters have no model config ('model')")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{**{k: v for k, v in model.items() if k in fields}, "pretrained": None})


@CHECKPOINT_KINDS.register("retrieval")
def load_retrieval(ckpt: dict[str, Any], path: str, device: str, **_: Any) -> InferenceBundle:
    from vidlang.models.factory import build_model
    from vidlang.tasks.common import TOKENIZER_KEY, tokenizer_from_state

    hp = ckpt.get("hyper_parameters", {})
    cfg = _model_config(hp)
    model = build_model(cfg)
    full, frontend = _audio_visual(model, hp)
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    missing, unexpected = (full or model).load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the model config: missing {missing[:6]}, "
                         f"unexpected {unexpected[:6]}")
    tok = tokenizer_from_state(ckpt[TOKENIZER_KEY]) if TOKENIZER_KEY in ckpt else None
    return InferenceBundle(model, tok, cfg.num_frames, device, file_fingerprint(path), audio_frontend=frontend,
                           audio_model=full)


def _audio_visual(model: Any, hparams: dict[str, Any]) -> tuple[Any | None, Any | None]:
    """For a RetrievalTask trained with audio: ``(AudioVisualModel around model, LogMelFrontend)``; else Nones."""
    audio = hparams.get("audio")
    if not audio:
        return None, None
    from vidlang.models.audio import AudioConfig, LogMelFrontend, build_audio_branch
    from vidlang.models.fusion import AudioVisualModel

    branch = build_audio_branch(AudioConfig(**audio))
    full = AudioVisualModel(model, branch, hparams.get("fusion", "gated_sum"), hparams.get("fusion_args"))
    return full, LogMelFrontend(**(hparams.get("audio_frontend") or {}))


@CHECKPOINT_KINDS.register("chat")
def load_chat(ckpt: dict[str, Any], path: str, device: str, llm: str | None = None, **_: Any) -> InferenceBundle:
    from vidlang.tasks.chat_encoder import ChatEncoderTask

    hp = ckpt.get("hyper_parameters", {})
    llm_dir = llm or hp.get("llm")
    if not llm_dir:
        raise ValueError(f"{path}: a chat-encoder checkpoint needs its causal LM directory (--llm)")
    cfg = _model_config(hp)
    task = ChatEncoderTask.load_from_checkpoint(path, map_location="cpu", weights_only=True, model=cfg, llm=llm_dir)
    enc = task.encoder
    return InferenceBundle(enc.visual, None, cfg.num_frames, device, file_fingerprint(path), chat=enc,
                           audio_frontend=task.frontend)


def attach_llm(bundle: InferenceBundle, llm_dir: str) -> None:
    """Give a retrieval bundle whose block yields query tokens a chat encoder around ``llm_dir``.

    The projection to the LLM width is freshly initialised (untrained): use a chat-encoder checkpoint for
    meaningful answers. Raises ``ValueError`` for a block without query tokens.
    """
    from vidlang.models.chat import ChatEncoder

    bundle.chat = ChatEncoder.from_pretrained_llm(bundle.model, llm_dir).to(bundle.device).eval()


def load_bundle(ckpt_path: str | os.PathLike, device: str = "cpu", llm: str | None = None,
                backend: str = "auto") -> InferenceBundle:
    """A checkpoint (retrieval or chat encoder, detected) -> :class:`InferenceBundle` on ``device``.

    ``llm``: the causal LM directory for a chat-encoder checkpoint (default: the path stored in it).
    """
    ckpt = read_checkpoint(ckpt_path)
    kind = checkpoint_kind(ckpt)
    bundle = CHECKPOINT_KINDS.get(kind)(ckpt, str(ckpt_path), str(device), llm=llm)
    bundle.backend = backend
    bundle.kind = kind
    return bundle
