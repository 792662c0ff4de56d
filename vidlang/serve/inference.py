"""Load a trained checkpoint into an :class:`InferenceBundle`: model + tokenizer + preprocessing.

Two checkpoint kinds are recognised from their state-dict keys (:data:`CHECKPOINT_KINDS`):

* ``retrieval`` -- a :class:`~vidlang.tasks.retrieval.RetrievalTask` checkpoint (``model.*`` keys, the
  tokenizer embedded under ``vidlang_tokenizer``): video and text embeddings. A task trained with audio
  (hyper-parameter ``audio``) loads as an audio-visual model: each video's audio track is decoded and fused
  (clips without audio take the masked, video-only path).
* ``chat`` -- a :class:`~vidlang.tasks.chat_encoder.ChatEncoderTask` checkpoint (``encoder.*`` keys): video
  embeddings / query tokens and, with its causal LM directory, chat answers. It has no CLIP tokenizer,
  so :meth:`InferenceBundle.embed_texts` is unavailable.

Which task wrote a checkpoint (:func:`checkpoint_task`): the ``_class_path`` LightningCLI stores, else the
state-dict keys (``encoder.*``: chat; ``model.*``: recognition when the checkpoint carries class names /
prompt templates, else retrieval). A :class:`~vidlang.tasks.recognition.RecognitionTask` checkpoint is
not a bundle kind (``vidlang classify`` reads it, see :func:`load_classifier`).

Checkpoints are read with ``torch.load(weights_only=True)`` (:func:`read_checkpoint`): a file that needs
arbitrary code to load is refused with :class:`~vidlang.errors.UnsafeCheckpointError` naming the globals it
would call (found by scanning its pickle, never by running it); missing, empty, truncated or foreign files
raise :class:`~vidlang.errors.CheckpointError` naming the file. The model config's ``pretrained`` source is
ignored: every weight comes from the checkpoint.

Preprocessing of one video (the evaluation path of the data pipeline): decode (``open_video``), one clip
of ``num_frames`` frames from the ``segment`` sampler (centre of each segment), short-side resize + centre
crop to the tower's image size, normalise with the tower's mean/std. Embeddings are L2-normalised.
A video that cannot be decoded raises :class:`~vidlang.data.decoding.VideoDecodeError` naming it; nothing is
zero-filled.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vidlang.data.decoding.base import DEFAULT_MAX_PIXELS, VideoDecodeError
from vidlang.errors import CheckpointError, CheckpointNotFoundError, ConfigError, UnsafeCheckpointError
from vidlang.registry import Registry

CHECKPOINT_KINDS: Registry[Callable[..., InferenceBundle]] = Registry("checkpoint kind")
VideoInput = str | os.PathLike | bytes


class VideoTooLongError(VideoDecodeError):
    """A video longer than the duration limit it was decoded under (refused before decoding frames)."""


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


TASK_CLASSES = {
    "retrieval": "vidlang.tasks.retrieval.RetrievalTask",
    "recognition": "vidlang.tasks.recognition.RecognitionTask",
    "chat": "vidlang.tasks.chat_encoder.ChatEncoderTask",
}
"""checkpoint kind -> the task class that writes it."""
TASK_ROLES = {"retrieval": "text-video retrieval", "recognition": "action recognition", "chat": "video chat encoder"}


def task_name(kind: str) -> str:
    return TASK_CLASSES[kind].rsplit(".", 1)[1]


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A Lightning checkpoint as a dict, loaded with ``weights_only=True``.

    Raises :class:`CheckpointNotFoundError` (no such file), :class:`UnsafeCheckpointError` (it needs arbitrary
    code to load: refused), :class:`CheckpointError` (empty, truncated, not a torch file, no ``state_dict``).
    """
    p = Path(path)
    if p.is_dir():
        raise CheckpointError(f"{p}: a directory, not a checkpoint file")
    if not p.is_file():
        raise CheckpointNotFoundError(f"{p}: checkpoint not found")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p}: empty file, not a checkpoint")
    ckpt = safe_torch_load(p)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{p}: not a Lightning checkpoint (no 'state_dict'); vidlang reads the checkpoints "
                              "that training writes (bare model weights go to model.pretrained)")
    return ckpt


def safe_torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` on the CPU with one-line errors (see :func:`read_checkpoint`)."""
    with warnings.catch_warnings():  # e.g. torch's note on pickle protocols: not for the user
        warnings.simplefilter("ignore")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            refused = disallowed_globals(path) or _named_globals(str(err))
            if refused:
                shown = ", ".join(refused[:3]) + (f" and {len(refused) - 3} more" if len(refused) > 3 else "")
                raise UnsafeCheckpointError(
                    f"{path}: the checkpoint needs arbitrary code to load (its pickle imports {shown}) and was "
                    "refused; vidlang only loads checkpoints made of tensors and plain data"
                ) from None
            raise CheckpointError(f"{path}: not a checkpoint vidlang can read ({_torch_reason(err)})") from None
        except Exception as err:  # truncated zip, foreign bytes, ...: torch raises RuntimeError/EOFError/KeyError
            with open(path, "rb") as f:
                head = f.read(4)
            if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
                raise CheckpointError(f"{path}: truncated or corrupt checkpoint (incomplete zip archive)") from None
            raise CheckpointError(f"{path}: not a torch checkpoint, or truncated or corrupt "
                                  f"({_torch_reason(err)})") from None


def _torch_reason(err: BaseException) -> str:
    """The gist of a torch loading error, without torch's advice (which suggests ``weights_only`` off)."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    lines = [ln for ln in lines if "weights_only" not in ln and not ln.startswith(("Check the documentation",
                                                                                     "Weights only load failed"))]
    reason = lines[0].split(". ")[0].rstrip(".") if lines else ""
    return f"{type(err).__name__}: {reason}" if len(reason) < 12 else reason


def _named_globals(message: str) -> list[str]:
    import re

    return sorted(set(re.findall(r"GLOBAL ([\w.]+)", message)))


_SCAN_BYTES = 256 * 2**20  # the pickles of a legacy torch file come first, raw storages after


def disallowed_globals(path: str | os.PathLike) -> list[str]:
    """The globals a checkpoint's pickle would import beyond what ``torch.load(weights_only=True)`` allows,
    found by reading its opcodes (:mod:`vidlang.models.clip.pickle_scan`; nothing is executed). Zip
    checkpoints: ``*/data.pkl``; other files: their leading pickles (legacy ``torch.save`` layout, raw pickle)."""
    from vidlang.models.clip.pickle_scan import allowed_torch_globals, scan_pickles

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                name = next((n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")), None)
                data = zf.read(name) if name else b""
        else:
            with open(path, "rb") as f:
                data = f.read(_SCAN_BYTES)
    except (OSError, zipfile.BadZipFile, KeyError):
        return []
    return sorted(scan_pickles(data).disallowed(allowed_torch_globals()))


def checkpoint_task(ckpt: dict[str, Any], path: str | os.PathLike = "checkpoint") -> str:
    """Which vidlang task wrote ``ckpt``: ``"retrieval"``, ``"recognition"`` or ``"chat"`` (module docstring);
    :class:`CheckpointError` for another model's checkpoint."""
    hp = ckpt.get("hyper_parameters")
    hp = hp if isinstance(hp, dict) else {}
    by_path = {v: k for k, v in TASK_CLASSES.items()}
    if hp.get("_class_path") in by_path:
        return by_path[hp["_class_path"]]
    keys = list(ckpt["state_dict"].keys())
    if any(k.startswith("encoder.") for k in keys):
        return "chat"
    if any(k.startswith("model.") for k in keys):
        return "recognition" if "vidlang_classes" in ckpt or "templates" in hp else "retrieval"
    raise CheckpointError(f"{path}: not a vidlang checkpoint: its weights are neither a RetrievalTask / "
                          "RecognitionTask's ('model.*') nor a ChatEncoderTask's ('encoder.*')")


def checkpoint_kind(ckpt: dict[str, Any]) -> str:
    """Alias of :func:`checkpoint_task` (kept for callers of the old name)."""
    return checkpoint_task(ckpt)


def wrong_kind(path: str | os.PathLike, kind: str, command: str, wanted: Sequence[str]) -> CheckpointError:
    """The error for a checkpoint of ``kind`` given to ``command``, which needs one of ``wanted``."""
    need = " or ".join(f"{task_name(k)} ({TASK_ROLES[k]})" for k in wanted)
    hint = f"; classify videos with it: vidlang classify --ckpt {path}" if kind == "recognition" else ""
    return CheckpointError(f"{path}: a {task_name(kind)} checkpoint ({TASK_ROLES[kind]}), but {command} needs a "
                           f"{need} checkpoint{hint}")


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
        self.checkpoint_sha256 = fingerprint  # the checkpoint file's identity (vector indexes are checked against it)
        self.fingerprint = hashlib.sha256(
            f"{fingerprint}|frames={self.num_frames}|size={self.image_size}|sampler=segment|decode_resize".encode()
        ).hexdigest()[:32]

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    # -- video -------------------------------------------------------------------------------------
    def decode_clip(self, source: VideoInput, name: str | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                    max_seconds: float | None = None) -> Tensor:
        """One video -> eval clip ``uint8 [T, 3, S, S]``; :class:`VideoDecodeError` when it cannot be decoded.

        Frames are resized to short side ``S`` while decoding (memory stays bounded whatever the file's size),
        then center-cropped. A stream larger than ``max_pixels`` (width x height) is refused before decoding,
        one longer than ``max_seconds`` with :class:`VideoTooLongError`."""
        from vidlang.data.decoding import VideoDecodeError, open_video
        from vidlang.data.sampling import sample_clip

        label = name or (str(source) if isinstance(source, (str, os.PathLike)) else f"<{len(source)} bytes>")
        src = bytes(source) if isinstance(source, (bytearray, memoryview)) else source
        try:
            with open_video(src, backend=self.backend, resize_short_side=self.image_size,
                            max_pixels=max_pixels) as reader:
                duration = float(reader.metadata.duration)
                if max_seconds is not None and duration > max_seconds:
                    raise VideoTooLongError(label, reader.backend,
                                            f"{duration:.1f} s long, over the {max_seconds:g} s limit")
                clip = sample_clip(reader, self.sampler, training=False)[0]  # [T, C, H', W'], short side S
        except VideoDecodeError:
            raise
        except (ValueError, RuntimeError, OSError) as err:  # a sampler/backend failure on odd input
            raise VideoDecodeError(label, self.backend, str(err)) from err
        return self.transform(clip)

    def decode_audio(self, source: VideoInput, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Tensor | None:
        """The whole audio track (mono, at the frontend's sample rate, else 16 kHz) ``[S]``, ``None`` without audio."""
        from vidlang.data.decoding import open_video

        rate = int(getattr(self.audio_frontend, "sample_rate", 16000))
        src = bytes(source) if isinstance(source, (bytearray, memoryview)) else source
        with open_video(src, backend="pyav", max_pixels=max_pixels) as reader:
            return reader.get_audio(rate) if reader.metadata.has_audio else None

    def decode_video(self, source: VideoInput, name: str | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                     max_seconds: float | None = None) -> tuple[Tensor, Tensor | None]:
        """Clip ``uint8 [T, 3, S, S]`` and, for an audio-visual model, the audio track (else None); the limits
        as in :meth:`decode_clip`."""
        clip = self.decode_clip(source, name, max_pixels, max_seconds)
        return clip, (self.decode_audio(source, max_pixels) if self.audio_model is not None else None)

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
    from vidlang.models.factory import build_model
    from vidlang.tasks.common import TOKENIZER_KEY, tokenizer_from_state

    hp = ckpt.get("hyper_parameters", {})
    cfg = _config_of(hp, path)
    model = build_model(cfg)
    full, frontend = _audio_visual(model, hp)
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    missing, unexpected = (full or model).load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the model config: missing {missing[:6]}, "
                              f"unexpected {unexpected[:6]}")
    tok = tokenizer_from_state(ckpt[TOKENIZER_KEY]) if TOKENIZER_KEY in ckpt else None
    return InferenceBundle(model, tok, cfg.inference_frames, device, file_fingerprint(path), audio_frontend=frontend,
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
        raise ConfigError(f"{path}: a chat-encoder checkpoint needs its causal LM directory (--llm)")
    cfg = _config_of(hp, path)
    task = ChatEncoderTask.load_from_checkpoint(path, map_location="cpu", weights_only=True, model=cfg, llm=llm_dir)
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


def load_classifier(ckpt_path: str | os.PathLike, device: str = "cpu", labels: bool = False) -> Any:
    """A checkpoint -> a :class:`~vidlang.tasks.recognition.RecognitionTask` in eval mode, for ``vidlang classify``.

    A recognition checkpoint loads as trained (class names, head, templates). A retrieval checkpoint gives a
    zero-shot classifier over its towers (no head, default templates) and needs ``labels`` (the class names
    come from the caller); an audio-visual one is refused (classification here is video only).
    """
    from vidlang.tasks.recognition import RecognitionTask

    ckpt = read_checkpoint(ckpt_path)
    kind = checkpoint_task(ckpt, ckpt_path)
    if kind not in ("recognition", "retrieval"):
        raise wrong_kind(ckpt_path, kind, "vidlang classify", ["recognition", "retrieval"])
    hp = {k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if not k.startswith("_")}
    cfg = _config_of(hp, str(ckpt_path))
    if kind == "retrieval":
        if not labels:
            raise CheckpointError(f"{ckpt_path}: a RetrievalTask checkpoint has no class names: pass the labels to "
                                  'choose from, e.g. --labels "dancing,running" (zero-shot)')
        if hp.get("audio"):
            raise CheckpointError(f"{ckpt_path}: an audio-visual RetrievalTask checkpoint; classify uses video only "
                                  "(train a recognition model, or use vidlang search)")
        task = RecognitionTask(cfg, head=False, write_plots=False)
        state = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    else:
        import inspect

        params = set(inspect.signature(RecognitionTask.__init__).parameters) - {"self", "model"}
        task = RecognitionTask(cfg, **{k: v for k, v in hp.items() if k in params})
        state = ckpt["state_dict"]
    task.on_load_checkpoint(ckpt)  # tokenizer, class names
    missing, unexpected = task.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt_path}: weights do not match the model config: missing {missing[:6]}, "
                              f"unexpected {unexpected[:6]}")
    return task.to(device).eval()
