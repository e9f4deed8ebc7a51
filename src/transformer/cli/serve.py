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
    g = p.add_argument_group("language model server (--model a decoder-only run; --batch-size: sequences decoded "
                             "together)")
    g.add_argument("--batching", default="continuous", choices=["continuous", "static"],
                   help="continuous: sequences join and leave the running batch at every step; static: a batch "
                        "runs until its longest sequence ends (the baseline)")
    g.add_argument("--kv-block-tokens", type=number(int, 1), default=16, help="positions per KV cache block")
    g.add_argument("--kv-blocks", type=number(int, 1),
                   help="KV cache blocks in the pool, shared by the running sequences (default: --batch-size "
                        "sequences of the model's max_len, at most 1 GiB)")
    g.add_argument("--max-new-tokens", type=number(int, 1),
                   help="the most tokens a request may ask for (default: the model's max_len)")
    g.add_argument("--max-sequences", type=number(int, 1), default=64,
                   help="sequences per request: prompts x n (else 413)")


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


KV_BUDGET_BYTES = 1 << 30  # the default pool's ceiling


def serve_lm(args: argparse.Namespace, lm, name: str) -> None:
    """Serve the language model `lm` (a `transformer.api.text.LanguageModel`) until SIGTERM or ^C."""
    from transformer.inference.scheduler import SchedulerConfig
    from transformer.serve.lm_app import LMServeConfig, create_lm_app
    from transformer.serve.server import bind, run

    cfg = lm.config
    blocks = args.kv_blocks or default_kv_blocks(cfg, args.batch_size, args.kv_block_tokens,
                                                 next(lm.model.parameters()).element_size())
    scheduling = SchedulerConfig(kv_blocks=blocks, kv_block_tokens=args.kv_block_tokens, max_running=args.batch_size,
                                 static=args.batching == "static", static_wait_s=args.max_wait_ms / 1000)
    serving = LMServeConfig(timeout_s=args.timeout_s, max_queue=args.max_queue, max_tokens=args.max_new_tokens,
                            max_sequences=args.max_sequences)
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    say(f"serving {args.model} (language model, {args.batching} batching, {blocks} KV blocks of "
        f"{args.kv_block_tokens}) on http://{host}:{port}/ (GET /health says ready after the warm-up)")
    run(create_lm_app(lm.model, lm.tokenizer, name, scheduling, serving), sock)


def default_kv_blocks(cfg, sequences: int, block_tokens: int, element_bytes: int) -> int:
    """Blocks for `sequences` sequences of the model's max_len, within `KV_BUDGET_BYTES` (keys and values, all
    layers)."""
    per_block = 2 * cfg.n_decoder_layers * block_tokens * cfg.d_model * element_bytes
    wanted = sequences * -(-cfg.max_len // block_tokens)
    return max(1, min(wanted, KV_BUDGET_BYTES // per_block))
