"""The server's Prometheus metrics, in a `CollectorRegistry` of its own (so one process can hold several apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _request_metrics(r: CollectorRegistry) -> tuple[Counter, Histogram]:
    """Every server's: HTTP requests answered by endpoint and status, and their time by endpoint."""
    return (Counter("transformer_requests", "HTTP requests answered, by endpoint and status", ["endpoint", "status"],
                    registry=r),
            Histogram("transformer_request_seconds", "time to answer a request, by endpoint", ["endpoint"],
                      buckets=LATENCY_BUCKETS, registry=r))


class Metrics:
    """Requests by endpoint and status, their latency, batch sizes, queue depth and decoding speed."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests, self.latency = _request_metrics(r)
        self.batch_sentences = Histogram("transformer_batch_sentences", "sentences per decoded batch",
                                         buckets=BATCH_BUCKETS, registry=r)
        self.queue = Gauge("transformer_queue_sentences", "sentences waiting for a batch", registry=r)
        self.in_flight = Gauge("transformer_requests_in_flight", "translation requests accepted and not yet answered",
                               registry=r)
        self.tokens = Counter("transformer_generated_tokens", "target tokens generated (the output re-tokenized)",
                              registry=r)
        self.decode_seconds = Counter("transformer_decode_seconds", "time the model worker spent decoding",
                                      registry=r)
        self.tokens_per_second = Gauge("transformer_tokens_per_second",
                                       "target tokens per second of decoding, over the last batch", registry=r)

    def batch(self, sentences: int, tokens: int, seconds: float) -> None:
        """Record one decoded batch: its sentences, the target tokens it generated, and its time."""
        self.batch_sentences.observe(sentences)
        self.tokens.inc(tokens)
        self.decode_seconds.inc(seconds)
        self.tokens_per_second.set(tokens / seconds if seconds > 0 else 0.0)

    def text(self) -> bytes:
        """Every metric in Prometheus's text format."""
        return generate_latest(self.registry)


TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class LMMetrics:
    """A language model server's: requests, time to first token, inter-token latency, tokens/s, sequences, KV blocks."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests, self.latency = _request_metrics(r)
        self.first_token = Histogram("transformer_lm_time_to_first_token_seconds",
                                     "from a sequence's arrival to its first token", buckets=LATENCY_BUCKETS,
                                     registry=r)
        self.inter_token = Histogram("transformer_lm_inter_token_seconds", "between two tokens of a sequence",
                                     buckets=TOKEN_BUCKETS, registry=r)
        self.tokens = Counter("transformer_lm_generated_tokens", "tokens generated", registry=r)
        self.tokens_per_second = Gauge("transformer_lm_tokens_per_second", "tokens per second of the last step",
                                       registry=r)
        self.running = Gauge("transformer_lm_running_sequences", "sequences in the running batch", registry=r)
        self.waiting = Gauge("transformer_lm_waiting_sequences", "sequences waiting to join", registry=r)
        self.blocks_used = Gauge("transformer_lm_kv_blocks_used", "KV cache blocks held by sequences", registry=r)
        self.blocks_free = Gauge("transformer_lm_kv_blocks_free", "KV cache blocks free", registry=r)
        self.accepted = Gauge("transformer_requests_in_flight", "requests accepted and not yet answered", registry=r)

    def step(self, tokens: int, seconds: float, scheduler) -> None:
        """Record one scheduler step: the tokens it generated in `seconds`, and the scheduler's state after it."""
        self.tokens.inc(tokens)
        if tokens:
            self.tokens_per_second.set(tokens / seconds if seconds > 0 else 0.0)
        self.running.set(len(scheduler.running))
        self.waiting.set(len(scheduler.waiting))
        self.blocks_used.set(scheduler.pool.used)
        self.blocks_free.set(scheduler.pool.free)

    def text(self) -> bytes:
        return generate_latest(self.registry)
