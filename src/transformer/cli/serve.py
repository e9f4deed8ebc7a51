"""`transformer serve`: the flags of the HTTP service, and starting it.

The search flags (`--beam`, `--alpha`: the defaults of a request that gives none; `--max-len-a/b`,
`--min-len`, `--batch-size`: the most sentences in one batch; `--quantize`, `--compile`,
`--precision`), `--model`, `--engine` and `--device` are the shared ones (`transformer.cli.flags`).
"""

from __future__ import annotations

import argparse

from transformer.cli.common import number, say


def add_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    g.add_argument("--port", type=number(int, 0, 65535), default=8000,
                   help="TCP port (0: a free port, printed at start)")
    g.add_argument("--max-batch-tokens", type=number(int, 1), default=4096,
                   help="padded source tokens per batch (sentences x the longest, EOS included); "
                        "a longer sentence goes alone")
    g.add_argument("--max-wait-ms", type=number(float, 0), default=10.0,
                   help="how long a waiting sentence waits for others to share its batch, once the model is free")
    g.add_argument("--max-queue", type=number(int, 1), default=128,
                   help="requests accepted and not yet answered; one more gets 503 with Retry-After")
    g.add_argument("--max-chars", type=number(int, 1), default=1000, help="characters per sentence (else 413)")
    g.add_argument("--max-sentences", type=number(int, 1), default=64, help="sentences per request (else 413)")
    g.add_argument("--timeout-s", type=number(float, 0, above=True), default=30.0,
                   help="a request's deadline from its arrival (then 504)")


def serve(args: argparse.Namespace, engine) -> None:
    """Serve `engine` (a `transformer.serve.engine.Engine`) until SIGTERM or ^C."""
    from transformer.serve.app import ServeConfig, create_app
    from transformer.serve.batcher import BatchConfig
    from transformer.serve.server import bind, run

    batch = BatchConfig(max_batch_tokens=args.max_batch_tokens, max_batch_sentences=args.batch_size,
                        max_wait_ms=args.max_wait_ms, max_queue=args.max_queue)
    cfg = ServeConfig(batch=batch, max_chars=args.max_chars, max_sentences=args.max_sentences,
                      timeout_s=args.timeout_s, beam=args.beam, alpha=args.alpha)
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    say(f"serving {args.model} ({engine.kind}) on http://{host}:{port}/ (GET /health says ready after the warm-up)")
    run(create_app(engine, cfg), sock)
