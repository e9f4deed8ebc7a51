"""Serving throughput and latency: dynamic batching on against off, on loopback.

Two `transformer serve` processes on 127.0.0.1 with the same model: "batched" (the defaults,
--max-wait-ms 10 --max-batch-tokens 4096) and "unbatched" (--max-wait-ms 0 --max-batch-tokens 1:
every batch is one sentence). Closed-loop clients (asyncio + httpx, in this process) at each
concurrency send one-sentence requests taken in turn from Multi30k test2016 (English), asking
for each beam of --beams, each client sending its next request when its answer comes. A cell
runs `--seconds` after one warm-up request per client (sent together, not counted); it counts
the requests that end within the window (sentences/s), their latencies (p50/p95/p99), and any
request that fails (a status other than 200, or an error). Cells run round-robin (rounds ×
beams × concurrencies × servers), so both servers see the same machine; one server works at a
time (the other waits idle). Also reported: the mean batch size, from the server's /metrics.

    python benchmarks/serve.py                               # an untrained `small` model
    python benchmarks/serve.py --model runs/ende --max-len-b 50

Without --model the model is the `small` preset with random weights (seed 0) and a sentencepiece
vocabulary of 8000 trained on Multi30k's training text; an untrained model never ends a sentence,
so every output has the maximum length, --max-len-a · |source| + --max-len-b tokens (by default
|source| + 5, about the length of a German translation of the source).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from transformer.corpora import multi30k_dir

SYSTEMS = {"batched": ["--max-wait-ms", "10", "--max-batch-tokens", "4096"],
           "unbatched": ["--max-wait-ms", "0", "--max-batch-tokens", "1"]}


def untrained_small(folder: Path) -> Path:
    import torch

    from transformer.config import preset
    from transformer.model.models import build_model
    from transformer.text.tokenizer import Tokenizer
    from transformer.store.modeldir import save_model_dir

    data = multi30k_dir()
    text = [line for lang in ("en", "de") for line in (data / f"train.{lang}").read_text(encoding="utf-8").splitlines()]
    tokenizer = Tokenizer.train(text, 8000)
    torch.manual_seed(0)
    cfg = preset("small", vocab_size=tokenizer.vocab_size, dropout=0.0)
    save_model_dir(folder, build_model(cfg), cfg, tokenizer.to_bytes())
    return folder


class Server:
    def __init__(self, model: Path, flags: list[str], threads: int) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen([sys.executable, "-m", "transformer", "serve", "--model", str(model),
                                      "--port", "0", "--max-queue", "1024", "--timeout-s", "600", *flags],
                                     stderr=subprocess.PIPE, text=True, env=env)
        for line in self.proc.stderr:
            m = re.search(r"on (http://127\.0\.0\.1:\d+)/", line)
            if m:
                self.url = m.group(1)
                break
        else:
            raise SystemExit(f"the server did not start (exit {self.proc.wait()})")
        while httpx.get(f"{self.url}/health").status_code != 200:
            time.sleep(0.1)

    def batches(self) -> tuple[float, float]:
        """(sentences, batches) decoded so far, from /metrics."""
        text = httpx.get(f"{self.url}/metrics").text
        return tuple(float(re.search(rf"^transformer_batch_sentences_{k} (\S+)$", text, re.M).group(1))
                     for k in ("sum", "count"))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


async def closed_loop(url: str, concurrency: int, seconds: float, sentences: list[str], beam: int) -> dict:
    """Latencies and failures of `concurrency` closed-loop clients over `seconds`, asking for `beam`."""
    latencies: list[float] = []
    failed = 0
    turn = iter(range(10**9))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def one() -> float | None:
            sentence = sentences[next(turn) % len(sentences)]
            start = time.perf_counter()
            try:
                r = await client.post(f"{url}/translate", json={"text": sentence, "beam": beam})
                ok = r.status_code == 200 and len(r.json()["translations"]) == 1
            except httpx.HTTPError:
                ok = False
            return time.perf_counter() - start if ok else None

        async def client_loop(end: float) -> None:
            nonlocal failed
            while time.perf_counter() < end:
                latency = await one()
                if latency is None:
                    failed += 1
                elif time.perf_counter() <= end:
                    latencies.append(latency)

        await asyncio.gather(*(one() for _ in range(concurrency)))  # warm-up: connections opened, not counted
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(start + seconds) for _ in range(concurrency)))
    return {"latencies": latencies, "failed": failed, "seconds": seconds}


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = re.search(r"Model name:\s*(.+)", lscpu).group(1).strip()
        flags = re.search(r"Flags:\s*(.+)", lscpu).group(1).split()
        have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    except (OSError, AttributeError):
        name, have = platform.processor(), []
    return f"{name}, {os.cpu_count()} cores ({', '.join(have) or 'no avx2'})"


def measure(servers: dict[str, Server], args: argparse.Namespace, sentences: list[str]) -> dict:
    """{(beam, concurrency, server): latencies, failures, seconds, sentences and batches decoded}, round-robin."""
    cells: dict[tuple[int, int, str], dict] = {}
    for _, beam, concurrency, (name, server) in itertools.product(range(args.rounds), args.beams,
                                                                 args.concurrency, servers.items()):
        before = server.batches()
        r = asyncio.run(closed_loop(server.url, concurrency, args.seconds, sentences, beam))
        after = server.batches()
        cell = cells.setdefault((beam, concurrency, name),
                                {"latencies": [], "failed": 0, "seconds": 0.0, "sentences": 0.0, "batches": 0.0})
        for k in ("latencies", "failed", "seconds"):
            cell[k] += r[k]
        cell["sentences"] += after[0] - before[0]
        cell["batches"] += after[1] - before[1]
        print(f"  beam {beam} concurrency {concurrency:3d} {name:9s}: "
              f"{len(r['latencies']) / r['seconds']:7.1f} sentences/s", file=sys.stderr, flush=True)
    return cells


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="a translation model folder (default: an untrained `small`)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--beams", type=int, nargs="+", default=[4, 1], help="beam sizes the requests ask for")
    p.add_argument("--seconds", type=float, default=10.0, help="measured time of a cell")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of each server")
    p.add_argument("--max-len-a", default="1")
    p.add_argument("--max-len-b", default="5")
    args = p.parse_args()
    sentences = (multi30k_dir() / "test2016.en").read_text(encoding="utf-8").splitlines()
    search = ["--max-len-a", args.max_len_a, "--max-len-b", args.max_len_b]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or untrained_small(Path(tmp) / "small")
        servers = {name: Server(model, flags + search, args.threads) for name, flags in SYSTEMS.items()}
        try:
            cells = measure(servers, args, sentences)
        finally:
            for server in servers.values():
                server.stop()
    print(f"machine: {machine()}; torch threads per server: {args.threads}; model: "
          f"{args.model or 'untrained small (seed 0)'}; max output a·|src| + b = "
          f"{args.max_len_a}·|src| + {args.max_len_b}; {args.rounds} rounds of {args.seconds:g} s per cell\n")
    print("| beam | concurrency | server | sentences/s | × unbatched | p50 ms | p95 ms | p99 ms | mean batch "
          "| failed |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for beam, concurrency in itertools.product(args.beams, args.concurrency):
        base = cells[(beam, concurrency, "unbatched")]
        base_rate = len(base["latencies"]) / base["seconds"]
        for name in SYSTEMS:
            c = cells[(beam, concurrency, name)]
            rate = len(c["latencies"]) / c["seconds"]
            ms = [1000 * percentile(c["latencies"], q) for q in (50, 95, 99)]
            print(f"| {beam} | {concurrency} | {name} | {rate:.1f} | {rate / base_rate:.2f} "
                  f"| {ms[0]:.0f} | {ms[1]:.0f} | {ms[2]:.0f} | {c['sentences'] / max(c['batches'], 1):.1f} "
                  f"| {c['failed']} |")


if __name__ == "__main__":
    main()
