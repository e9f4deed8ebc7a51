"""The language model server's model thread: continuous batching (`inference.scheduler`) driven step by step.

Requests are submitted from the event loop (`Generator.submit`): each of their sequences goes
to an inbox that the model thread moves into the scheduler before its next step, so a request
joins the running batch within one step. After every step the model thread hands each
sequence's new text to its request's `asyncio.Queue` through the event loop, and records the
metrics (time to first token, inter-token latency, tokens per second, running and waiting
sequences, KV blocks). A request that goes away (`Request.cancel`: a client that disconnects,
a deadline) leaves at the next step, its blocks back in the pool. Every sequence ends with exactly
one output whose `finish` is set (also "cancelled", "timeout" or "error").

At most `max_queue` requests are accepted and unanswered at once; one more gets `QueueFull`
at once. A step that fails ends every sequence it held (finish "error") and the thread goes on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

from transformer.inference.scheduler import Output, SamplingParams, Scheduler, Sequence
from transformer.serve.batcher import QueueFull
from transformer.serve.metrics import LMMetrics

log = logging.getLogger("transformer.serve")


@dataclass(eq=False)
class Request:
    """The sequences of one request and the queue of their outputs (filled on the event loop)."""

    sequences: list[Sequence]
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)
    left: int = 0  # sequences whose end the request has not read yet (event loop)
    unfinished: int = 0  # sequences the model thread has not ended (model thread)

    def __post_init__(self) -> None:
        self.left = self.unfinished = len(self.sequences)

    def cancel(self) -> None:
        """Let every sequence go at the next step (from any thread)."""
        for s in self.sequences:
            s.cancelled = True


class Generator:
    """The model thread of a language model server (see the module)."""

    def __init__(self, scheduler: Scheduler, metrics: LMMetrics, max_queue: int) -> None:
        self.scheduler, self.metrics, self.max_queue = scheduler, metrics, max_queue
        self.ready = threading.Event()  # set once a warm-up sequence has been generated
        self.failure: str | None = None
        self._cond = threading.Condition()
        self._inbox: deque[Sequence] = deque()
        self._requests: dict[int, Request] = {}  # id(sequence) -> its request (model thread)
        self._last: dict[int, float] = {}  # id(sequence) -> when it last gave a token
        self._stopping = False
        self._accepted = 0  # requests accepted and not answered (event loop)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._work, name="model-worker", daemon=True)

    def start(self) -> None:
        """Start the model thread (from the event loop that will read the outputs)."""
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    async def stop(self) -> None:
        """Let the model thread finish every sequence it holds, then end it."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join)

    def submit(self, prompts: list[list[int]], params: SamplingParams, n: int, timeout_s: float) -> Request:
        """(event loop) A request of `n` sequences per prompt, queued; `QueueFull` if `max_queue` are unanswered."""
        if self._accepted >= self.max_queue:
            raise QueueFull
        deadline = time.monotonic() + timeout_s
        sequences = [Sequence(ids, _seeded(params, i), index=p * n + i, deadline=deadline)
                     for p, ids in enumerate(prompts) for i in range(n)]
        request = Request(sequences)
        self._accepted += 1
        self.metrics.accepted.set(self._accepted)
        with self._cond:
            for s in sequences:
                self._requests[id(s)] = request
            self._inbox.extend(sequences)
            self._cond.notify()
        return request

    def _answered(self) -> None:
        """(event loop) A request's last sequence has ended: it no longer counts against `max_queue`. Counted
        from the model thread's side, so that a request counts until its sequences are gone whatever its
        client did (a stream that never started reading included)."""
        self._accepted -= 1
        self.metrics.accepted.set(self._accepted)

    # The model thread.

    def _work(self) -> None:
        self._warm_up()
        while self._next():
            start = time.perf_counter()
            try:
                outputs = self.scheduler.step()
            except Exception:  # every sequence it held ends with "error"; the thread goes on
                log.exception("a decoding step failed")
                outputs = self.scheduler.release_all("error")
            self._deliver(outputs, time.perf_counter() - start)

    def _warm_up(self) -> None:
        """Generate a few tokens once, so that first-call costs do not fall on a client (and /health says ready)."""
        try:
            self.scheduler.add(Sequence(self.scheduler.tokenizer.encode(["\n"])[0] or [0],
                                        SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)))
            while self.scheduler.busy:
                self.scheduler.step()
        except Exception as e:  # reported by /health
            self.failure = f"{type(e).__name__}: {e}"
            log.exception("warm-up failed")
        self.ready.set()

    def _next(self) -> bool:
        """Wait for work; move the inbox into the scheduler. False when stopping with nothing left."""
        with self._cond:
            while True:
                while self._inbox:
                    self._add(self._inbox.popleft())
                if self.scheduler.busy:
                    if self.scheduler.cfg.static and not self.scheduler.running:
                        self._cond.wait(self.scheduler.cfg.static_wait_s / 2)  # company may come
                    return True
                if self._stopping:
                    return False
                self._cond.wait()

    def _add(self, sequence: Sequence) -> None:
        """Into the scheduler; one it refuses (the app checks the pool's size first) ends with "error"."""
        try:
            self.scheduler.add(sequence)
        except ValueError:
            log.exception("a sequence was refused")
            sequence.finish = "error"
            self._deliver([Output(sequence, "", "error")], 0.0)

    def _deliver(self, outputs: list[Output], seconds: float) -> None:
        """Hand each output to its request's queue; record the step's metrics."""
        now, tokens = time.monotonic(), 0
        for out in outputs:
            s = out.sequence
            key = id(s)
            if out.finish in (None, "stop", "length") and s.generated:
                tokens += 1
                if key in self._last:
                    self.metrics.inter_token.observe(now - self._last[key])
                else:
                    self.metrics.first_token.observe(now - s.arrived)
                self._last[key] = now
            request = self._requests.get(key)
            if request is None:  # the warm-up's
                continue
            self._loop.call_soon_threadsafe(request.outputs.put_nowait, out)
            if out.finish is not None:
                del self._requests[key]
                self._last.pop(key, None)
                request.unfinished -= 1
                if request.unfinished == 0:
                    self._loop.call_soon_threadsafe(self._answered)
        self.metrics.step(tokens, seconds, self.scheduler)


def _seeded(params: SamplingParams, i: int) -> SamplingParams:
    """The settings of a request's i-th choice: its seed + i, so that n choices differ and repeat."""
    return params if i == 0 or params.seed is None else replace(params, seed=params.seed + i)
