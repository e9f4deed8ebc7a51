"""Continuous batching of a decoder-only language model over a paged KV cache.

Iteration-level scheduling (Orca: Yu et al., OSDI 2022) over a pool of KV blocks (vLLM: Kwon
et al., 2023). Every call of `Scheduler.step` is one iteration:

1. Sequences that were cancelled (a client went away, a deadline passed) leave, and their
   blocks go back to the pool.
2. Waiting sequences join, oldest first, while the pool can hold them whole (their prompt and
   `max_tokens`: admission reserves the blocks a sequence may need, so no running sequence is
   ever preempted), while fewer than `max_running` run, and while this iteration's prompt
   tokens stay within `max_prefill_tokens` (the first one always joins). Each joining
   prompt goes through the model in one call (its keys/values into its blocks) and
   samples its first token.
3. One decoding step for every running sequence together: one token each, each at its own
   position (`model.paged.PagedBatch`), sampled with the sequence's own settings and
   random generator. A sequence that ends (EOS, a stop string, `max_tokens`) leaves at
   once and its blocks go back.

Blocks are taken as a sequence grows. With a window r (cfg.attn_window), a sequence gives
back the blocks before its last r positions as it goes, so it never holds more than about
r + 1 positions (its reservation is capped to match).

`static=True` is the baseline that the translation server's batching amounts to: sequences
join only when none runs, so a batch runs until its longest sequence ends.

The scheduler is single-threaded: the server's model thread drives it (`serve.generator`).
Each step returns the text each sequence gained (`Output`), detokenized incrementally: a
piece waits while the text ends in an incomplete UTF-8 character or in the start of a
stop string.
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from transformer.inference.sampling import distribution, draw
from transformer.model.models import DecoderOnly
from transformer.model.paged import BlockPool, PagedBatch, PagedSequence
from transformer.text.tokenizer import Tokenizer

CONTEXT_TOKENS = 4  # tokens decoded before a new one, so that its text comes out as in the whole


@dataclass(frozen=True)
class SamplingParams:
    """One completion's settings (the OpenAI completions API's, and `top_k`, `ignore_eos`)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # None: a fresh random one
    stop: tuple[str, ...] = ()  # the text ends before the first of these it would contain
    ignore_eos: bool = False  # go on past EOS (exactly max_tokens tokens)


@dataclass(frozen=True)
class SchedulerConfig:
    kv_blocks: int  # blocks in the pool
    kv_block_tokens: int = 16  # positions per block
    max_running: int = 64  # sequences decoded together
    max_prefill_tokens: int = 2048  # prompt tokens one iteration processes (at least one prompt)
    static: bool = False  # join only when no sequence runs (the static-batching baseline)
    static_wait_s: float = 0.01  # static: how long the first waiting sequence waits for company


@dataclass(eq=False)
class Sequence:
    """One completion being generated: its prompt, settings and random generator, tokens and blocks so far."""

    prompt: list[int]
    params: SamplingParams
    index: int = 0  # its choice's index in its request
    deadline: float = float("inf")  # time.monotonic()
    arrived: float = field(default_factory=time.monotonic)
    generated: list[int] = field(default_factory=list)
    finish: str | None = None  # "stop", "length"; "cancelled", "timeout", "error"
    cancelled: bool = False  # set from any thread; the sequence leaves at the next step
    paged: PagedSequence = field(default_factory=PagedSequence)
    reserved: int = 0  # blocks set aside for it at admission
    text: str = ""  # the completion's text so far
    shown: str = ""  # what of it was delivered
    prefix: int = 0  # detokenization (`Scheduler._piece`): the prompt tokens from here are the context,
    context: str | None = None  # whose text this is
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class Output:
    """What one step gave a sequence: the text it gained (maybe empty), and why it ended (None: it goes on)."""

    sequence: Sequence
    text: str
    finish: str | None


class Scheduler:
    """Continuous batching of `model` (see the module): `add` sequences, call `step` while `busy`."""

    def __init__(self, model: DecoderOnly, tokenizer: Tokenizer, cfg: SchedulerConfig) -> None:
        self.model, self.tokenizer, self.cfg = model.eval(), tokenizer, cfg
        mc = model.cfg
        param = next(model.parameters())
        self.pool = BlockPool(mc.n_decoder_layers, cfg.kv_blocks, cfg.kv_block_tokens, mc.n_heads,
                              mc.d_model // mc.n_heads, param.dtype, param.device)
        self.window = mc.attn_window
        self.device = param.device
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._reserved = 0
        self._idle_since = time.monotonic()

    def blocks_needed(self, prompt_tokens: int, max_tokens: int) -> int:
        """The blocks a sequence may hold at once: its prompt and max_tokens, or with a window about r + 1 positions."""
        bt = self.cfg.kv_block_tokens
        positions = prompt_tokens + max_tokens
        if self.window is not None:  # the prompt whole (it is written at once), then the window and a block
            positions = min(positions, max(prompt_tokens, self.window + 1 + bt))
        return -(-positions // bt) + (1 if self.window is not None else 0)

    def add(self, sequence: Sequence) -> None:
        """Queue `sequence`; `ValueError` if the pool could never hold it."""
        need = self.blocks_needed(len(sequence.prompt), sequence.params.max_tokens)
        if need > self.pool.n_blocks:
            raise ValueError(f"the prompt and max_tokens need {need} KV blocks, more than the pool's "
                             f"{self.pool.n_blocks}")
        self.waiting.append(sequence)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[Output]:
        """One iteration: drop the cancelled, admit and prefill, one decoding step for all running."""
        outputs = self._drop_cancelled()
        with torch.no_grad():
            for sequence in self._admit():
                outputs.append(self._prefill(sequence))
            if self.running:
                outputs += self._decode()
                if not self.running:  # the batch has just ended: static batching waits for company from now
                    self._idle_since = time.monotonic()
        return outputs

    def release_all(self, finish: str) -> list[Output]:
        """End every sequence (after a failed step): their blocks back, each ended with `finish`."""
        everyone = self.running + list(self.waiting)
        self.waiting.clear()
        for s in self.running:
            self._leave(s)
        self.running = []
        for s in everyone:
            s.finish = finish
        return [Output(s, "", finish) for s in everyone]

    def _drop_cancelled(self) -> list[Output]:
        now, out = time.monotonic(), []
        for s in [s for s in self.running + list(self.waiting) if s.cancelled or now > s.deadline]:
            s.finish = "cancelled" if s.cancelled else "timeout"
            if s in self.running:
                self.running.remove(s)
                self._leave(s)
            else:
                self.waiting.remove(s)
            out.append(Output(s, "", s.finish))
        return out

    def _admit(self) -> list[Sequence]:
        """The waiting sequences that join now (their blocks reserved), oldest first."""
        if self.cfg.static and (self.running or (
                len(self.waiting) < self.cfg.max_running
                and time.monotonic() - max(self._idle_since, self.waiting[0].arrived if self.waiting else 0)
                < self.cfg.static_wait_s)):
            return []
        joined, tokens = [], 0
        while self.waiting and len(self.running) + len(joined) < self.cfg.max_running:
            s = self.waiting[0]
            need = self.blocks_needed(len(s.prompt), s.params.max_tokens)
            # (static batching forms its whole batch at once: none could join later)
            over_budget = joined and tokens + len(s.prompt) > self.cfg.max_prefill_tokens and not self.cfg.static
            if self._reserved + need > self.pool.n_blocks or over_budget:
                break
            self.waiting.popleft()
            s.reserved, self._reserved = need, self._reserved + need
            tokens += len(s.prompt)
            joined.append(s)
        return joined

    def _prefill(self, s: Sequence) -> Output:
        """The prompt of a joining sequence through the model (its keys/values into its blocks); its first token."""
        s.paged.grow(self.pool, len(s.prompt))
        batch = PagedBatch(self.pool, [s.paged], len(s.prompt), self.model.cfg.n_decoder_layers, self.window)
        logits = self.model(torch.tensor([s.prompt], device=self.device), batch)[:, -1]  # (1, V)
        batch.advance()
        self.running.append(s)
        return self._emit([s], logits)[0]

    def _decode(self) -> list[Output]:
        """One token for every running sequence, each at its own position."""
        rows = list(self.running)
        for s in rows:
            s.paged.grow(self.pool, 1)
        batch = PagedBatch(self.pool, [s.paged for s in rows], 1, self.model.cfg.n_decoder_layers, self.window)
        last = torch.tensor([[s.generated[-1]] for s in rows], device=self.device)  # (B, 1)
        logits = self.model(last, batch)[:, -1]  # (B, V)
        batch.advance()
        return self._emit(rows, logits)

    def _emit(self, rows: list[Sequence], logits: Tensor) -> list[Output]:
        """Sample each row's next token from logits (B, V) with its settings; the text it adds; who ends."""
        tokens = _sample_rows(rows, logits)
        outputs = []
        for s, token in zip(rows, tokens):
            if self.window is not None:  # blocks out of the window for good
                s.paged.forget_before(self.pool, s.paged.length - self.window)
            s.generated.append(token)
            text, finish = self._text(s, token)
            if finish is not None:
                s.finish = finish
                self.running.remove(s)
                self._leave(s)
            outputs.append(Output(s, text, finish))
        return outputs

    def _text(self, s: Sequence, token: int) -> tuple[str, str | None]:
        """The text `token` adds to s's completion (held back while it may be incomplete), and s's finish or None."""
        eos = token == self.model.cfg.eos_id and not s.params.ignore_eos
        last = eos or len(s.generated) >= s.params.max_tokens
        if not eos:
            s.text += self._piece(s, last)
        text = s.text
        for stop in s.params.stop:
            at = text.find(stop, max(0, len(s.shown) - len(stop)))
            if stop and at >= 0:
                return self._delta(s, text[:at]), "stop"
        if last:
            return self._delta(s, text), "stop" if eos else "length"
        hold = max((n for stop in s.params.stop for n in range(len(stop), 0, -1) if text.endswith(stop[:n])),
                   default=0)  # the end of the text that may be the start of a stop string
        return self._delta(s, text[: len(text) - hold]), None

    def _piece(self, s: Sequence, last: bool) -> str:
        """The text the new tokens add, from the generated tokens decoded after a few prompt tokens of context
        (so that the first word's leading space comes out as in the whole): O(generated) per token, not
        O(prompt + generated). Nothing while the text ends in an incomplete UTF-8 character (byte-fallback
        tokens), unless it is the `last`."""
        if s.context is None:
            s.prefix = len(s.prompt) - CONTEXT_TOKENS
            while s.prefix > 0 and not self.tokenizer.decode([s.prompt[s.prefix:]])[0].strip():
                s.prefix -= CONTEXT_TOKENS  # blank context: the decoder would strip the continuation's first space
            s.prefix = max(s.prefix, 0)
            s.context = self.tokenizer.decode([s.prompt[s.prefix:]])[0]
        now = self.tokenizer.decode([s.prompt[s.prefix:] + s.generated])[0]
        if now.endswith("\ufffd") and not last:
            return ""
        text = now[len(s.context):] if now.startswith(s.context) else self.tokenizer.decode([s.generated])[0]
        piece = text[len(s.text):] if text.startswith(s.text) else ""
        return piece

    @staticmethod
    def _delta(s: Sequence, text: str) -> str:
        """What `text` adds to what s has shown (nothing if it does not extend it)."""
        if len(text) <= len(s.shown) or not text.startswith(s.shown):
            return ""
        new, s.shown = text[len(s.shown):], text
        return new

    def _leave(self, s: Sequence) -> None:
        s.paged.release(self.pool)
        self._reserved -= s.reserved
        s.reserved = 0


def _sample_rows(rows: list[Sequence], logits: Tensor) -> list[int]:
    """Each row's next token from logits (B, V): greedy rows in one argmax; rows with the same settings in one
    batched draw, each with a uniform number from its own generator (what `sampling.pick` draws for it alone)."""
    tokens = logits.max(dim=-1).indices.tolist()  # the greedy rows' (the others are replaced)
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(rows):
        p = s.params
        if p.temperature != 0 and p.top_k != 1:
            groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(i)
    for (temperature, top_k, top_p), index in groups.items():
        probs = distribution(logits[index].float(), temperature, top_k, top_p)  # (N, V)
        uniform = torch.cat([torch.rand(1, 1, generator=rows[i].generator) for i in index]).to(probs.device)
        for i, token in zip(index, draw(probs, uniform).tolist()):
            tokens[i] = token
    return tokens
