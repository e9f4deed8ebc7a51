"""Dynamic batching across requests, on one model worker thread.

Every sentence of every accepted request waits in one pool. The worker takes the oldest
sentence and, from the sentences with the same beam and alpha, those closest to it in
length, as many as fit in `max_batch_tokens` padded source tokens (sentences × the
longest source, EOS included) and `max_batch_sentences`; a sentence longer than the
budget goes alone. It takes a batch as soon as one is full, or when the oldest sentence
has waited `max_wait_ms` for company, counted from when the worker was free: after a long
batch, the clients whose answers it just sent get `max_wait_ms` to send their next requests
and join the next batch (else closed-loop clients split into two cohorts, each batch half
of them). Taking the oldest first means no sentence starves.

Requests wait on asyncio futures that the worker resolves through the event loop, so the
loop never decodes and keeps answering (`/health`, `/metrics`) while a batch runs. A
request has a deadline: when it passes the request fails with `DeadlineExceeded`, and its
sentences still waiting are dropped. At most `max_queue` requests are accepted at once;
one more fails at once with `QueueFull`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

from transformer.errors import UserError
from transformer.serve.engine import Engine
from transformer.serve.metrics import Metrics

log = logging.getLogger("transformer.serve")


class QueueFull(Exception):
    """Already `max_queue` requests accepted and unanswered."""


class DeadlineExceeded(Exception):
    """A request's deadline passed before its answer was ready."""


class DecodingFailed(Exception):
    """The engine failed on the batch that held the request (the worker goes on with the next)."""


@dataclass(frozen=True)
class BatchConfig:
    max_batch_tokens: int = 4096  # padded source tokens per batch (sentences × longest source, EOS included)
    max_batch_sentences: int = 64
    max_wait_ms: float = 10.0  # how long the oldest waiting sentence waits for company, once the worker is free
    max_queue: int = 128  # requests accepted and not yet answered


@dataclass(eq=False)
class _Request:
    """A request's sentences, its future (resolved on the event loop) and what has come back so far."""

    lines: list[str]
    key: tuple[int, float]  # (beam, alpha): only sentences with the same key share a batch
    deadline: float  # time.monotonic()
    future: asyncio.Future
    results: list[str | None] = field(default_factory=list)
    left: int = 0

    def __post_init__(self) -> None:
        self.results, self.left = [None] * len(self.lines), len(self.lines)

    @property
    def abandoned(self) -> bool:
        return self.future.done() or time.monotonic() > self.deadline

    def deliver(self, index: int, text: str) -> None:
        """(event loop) One sentence's translation; the future resolves with the last one."""
        self.results[index] = text
        self.left -= 1
        if self.left == 0 and not self.future.done():
            self.future.set_result(self.results)


@dataclass(eq=False)
class _Sentence:
    request: _Request
    index: int
    length: int  # source tokens
    arrived: float


class Batcher:
    """One model worker thread that decodes batches of waiting sentences; `translate` from the event loop."""

    def __init__(self, engine: Engine, cfg: BatchConfig, metrics: Metrics) -> None:
        self.engine, self.cfg, self.metrics = engine, cfg, metrics
        self.ready = threading.Event()  # set once the model has decoded a first sentence
        self.failure: str | None = None  # why the warm-up failed, if it did
        self._cond = threading.Condition()
        self._pending: list[_Sentence] = []  # oldest first
        self._calls: deque[Callable[[], None]] = deque()  # other work for the model thread (heatmaps)
        self._stopping = False
        self._in_flight = 0  # requests accepted, not answered (event loop only)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._work, name="model-worker", daemon=True)

    def start(self) -> None:
        """Start the worker (call from the event loop that will await the results)."""
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    async def stop(self) -> None:
        """Let the worker finish what is queued, then end it."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join)

    @contextmanager
    def _admitted(self):
        """One more request accepted for as long as the block runs; `QueueFull` if `max_queue` already are."""
        if self._in_flight >= self.cfg.max_queue:
            raise QueueFull
        self._in_flight += 1
        self.metrics.in_flight.set(self._in_flight)
        try:
            yield
        finally:
            self._in_flight -= 1
            self.metrics.in_flight.set(self._in_flight)

    async def translate(self, lines: list[str], lengths: list[int], beam: int, alpha: float,
                        timeout_s: float) -> list[str]:
        """The translations of `lines` (source lengths `lengths`), in order; `QueueFull`, `DeadlineExceeded`."""
        with self._admitted():
            now = time.monotonic()
            request = _Request(lines, (beam, alpha), now + timeout_s, self._loop.create_future())
            with self._cond:
                self._pending += [_Sentence(request, i, n, now) for i, n in enumerate(lengths)]
                self.metrics.queue.set(len(self._pending))
                self._cond.notify()
            return await self._wait(request.future, timeout_s)

    async def call(self, fn: Callable[[], Any], timeout_s: float) -> Any:
        """fn() run on the model thread, between batches; `DeadlineExceeded` after `timeout_s`."""
        future = self._loop.create_future()

        def run() -> None:
            if future.done():  # its deadline passed while it waited
                return
            try:
                result = fn()
            except UserError as e:  # a sentence the engine cannot take
                self._loop.call_soon_threadsafe(_fail, future, e)
            except Exception as e:  # handed to the request, which reports it
                self._loop.call_soon_threadsafe(_fail, future, DecodingFailed(f"{type(e).__name__}: {e}"))
            else:
                self._loop.call_soon_threadsafe(_resolve, future, result)

        with self._admitted():
            with self._cond:
                self._calls.append(run)
                self._cond.notify()
            return await self._wait(future, timeout_s)

    @staticmethod
    async def _wait(future: asyncio.Future, timeout_s: float) -> Any:
        try:
            return await asyncio.wait_for(future, timeout_s)  # cancels the future on timeout
        except asyncio.TimeoutError:
            raise DeadlineExceeded from None

    # The model thread.

    def _work(self) -> None:
        try:
            self.engine.translate_batch(["Warm-up."], 1, 0.0)  # first-call costs (allocations, kernels) go here
        except Exception as e:  # reported by /health
            self.failure = f"{type(e).__name__}: {e}"
            log.exception("warm-up failed")
        self.ready.set()
        while (job := self._next_job()) is not None:
            job()

    def _next_job(self) -> Callable[[], None] | None:
        """The next piece of work, once there is one; None when stopping with nothing left."""
        free = time.monotonic()  # the worker is free from now: company is waited for from here at the earliest
        with self._cond:
            while True:
                if self._calls:
                    return self._calls.popleft()
                self._pending = [s for s in self._pending if not s.request.abandoned]
                self.metrics.queue.set(len(self._pending))
                if not self._pending:
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                batch, full = self._select()
                wait = max(self._pending[0].arrived, free) + self.cfg.max_wait_ms / 1000 - time.monotonic()
                if full or wait <= 0 or self._stopping:
                    taken = set(map(id, batch))
                    self._pending = [s for s in self._pending if id(s) not in taken]
                    self.metrics.queue.set(len(self._pending))
                    return lambda: self._decode(batch)
                self._cond.wait(wait)

    def _select(self) -> tuple[list[_Sentence], bool]:
        """The next batch: the oldest sentence and those of its key closest to it in length; and whether it is full."""
        oldest = self._pending[0]
        company = [s for s in self._pending if s.request.key == oldest.request.key]
        company.sort(key=lambda s: abs(s.length - oldest.length))  # stable: older first among equals
        batch: list[_Sentence] = []
        width = 0  # the longest source of the batch, EOS included
        for s in company:
            wider = max(width, s.length + 1)
            if batch and ((len(batch) + 1) * wider > self.cfg.max_batch_tokens
                          or len(batch) == self.cfg.max_batch_sentences):
                return batch, True
            batch.append(s)
            width = wider
        return batch, len(batch) * width >= self.cfg.max_batch_tokens or len(batch) == self.cfg.max_batch_sentences

    def _decode(self, batch: list[_Sentence]) -> None:
        beam, alpha = batch[0].request.key
        start = time.perf_counter()
        try:
            out = self.engine.translate_batch([s.request.lines[s.index] for s in batch], beam, alpha)
        except Exception as e:  # every request of the batch fails with it (HTTP 500); the worker goes on
            log.exception("decoding a batch failed")
            for request in {id(s.request): s.request for s in batch}.values():
                self._loop.call_soon_threadsafe(_fail, request.future, DecodingFailed(f"{type(e).__name__}: {e}"))
            return
        seconds = time.perf_counter() - start
        self.metrics.batch(len(batch), sum(self.engine.lengths(out)), seconds)
        for s, text in zip(batch, out):
            self._loop.call_soon_threadsafe(s.request.deliver, s.index, text)


def _resolve(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
