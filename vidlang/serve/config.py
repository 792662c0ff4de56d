"""The limits of ``vidlang serve`` (no heavy imports: the CLI reads the defaults for its flags)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class ServeConfig:
    """Every limit of the server (the ``vidlang serve`` flags of the same names)."""

    host: str = "127.0.0.1"
    port: int = 8000  # 0 = an ephemeral port
    max_upload_mb: float = 64.0  # request body (upload) limit
    timeout_s: float = 30.0  # per request: upload, parsing, decoding and inference
    workers: int = 2  # video decoding threads
    decode_processes: int = 2  # processes those threads decode in (0: in the threads, in the server process)
    grace_s: float = 5.0  # shutdown finishes within this
    log_requests: bool = True
    max_queue: int = 64  # model jobs waiting or running; one more -> 503 + Retry-After
    batch_window_ms: float = 5.0  # a batcher waits this long for more concurrent work
    max_batch: int = 16
    max_json_kb: float = 64.0  # a JSON body, and each multipart text field
    max_json_depth: int = 8
    max_parts: int = 8  # multipart: files, and text fields, each
    max_text_chars: int = 2000  # a search query or a chat question
    max_video_s: float = 3600.0  # video duration
    max_pixels: int = 4096 * 4096  # video frame width x height (the decoder's DEFAULT_MAX_PIXELS)
    max_connections: int = 512
    header_timeout_s: float = 10.0  # request headers must arrive within this
    keepalive_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_header_kb: int = 16  # request line + headers; larger -> 431
    backlog: int = 2048

    def engine(self) -> Any:
        """The :class:`~vidlang.serve.engine.EngineConfig` of these limits."""
        from vidlang.serve.engine import EngineConfig

        return EngineConfig(workers=self.workers, decode_processes=self.decode_processes, max_queue=self.max_queue,
                            batch_window_s=self.batch_window_ms / 1000,
                            max_batch=self.max_batch, max_pixels=self.max_pixels, max_video_s=self.max_video_s)

    def connection_limits(self) -> Any:
        """The :class:`~vidlang.serve.protocol.ConnectionLimits` of these limits."""
        from vidlang.serve.protocol import ConnectionLimits

        return ConnectionLimits(max_connections=self.max_connections, header_timeout_s=self.header_timeout_s,
                                body_timeout_s=self.timeout_s + 1.0, max_header_bytes=self.max_header_kb * 1024)
