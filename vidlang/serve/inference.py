"""Load a trained checkpoint into an :class:`InferenceBundle`: model + tokenizer + preprocessing.

The checkpoint kinds (:data:`CHECKPOINT_KINDS`; which task wrote a checkpoint: :func:`vidlang.checkpoints.
checkpoint_task`):

* ``retrieval`` -- a :class:`~vidlang.tasks.retrieval.RetrievalTask` checkpoint (``model.*`` keys, the
  tokenizer embedded under ``vidlang_tokenizer``): video and text embeddings. A task trained with audio
  (hyper-parameter ``audio``) loads as an audio-visual model: each video's audio track is decoded and fused
  (clips without audio take the masked, video-only path).
* ``recognition`` -- a :class:`~vidlang.tasks.recognition.RecognitionTask` checkpoint: embeddings as a retrieval
  one, and :meth:`InferenceBundle.classify_clips` with the trained classifier (class names, templates, head).
  :func:`load_classifier` (``vidlang classify``) also makes a zero-shot classifier of a retrieval checkpoint.
* ``chat`` -- a :class:`~vidlang.tasks.chat_encoder.ChatEncoderTask` checkpoint (``encoder.*`` keys): video
  embeddings / query tokens and, with its causal LM directory, chat answers. It has no CLIP tokenizer,
  so :meth:`InferenceBundle.embed_texts` is unavailable.

Checkpoints are read by the safe reader (:func:`vidlang.checkpoints.read_checkpoint`: ``torch.load(weights_only=
True)``, one-line errors for missing, unsafe, truncated or foreign files), once; the tasks are rebuilt from that
dict (:meth:`vidlang.tasks.base.VideoTask.from_checkpoint`), never by Lightning's ``load_from_checkpoint``. The
model config's ``pretrained`` source is ignored: every weight comes from the checkpoint.

Preprocessing of one video (the evaluation path of the data pipeline, the same for every command): decode
(``open_video``, resized to the tower's image size on the short side), one clip of the model's evaluation frame
count (``ModelConfig.inference_frames``) from the ``segment`` sampler (centre of each segment), centre crop,
normalise with the tower's mean/std. Embeddings are L2-normalised. A video that cannot be decoded raises
:class:`~vidlang.data.decoding.VideoDecodeError` naming it; nothing is zero-filled.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vidlang.checkpoints import check_weights, checkpoint_task, read_checkpoint, wrong_kind
from vidlang.data.decoding.base import DEFAULT_MAX_PIXELS
from vidlang.errors import CheckpointError, ConfigError
from vidlang.registry import Registry
from vidlang.serve.decoding import ClipDecoder

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
        classifier: Any | None = None,
    ) -> None:
        """``model``: a ``VideoTextModel``. ``audio_model``: an ``AudioVisualModel`` wrapping ``model`` (with
        ``audio_frontend``, a ``LogMelFrontend``): video embeddings then fuse each video's audio. ``classifier``: a
        ``RecognitionTask`` around ``model`` (:meth:`classify_clips`)."""
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()  # VideoTextModel
        self.tokenizer = tokenizer
        self.num_frames = int(num_frames)
        self.image_size = int(model.image_tower.cfg.image_size)
        self.backend = backend
        self.chat = chat.to(self.device).eval() if chat is not None else None  # ChatEncoder
        self.classifier = classifier.to(self.device).eval() if classifier is not None else None  # RecognitionTask
        self.audio_frontend = audio_frontend
        self.audio_model = audio_model.to(self.device).eval() if audio_model is not None else None
        if self.audio_model is not None:
            if audio_frontend is None:
                raise ValueError("an audio-visual model needs its audio_frontend (LogMelFrontend)")
            self.audio_frontend = audio_frontend.to(self.device)
        self.similarity = "cosine"  # the score the model was trained with (retrieval: contrastive.similarity)
        self.lock = threading.Lock()  # one forward at a time through the shared model
        self.chat_lock = threading.Lock()
        self.checkpoint_sha256 = fingerprint  # the checkpoint file's identity (vector indexes are checked against it)
        self.fingerprint = hashlib.sha256(
            f"{fingerprint}|frames={self.num_frames}|size={self.image_size}|sampler=segment|decode_resize".encode()
        ).hexdigest()[:32]

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    # -- video -------------------------------------------------------------------------------------
    @property
    def clip_decoder(self) -> ClipDecoder:
        """This model's preprocessing as a picklable :class:`~vidlang.serve.decoding.ClipDecoder`."""
        rate = int(getattr(self.audio_frontend, "sample_rate", 16000)) if self.audio_model is not None else None
        return ClipDecoder(self.backend, self.image_size, self.num_frames, rate)

    def decode_clip(self, source: VideoInput, name: str | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                    max_seconds: float | None = None) -> Tensor:
        """One video -> eval clip ``uint8 [T, 3, S, S]``; :class:`VideoDecodeError` when it cannot be decoded.

        Frames are resized to short side ``S`` while decoding (memory stays bounded whatever the file's size),
        then center-cropped. A stream larger than ``max_pixels`` (width x height) is refused before decoding,
        one longer than ``max_seconds`` with :class:`VideoTooLongError`."""
        return self.clip_decoder.decode_clip(source, name, max_pixels, max_seconds)

    def decode_audio(self, source: VideoInput, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Tensor | None:
        """The whole audio track (mono, at the frontend's sample rate, else 16 kHz) ``[S]``, ``None`` without audio."""
        rate = int(getattr(self.audio_frontend, "sample_rate", 16000))
        return self.clip_decoder.decode_audio(source, max_pixels, rate)

    def decode_video(self, source: VideoInput, name: str | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                     max_seconds: float | None = None) -> tuple[Tensor, Tensor | None]:
        """Clip ``uint8 [T, 3, S, S]`` and, for an audio-visual model, the audio track (else None); the limits
        as in :meth:`decode_clip`."""
        return self.clip_decoder.decode_video(source, name, max_pixels, max_seconds)

    _decode = decode_video

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

    @torch.inference_mode()
    def classify_clips(self, clips: Tensor, class_names: Sequence[str], class_embeds: Tensor | None = None) -> Tensor:
        """``uint8 [B, T, 3, S, S]`` (:meth:`decode_clip`) -> class probabilities ``[B, K]`` over ``class_names``
        (softmax) by the classifier (its head on its own label set, else the text tower; ``class_embeds [K, E]``:
        the text classifier computed once by ``classifier.class_embeddings``)."""
        if self.classifier is None:
            raise RuntimeError("no classifier loaded (load a recognition or retrieval checkpoint with load_classifier)")
        names = list(class_names)
        with self.lock:
            text = self.classifier.class_embeddings(names) if class_embeds is None else class_embeds  # [K, E]
            logits = self.classifier.view_logits(self.normalize(clips), names, text)  # [B, 1, K]
        return logits.float().softmax(dim=-1).mean(dim=1).cpu()

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
    def answer(self, source: VideoInput, question: str, max_new_tokens: int = 64, stream: bool = False,
               max_pixels: int | None = DEFAULT_MAX_PIXELS, max_seconds: float | None = None) -> Any:
        """Video + question -> answer text (or an iterator of text pieces). Needs a loaded chat encoder.
        The video limits as in :meth:`decode_clip`."""
        if self.chat is None:
            raise RuntimeError("no chat model loaded (start with --llm)")
        clip = self.normalize(self.decode_clip(source, None, max_pixels, max_seconds)[None])  # [1, T, 3, S, S]
        mel = mask = None
        if getattr(self.chat, "audio", None) is not None and self.audio_frontend is not None:
            mel, mask = self.audio_frontend([self.decode_audio(source, max_pixels)])
        # The visual model is shared with embed_video: hold its lock. With stream=True only the media tokens
        # are computed inside answer() (generation runs while the caller iterates, outside this lock).
        with self.lock:
            return self.chat.answer(clip, question, max_new_tokens=max_new_tokens, stream=stream,
                                    audio_mel=mel, audio_mask=mask)

    @property
    def chat_audio(self) -> bool:
        """Whether chat answers take each clip's audio track too (a chat encoder with an audio branch)."""
        return self.chat is not None and getattr(self.chat, "audio", None) is not None \
            and self.audio_frontend is not None

    def answer_clips(self, clips: Sequence[Tensor], question: str, audio: Sequence[Tensor | None] | None = None,
                     max_new_tokens: int = 64, stream: bool = False) -> Any:
        """Decoded clips (``uint8 [T, 3, S, S]`` each, :meth:`decode_clip`, in rank order) + a question about them
        -> the answer (or an iterator of text pieces): every clip's media tokens in one prompt
        (``ChatEncoder.answer_clips``). ``audio``: per clip a waveform or None (used when :attr:`chat_audio`)."""
        if self.chat is None:
            raise RuntimeError("no chat model loaded (start with --llm)")
        video = self.normalize(torch.stack(list(clips)))  # [K, T, 3, S, S]
        mel = mask = None
        if self.chat_audio and audio is not None:
            mel, mask = self.audio_frontend(list(audio))
        with self.lock:  # as answer(): only the media tokens are computed under the lock when streaming
            return self.chat.answer_clips(video, question, max_new_tokens=max_new_tokens, stream=stream,
                                          audio_mel=mel, audio_mask=mask)


# -- loading ---------------------------------------------------------------------------------------
def _model_config(hparams: dict[str, Any]) -> Any:
    from vidlang.models.factory import ModelConfig

    model = hparams.get("model")
    if not isinstance(model, dict):
        raise CheckpointError("the checkpoint's hyper-parameters have no model config ('model')")
    return ModelConfig.from_dict({**model, "pretrained": None}, strict=False)


def _config_of(hparams: dict[str, Any], path: str) -> Any:
    try:
        return _model_config(hparams)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None


@CHECKPOINT_KINDS.register("retrieval")
def load_retrieval(ckpt: dict[str, Any], path: str, device: str, **_: Any) -> InferenceBundle:
    from vidlang.models.clip.tokenizer import TOKENIZER_KEY, ClipTokenizer
    from vidlang.models.factory import build_model

    hp = ckpt.get("hyper_parameters", {})
    cfg = _config_of(hp, path)
    model = build_model(cfg)
    full, frontend = _audio_visual(model, hp)
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    check_weights(path, *(full or model).load_state_dict(state, strict=False))
    tok = ClipTokenizer.from_state(ckpt[TOKENIZER_KEY]) if TOKENIZER_KEY in ckpt else None
    bundle = InferenceBundle(model, tok, cfg.inference_frames, device, file_fingerprint(path),
                             audio_frontend=frontend, audio_model=full)
    bundle.similarity = str((hp.get("contrastive") or {}).get("similarity", "cosine"))
    if bundle.similarity != "cosine":
        warnings.warn(f"{path}: this model was trained and evaluated with contrastive.similarity="
                      f"{bundle.similarity!r}, but embeddings, search and serving rank by the cosine of the pooled "
                      "video and text embeddings: rankings differ from the model's own score, and its test metrics "
                      "do not describe them", stacklevel=2)
    elif (hp.get("contrastive") or {}).get("loss") == "symile":
        warnings.warn(f"{path}: this model was trained with contrastive.loss='symile', whose score is the raw dot "
                      "product of the caption with the video-side vector sqrt(E)*v*u; embeddings, search and serving "
                      "rank by the cosine of that vector, so rankings can differ from the model's own score and its "
                      "test metrics", stacklevel=2)
    return bundle


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
        raise ConfigError(f"{path}: a chat-encoder checkpoint needs its causal LM directory (--llm)")
    cfg = _config_of(hp, path)
    task = ChatEncoderTask.from_checkpoint(ckpt, source=path, model=cfg, llm=llm_dir)
    enc = task.encoder
    return InferenceBundle(enc.visual, None, cfg.inference_frames, device, file_fingerprint(path), chat=enc,
                           audio_frontend=task.frontend)


def attach_llm(bundle: InferenceBundle, llm_dir: str) -> None:
    """Give a retrieval bundle whose block yields query tokens a chat encoder around ``llm_dir``.

    The projection to the LLM width is freshly initialised (untrained): use a chat-encoder checkpoint for
    meaningful answers. Raises ``ValueError`` for a block without query tokens.
    """
    from vidlang.models.chat import ChatEncoder

    bundle.chat = ChatEncoder.from_pretrained_llm(bundle.model, llm_dir).to(bundle.device).eval()


def load_bundle(ckpt_path: str | os.PathLike, device: str = "cpu", llm: str | None = None,
                backend: str = "auto", kinds: Sequence[str] | None = None,
                command: str = "this command") -> InferenceBundle:
    """A checkpoint (retrieval or chat encoder, detected) -> :class:`InferenceBundle` on ``device``.

    ``llm``: the causal LM directory for a chat-encoder checkpoint (default: the path stored in it).
    ``kinds``: the kinds ``command`` accepts (default: every bundle kind); another kind raises
    :class:`CheckpointError` naming the file, its kind and what ``command`` needs.
    """
    ckpt = read_checkpoint(ckpt_path)
    kind = checkpoint_task(ckpt, ckpt_path)
    wanted = list(kinds) if kinds is not None else CHECKPOINT_KINDS.names()
    if kind not in wanted:
        raise wrong_kind(ckpt_path, kind, command, wanted)
    bundle = CHECKPOINT_KINDS.get(kind)(ckpt, str(ckpt_path), str(device), llm=llm)
    bundle.backend = backend
    bundle.kind = kind
    return bundle


def _classifier(ckpt: dict[str, Any], path: str, kind: str) -> tuple[Any, Any]:
    """A :class:`~vidlang.tasks.recognition.RecognitionTask` from a recognition checkpoint (as trained: class names,
    templates, head) or, zero-shot, from a retrieval one (its towers; no head, default templates), and its model
    config."""
    from vidlang.tasks.recognition import RecognitionTask

    cfg = _config_of(ckpt.get("hyper_parameters") or {}, path)
    if kind == "retrieval":  # only the towers: the retrieval task's other settings mean nothing here
        ckpt = {**ckpt, "hyper_parameters": {},
                "state_dict": {k: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}}
    return RecognitionTask.from_checkpoint(ckpt, source=path, model=cfg), cfg


@CHECKPOINT_KINDS.register("recognition")
def load_recognition(ckpt: dict[str, Any], path: str, device: str, num_frames: int | None = None,
                     _kind: str = "recognition", **_: Any) -> InferenceBundle:
    """A recognition checkpoint (or, with ``_kind="retrieval"``, a video-only retrieval one) -> a bundle with its
    classifier; ``num_frames`` overrides the model's evaluation frame count."""
    from vidlang.models.clip.tokenizer import TOKENIZER_KEY

    task, cfg = _classifier(ckpt, path, _kind)
    frames = num_frames or cfg.inference_frames
    tok = task.tokenizer if TOKENIZER_KEY in ckpt else None
    return InferenceBundle(task.model, tok, frames, device, file_fingerprint(path), classifier=task)


def load_classifier(ckpt_path: str | os.PathLike, device: str = "cpu", labels: bool = False, backend: str = "auto",
                    num_frames: int | None = None) -> InferenceBundle:
    """A checkpoint -> an :class:`InferenceBundle` with a classifier (``bundle.classifier``, a
    :class:`~vidlang.tasks.recognition.RecognitionTask` in eval mode), for ``vidlang classify``.

    A recognition checkpoint loads as trained (class names, head, templates). A retrieval checkpoint gives a
    zero-shot classifier over its towers (no head, default templates) and needs ``labels`` (the class names
    come from the caller); an audio-visual one is refused (classification here is video only). ``num_frames``:
    frames per clip (default: the model's evaluation count, ``ModelConfig.inference_frames``).
    """
    ckpt = read_checkpoint(ckpt_path)
    kind = checkpoint_task(ckpt, ckpt_path)
    if kind not in ("recognition", "retrieval"):
        raise wrong_kind(ckpt_path, kind, "vidlang classify", ["recognition", "retrieval"])
    hp = ckpt.get("hyper_parameters") or {}
    if kind == "retrieval" and not labels:
        raise CheckpointError(f"{ckpt_path}: a RetrievalTask checkpoint has no class names: pass the labels to "
                              'choose from, e.g. --labels "dancing,running" (zero-shot)')
    if kind == "retrieval" and hp.get("audio"):
        raise CheckpointError(f"{ckpt_path}: an audio-visual RetrievalTask checkpoint; classify uses video only "
                              "(train a recognition model, or use vidlang search)")
    bundle = load_recognition(ckpt, str(ckpt_path), str(device), num_frames=num_frames, _kind=kind)
    bundle.backend, bundle.kind = backend, kind
    return bundle
