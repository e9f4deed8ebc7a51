"""A real `transformer serve` process on 127.0.0.1, for the tests (not itself a test file)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import httpx


class ServeProcess:
    """`transformer serve --model MODEL --port 0 FLAGS...`, started, read until ready; `stop()` ends it for sure."""

    def __init__(self, model, *flags: str, ready_s: float = 60.0) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "transformer", "serve", "--model", str(model), "--port", "0", *flags],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        try:
            self.url = self._url(ready_s)
            self._wait_ready(ready_s)
        except BaseException:
            self.stop()
            raise

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)
            self.lines.put(line)

    def _url(self, seconds: float) -> str:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            m = re.search(r"on (http://127\.0\.0\.1:\d+)/", line)
            if m:
                return m.group(1)
        raise AssertionError(f"the server did not start: {''.join(self.stderr)}")

    def _wait_ready(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None, f"the server died: {''.join(self.stderr)}"
            time.sleep(0.05)
        raise AssertionError("the server never said ready")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
