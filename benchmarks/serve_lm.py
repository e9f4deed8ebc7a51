"""LM serving: continuous batching against static batching, one request at a time, and HF `generate`.

Closed-loop clients (asyncio + httpx streaming, in this process) at each concurrency send
`POST /v1/completions` with `"stream": true` to a `transformer serve --model RUN` process on
127.0.0.1; each client sends its next request when the whole streamed answer has come. The
requests come in turn from a pool drawn once with a seeded RNG: a prompt of 16-256 tokens (of the
model's tokenizer) cut from Tiny Shakespeare, and `max_tokens` drawn from 16-256, with
`"ignore_eos": true` so that each request generates exactly `max_tokens` tokens, and
`"stream_options": {"include_usage": true}` for their count. Modes (one server process per mode,
started and stopped here, one after the other, so only one works at a time):

- continuous: `--batching continuous --batch-size 64` (ours);
- static: `--batching static --batch-size 64` (a batch runs until its longest sequence ends);
- single: `--batch-size 1` (one request at a time);
- hf: Hugging Face `GPT2LMHeadModel.generate` of the same shape (n_layer, n_embd, n_head, n_inner,
  vocab size, n_positions and the activation from the run's config.json; random weights), one
  request at a time in this process (`min_new_tokens = max_new_tokens`), at concurrency 1 only;
  its TTFT and ITL come from a `BaseStreamer` whose `put` records the time.

A cell (mode × concurrency) runs `--warmup` seconds, then is measured for `--seconds`; then the
clients send nothing new and the requests in flight finish (the drain is not measured). Counted:
tokens streamed within the window by requests that succeeded (generated tok/s = those / seconds);
requests = successful requests that ended within the window; TTFT (request sent → its first data
event carrying text) of the requests whose first token came within the window; ITL (gaps between
successive text events of a request) for gaps that end within the window. The server sends one
event per token, except that a token adding no text of its own (a lone space) waits for the next:
such a token is counted at its request's last event, and its gap is part of the next one. A
request fails on a status other than 200, a transport error, an error event, a stream without
`data: [DONE]`, a token count (usage) other than `max_tokens`, or a finish_reason other than
"length".

    python benchmarks/serve_lm.py                                   # trains a throwaway `small` model first
    python benchmarks/serve_lm.py --model runs/lm --seconds 60 --out results.json
    python benchmarks/serve_lm.py --seconds 5 --concurrency 1 8 --modes continuous static single hf   # smoke

Without --model the model is the `small` preset (3 decoder layers, d_model 256, 4 heads, d_ff
1024) with a BPE vocabulary of 1000 and a block of 512 tokens, trained for a handful of steps on
Tiny Shakespeare by `transformer lm train` (the weights do not matter for speed), cached in --cache.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from pathlib import Path

import httpx

MODES = {
    "continuous": ["--batching", "continuous", "--batch-size", "64"],
    "static": ["--batching", "static", "--batch-size", "64"],
    "single": ["--batch-size", "1"],
}
LABELS = {"continuous": "continuous (ours)", "static": "static", "single": "one at a time",
          "hf": "HF generate (one at a time)"}
HF_ACTIVATION = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "swish": "silu"}


# ---- the model and the requests ---------------------------------------------------------------


def make_model(cache: Path, steps: int) -> Path:
    """A `small` decoder-only run (BPE, block 512) in `cache`, trained for `steps` steps unless already there."""
    if (cache / "config.json").exists():
        return cache
    from transformer.corpora import tinyshakespeare_path

    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "transformer", "lm", "train", "--text", str(tinyshakespeare_path()),
           "--vocab", "bpe", "--block-size", "512", "--preset", "small", "--dropout", "0",
           "--max-steps", str(steps), "--batch-size", "2", "--eval-batches", "1", "--no-progress", "--out", str(tmp)]
    print("making the model:", shlex.join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(cache)
    return cache


def request_pool(tokenizer, n: int, seed: int, prompt_range: tuple[int, int],
                 new_range: tuple[int, int]) -> list[dict]:
    """`n` requests: {"prompt": text, "ids": its token ids, "max_tokens"}, the prompt a window of Tiny
    Shakespeare whose re-encoding has a length within `prompt_range`."""
    from transformer.corpora import tinyshakespeare_path

    text = tinyshakespeare_path().read_text(encoding="utf-8")
    rng = random.Random(seed)
    pool = []
    while len(pool) < n:
        length = rng.randint(*prompt_range)
        start = rng.randrange(len(text) - 16 * prompt_range[1])
        start = text.find(" ", start) + 1  # at a word's start
        ids = tokenizer.encode([text[start:start + 16 * length]])[0][:length]
        prompt = tokenizer.decode([ids])[0]
        ids = tokenizer.encode([prompt])[0]  # what the server will see
        if prompt_range[0] <= len(ids) <= prompt_range[1]:
            pool.append({"prompt": prompt, "ids": ids, "max_tokens": rng.randint(*new_range)})
    return pool


# ---- the server -------------------------------------------------------------------------------


class Server:
    """`transformer serve --model MODEL --port 0 FLAGS...`, read until ready; its stderr is kept read (the
    last lines kept, for errors); `stop()` sends SIGTERM, then kills."""

    def __init__(self, model: Path, flags: list[str], threads: int | None, ready_s: float = 300.0) -> None:
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.cmd = [sys.executable, "-m", "transformer", "serve", "--model", str(model), "--port", "0", *flags]
        print("starting:", shlex.join(self.cmd[1:]), file=sys.stderr, flush=True)
        self.proc = subprocess.Popen(self.cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.tail: deque[str] = deque(maxlen=200)
        self.url: str | None = None
        found = threading.Event()
        threading.Thread(target=self._read, args=(found,), daemon=True).start()
        end = time.monotonic() + ready_s
        try:
            while not found.wait(0.2):
                if self.proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"the server did not start (exit {self.proc.poll()}):\n{self.stderr()}")
            while True:
                try:
                    if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"the server never said ready (exit {self.proc.poll()}):\n{self.stderr()}")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def _read(self, found: threading.Event) -> None:
        for line in self.proc.stderr:
            self.tail.append(line)
            if self.url is None:
                m = re.search(r"on (http://127\.0\.0\.1:\d+)/", line)
                if m:
                    self.url = m.group(1)
                    found.set()

    def stderr(self) -> str:
        return "".join(self.tail)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                print("  the server ignored SIGTERM for 15 s: killed", file=sys.stderr, flush=True)
                self.proc.kill()
                self.proc.wait(15)
        return self.proc.returncode


# ---- closed-loop HTTP clients -----------------------------------------------------------------


async def stream_one(client: httpx.AsyncClient, url: str, req: dict, temperature: float) -> dict:
    """One streamed completion: {"sent", "times" (of each data event carrying text), "tokens" (generated, from the
    usage event), "error" (None when it succeeded)}. The server sends one event per token, or one for a few tokens
    when a token adds no text on its own (e.g. a lone space before the next word): the tokens an event does not
    account for are counted at the request's last event."""
    body = {"prompt": req["prompt"], "max_tokens": req["max_tokens"], "temperature": temperature,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    sent = time.perf_counter()
    times: list[float] = []
    finish = usage = error = None
    done = False
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"sent": sent, "times": [], "tokens": 0, "error": f"HTTP {r.status_code}",
                        "retry_after": r.headers.get("retry-after")}
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    error = f"error event ({event['error'].get('code')})"
                    continue
                if event.get("usage"):
                    usage = event["usage"]["completion_tokens"]
                for choice in event.get("choices") or []:
                    times.append(time.perf_counter())
                    if choice.get("finish_reason") is not None:
                        finish = choice["finish_reason"]
    except httpx.HTTPError as e:
        return {"sent": sent, "times": times, "tokens": 0, "error": type(e).__name__}
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        return {"sent": sent, "times": times, "tokens": 0, "error": f"bad event ({type(e).__name__})"}
    tokens = usage if usage is not None else len(times)
    if error is None:
        if not done:
            error = "no [DONE]"
        elif tokens != req["max_tokens"] or len(times) > tokens:
            error = f"wrong token count ({tokens} tokens, {len(times)} events for max_tokens {req['max_tokens']})"
        elif finish != "length":
            error = f"finish_reason {finish!r}"
    return {"sent": sent, "times": times, "tokens": tokens, "error": error}


async def closed_loop(url: str, concurrency: int, warmup: float, seconds: float, pool: list[dict],
                      temperature: float, timeout: float) -> tuple[list[dict], float, float]:
    """The results of every request of `concurrency` closed-loop clients that send from `pool` in turn until the
    window [start + warmup, start + warmup + seconds] ends, then let their requests in flight finish."""
    turn = iter(range(10**9))
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30), limits=limits) as client:
        start = time.perf_counter()
        window = (start + warmup, start + warmup + seconds)

        async def client_loop() -> None:
            while True:  # at least one request each
                r = await stream_one(client, url, pool[next(turn) % len(pool)], temperature)
                results.append(r)
                if r["error"] and r["error"].startswith("HTTP"):  # e.g. 503: honour Retry-After, within reason
                    await asyncio.sleep(min(float(r.get("retry_after") or 0.1), 1.0))
                if time.perf_counter() >= window[1]:
                    break

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return results, *window


# ---- Hugging Face generate --------------------------------------------------------------------


def hf_model(config: dict):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()  # a random model samples the pad id: a one-time warning about attention masks
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=config["vocab_size"], n_positions=config["max_len"], n_embd=config["d_model"],
                     n_layer=config["n_decoder_layers"], n_head=config["n_heads"], n_inner=config["d_ff"],
                     activation_function=HF_ACTIVATION[config["activation"]], resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, layer_norm_epsilon=config["layer_norm_eps"], bos_token_id=config["bos_id"],
                     eos_token_id=config["eos_id"], pad_token_id=config["pad_id"],
                     tie_word_embeddings=config["tie_embeddings"])
    return GPT2LMHeadModel(cfg).eval()


def hf_closed_loop(model, warmup: float, seconds: float, pool: list[dict],
                   temperature: float) -> tuple[list[dict], float, float]:
    """As `closed_loop` at concurrency 1, with `model.generate` in this process; times from a streamer."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.puts = 0

        def put(self, value) -> None:
            self.puts += 1
            if self.puts > 1:  # the first put is the prompt
                self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 \
        else {"do_sample": False}
    results: list[dict] = []
    start = time.perf_counter()
    window = (start + warmup, start + warmup + seconds)
    for i in range(10**9):
        if i and time.perf_counter() >= window[1]:  # at least one request
            break
        req = pool[i % len(pool)]
        ids = torch.tensor([req["ids"]])
        clock = Clock()
        sent = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=req["max_tokens"],
                                 min_new_tokens=req["max_tokens"], streamer=clock, **sampling)
        n = out.shape[1] - ids.shape[1]
        error = None if n == req["max_tokens"] == len(clock.times) else "wrong token count"
        results.append({"sent": sent, "times": clock.times, "tokens": n, "error": error})
    return results, *window


# ---- the figures ------------------------------------------------------------------------------


def percentile(values: list[float], q: int) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def summarize(mode: str, concurrency: int, results: list[dict], ws: float, we: float) -> dict:
    ok = [r for r in results if r["error"] is None]
    # one token an event, and at a request's last event the tokens that its events did not account for
    tokens = sum(ws <= t <= we for r in ok for t in r["times"])
    tokens += sum(r["tokens"] - len(r["times"]) for r in ok if r["times"] and ws <= r["times"][-1] <= we)
    merged = sum(r["tokens"] - len(r["times"]) for r in ok)
    ttft = [r["times"][0] - r["sent"] for r in ok if r["times"] and ws <= r["times"][0] <= we]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:]) if ws <= b <= we]
    errors = Counter(r["error"] for r in results if r["error"])
    ms = lambda v: None if v is None else 1000 * v
    return {
        "mode": mode, "concurrency": concurrency, "seconds": we - ws,
        "requests": sum(ws <= r["times"][-1] <= we for r in ok if r["times"]),
        "tokens": tokens, "tokens_per_s": tokens / (we - ws),
        "ttft_p50_ms": ms(percentile(ttft, 50)), "ttft_p99_ms": ms(percentile(ttft, 99)),
        "itl_p50_ms": ms(percentile(itl, 50)), "itl_p99_ms": ms(percentile(itl, 99)),
        "failed": sum(errors.values()), "errors": dict(errors),
        "tokens_sharing_an_event": merged,
        "requests_sent": len(results),
    }


def machine() -> str:
    import torch

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        name = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE).group(1).strip()
        flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.MULTILINE).group(1).split()
        have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    except (OSError, AttributeError):
        name, have = platform.processor() or platform.machine(), []
    try:
        import transformers
        hf = f", transformers {transformers.__version__}"
    except ImportError:
        hf = ""
    return f"{name}, {os.cpu_count()} cores ({', '.join(have) or 'no avx2'}), torch {torch.__version__}{hf}"


def fmt(v: float | None, digits: int = 0) -> str:
    return "–" if v is None else f"{v:,.{digits}f}"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="a run of `transformer lm train` (default: a `small` one, made here)")
    p.add_argument("--cache", type=Path, default=Path("/tmp/transformer-bench/serve_lm-small-bpe-512"),
                   help="where the default model is made and kept")
    p.add_argument("--train-steps", type=int, default=5, help="steps of the default model's training")
    p.add_argument("--modes", nargs="+", choices=[*MODES, "hf"], default=[*MODES, "hf"])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--seconds", type=float, default=60.0, help="measured time of a cell")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of load before a cell's window")
    p.add_argument("--prompt-tokens", type=int, nargs=2, default=[16, 256], metavar=("MIN", "MAX"))
    p.add_argument("--max-tokens", type=int, nargs=2, default=[16, 256], metavar=("MIN", "MAX"))
    p.add_argument("--temperature", type=float, default=1.0, help="of every request (0: greedy)")
    p.add_argument("--pool", type=int, default=2000, help="distinct requests, sent in turn")
    p.add_argument("--seed", type=int, default=0, help="of the request pool")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the servers and torch threads of HF "
                                               "(default: torch's default)")
    p.add_argument("--server-flags", default="", help="more flags for every server, e.g. '--kv-blocks 4096'")
    p.add_argument("--timeout", type=float, default=900.0, help="client timeout (s); servers get --timeout-s too")
    p.add_argument("--out", type=Path, help="also write the rows as JSON here")
    return p.parse_args()


def run_cells(args: argparse.Namespace, run, config: dict, pool: list[dict], concurrency: list[int]) -> list[dict]:
    """Every mode's cells, one server at a time; the rows, as they come also printed to stderr."""
    warm = dict(pool[0], max_tokens=16)  # one short request to each system before its cells
    extra = shlex.split(args.server_flags) + ["--timeout-s", f"{args.timeout:g}"]
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        print(f"  {row['mode']:10s} c={row['concurrency']:3d}: {row['tokens_per_s']:8.1f} tok/s, "
              f"{row['requests']} requests, failed {row['failed']} {row['errors'] or ''}; "
              f"{row['tokens_sharing_an_event']} tokens came in an event with the next",
              file=sys.stderr, flush=True)

    for mode in args.modes:
        if mode == "hf":
            model = hf_model(config)
            hf_closed_loop(model, 0.0, 0.0, [warm], args.temperature)  # one request: warm
            record(summarize("hf", 1, *hf_closed_loop(model, args.warmup, args.seconds, pool, args.temperature)))
            del model
            continue
        server = Server(run, MODES[mode] + extra, args.threads)
        try:
            first = asyncio.run(closed_loop(server.url, 1, 0.0, 0.0, [warm], args.temperature, args.timeout))[0][0]
            if first["error"]:
                print(f"  the {mode} server's warm-up request failed: {first['error']}", file=sys.stderr, flush=True)
            for c in concurrency:
                results, ws, we = asyncio.run(closed_loop(server.url, c, args.warmup, args.seconds, pool,
                                                          args.temperature, args.timeout))
                record(summarize(mode, c, results, ws, we))
        finally:
            code = server.stop()
            if code not in (0, -signal.SIGTERM):
                print(f"  the {mode} server exited with {code}; its stderr ends:\n{server.stderr()[-3000:]}",
                      file=sys.stderr, flush=True)
    return rows


def report(args: argparse.Namespace, run, config: dict, rows: list[dict], concurrency: list[int]) -> None:
    """The Markdown table of the rows, the machine, the model and the ratios; the JSON file with --out."""
    import torch

    threads = args.threads or torch.get_num_threads()
    shape = (f"{config['n_decoder_layers']} layers, d_model {config['d_model']}, {config['n_heads']} heads, "
             f"d_ff {config['d_ff']}, vocab {config['vocab_size']}, max_len {config['max_len']}, "
             f"{config['activation']}")
    print(f"\nmachine: {machine()}; torch threads: {threads}"
          f"{'' if args.threads else ' (default; OMP_NUM_THREADS of the servers not set)'}")
    print(f"model: {run} ({shape}); HF: GPT2LMHeadModel of that shape, random weights (pre-norm, learned positions)")
    print(f"requests: prompts {args.prompt_tokens[0]}-{args.prompt_tokens[1]} tokens of Tiny Shakespeare, "
          f"max_tokens {args.max_tokens[0]}-{args.max_tokens[1]} (ignore_eos), temperature {args.temperature:g}, "
          f"seed {args.seed}; {args.warmup:g} s warm-up, then {args.seconds:g} s measured per cell; tok/s counts the "
          f"tokens streamed within the window\n")
    print("| mode | concurrency | requests | generated tok/s | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) "
          "| ITL p99 (ms) | failed |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {LABELS[r['mode']]} | {r['concurrency']} | {r['requests']} | {fmt(r['tokens_per_s'], 1)} "
              f"| {fmt(r['ttft_p50_ms'])} | {fmt(r['ttft_p99_ms'])} | {fmt(r['itl_p50_ms'], 1)} "
              f"| {fmt(r['itl_p99_ms'], 1)} | {r['failed']} |")
    if "hf" in args.modes:
        print("\nHF generate runs one request at a time in the benchmark process, so only at concurrency 1.")
    rate = {(r["mode"], r["concurrency"]): r["tokens_per_s"] for r in rows}
    top = max(concurrency)
    if ("continuous", top) in rate:
        ratios = [f"continuous / {m} = {rate[('continuous', top)] / rate[(m, top)]:.2f}×"
                  for m in ("static", "single") if rate.get((m, top))]
        if ratios:
            print(f"\nAt concurrency {top}, generated tok/s: {', '.join(ratios)}")
    if args.out:
        args.out.write_text(json.dumps({"machine": machine(), "threads": threads, "model": str(run),
                                        "config": config, "args": {k: str(v) for k, v in vars(args).items()},
                                        "rows": rows}, indent=1))



def main() -> None:
    args = parse_args()
    import torch

    import transformer

    if args.threads:
        torch.set_num_threads(args.threads)
    run = args.model or make_model(args.cache, args.train_steps)
    config = json.loads((Path(run) / "config.json").read_text())["model"]
    tokenizer = transformer.load(str(run)).tokenizer
    pool = request_pool(tokenizer, args.pool, args.seed, tuple(args.prompt_tokens), tuple(args.max_tokens))
    concurrency = sorted(set(args.concurrency))

    rows = run_cells(args, run, config, pool, concurrency)
    report(args, run, config, rows, concurrency)


if __name__ == "__main__":
    main()
