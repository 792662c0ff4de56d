"""Handing results from worker threads to the event loop with one wake-up per burst, not one per result.

``asyncio.wrap_future`` (like every ``loop.call_soon_threadsafe``) writes a byte to the loop's self-pipe for
each result. That ``send`` releases the GIL; a batcher thread finishing a batch of N jobs then has to win the
GIL back N times from the busy event-loop thread (up to ``sys.getswitchinterval()`` each), so that the model
sits idle while results trickle out. :class:`LoopWaker` queues the calls and wakes the loop once for all those
queued before it runs them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
from collections.abc import Callable
from typing import Any


class LoopWaker:
    """Runs ``fn(*args)`` on ``loop`` soon, from any thread; calls queued before the loop gets to them share one
    wake-up. Calls made after the loop closed are dropped."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self.wakeups = 0  # how many times the loop was woken (for tests)

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        with self._lock:
            self._pending.append((fn, args))
            if len(self._pending) > 1:  # a wake-up is already on its way and will run this one too
                return
        self.wakeups += 1
        try:
            self.loop.call_soon_threadsafe(self._run)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _run(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for fn, args in pending:
            try:
                fn(*args)
            except Exception as err:  # one failing call must not lose the others
                self.loop.call_exception_handler({"message": "LoopWaker call failed", "exception": err})

    def wrap(self, future: cf.Future) -> asyncio.Future:
        """An asyncio future on the loop with ``future``'s outcome (as ``asyncio.wrap_future``, one wake-up per
        burst). Cancelling the returned future does not cancel ``future``."""
        out = self.loop.create_future()
        future.add_done_callback(lambda f: self.call(_copy_outcome, f, out))
        return out


def _copy_outcome(source: cf.Future, target: asyncio.Future) -> None:
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif (err := source.exception()) is not None:
        target.set_exception(err)
    else:
        target.set_result(source.result())
