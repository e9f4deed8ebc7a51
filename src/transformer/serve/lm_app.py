"""The language model server: the OpenAI completions API over continuous batching (`transformer serve --model LMRUN`).

Endpoints (the OpenAPI schema is at ``/docs``):

- ``POST /v1/completions``, as OpenAI defines it: ``prompt`` (a string or a list of strings),
  ``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``, ``n``, ``stream``,
  ``stream_options.include_usage``; and, as vLLM, ``top_k`` and ``ignore_eos``. The answer has
  ``choices[].text`` and ``finish_reason`` (``stop``: EOS or a stop string; ``length``:
  ``max_tokens``), and ``usage``. With ``stream``: server-sent events, one ``data: {...}`` chunk
  per piece of text (a token, or a few when a character or a stop string is incomplete), then
  ``data: [DONE]``.
- ``GET /v1/models``: the model. ``GET /health``: 200 once the model has generated its warm-up
  tokens. ``GET /metrics``: Prometheus text. ``GET /``: a page to type a prompt and watch the
  continuation stream in.

Errors are OpenAI's ``{"error": {"message", "type", "param", "code"}}``, ``code`` naming the limit:
400 the body is not JSON in UTF-8; 404 another model is named; 413 over ``max_prompt_tokens``,
``max_sequences`` (prompts × n) or ``max_body_bytes``; 422 a wrong field, ``max_tokens`` over its
cap, or prompt + max_tokens over the model's ``max_len``; 503 with ``Retry-After`` when
``max_queue`` requests are unanswered; 504 when the deadline (``timeout_s``) passes first (a
stream then ends with an error event). A client that disconnects frees its sequences at the next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import AfterValidator, BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from transformer.errors import UserError
from transformer.inference.lm import prompt_ids
from transformer.inference.scheduler import SamplingParams, Scheduler, SchedulerConfig
from transformer.model.models import DecoderOnly
from transformer.serve.app import RETRY_AFTER_S, BodyLimit, BodyTooLarge, unicode_texts
from transformer.serve.batcher import QueueFull
from transformer.serve.generator import Generator, Request as Pending
from transformer.serve.metrics import LMMetrics
from transformer.text.tokenizer import Tokenizer

ENDPOINTS = ("/v1/completions", "/v1/models", "/health", "/metrics", "/")
MAX_N = 16
MAX_STOPS = 4  # as OpenAI's API


@dataclass(frozen=True)
class LMServeConfig:
    timeout_s: float = 120.0  # a request's deadline, from its arrival
    max_queue: int = 128  # requests accepted and not yet answered
    max_tokens: int | None = None  # the most a request may ask for (None: the model's max_len)
    max_prompt_tokens: int | None = None  # (None: the model's max_len - 1)
    max_sequences: int = 64  # prompts × n per request
    max_body_bytes: int = 1 << 20


class ApiError(Exception):
    """An OpenAI-style error answer: `status`, message, the field or limit (`code`)."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers


def _error(status: int, message: str, code: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
            422: "invalid_request_error", 503: "server_busy", 504: "timeout"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}},
                        status_code=status, headers=headers)


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model: str | None = Field(None, description="the served model's name (GET /v1/models), or omitted")
    prompt: Annotated[str | list[str], AfterValidator(unicode_texts("prompt"))] = Field(
        description="a prompt, or a list of them")
    max_tokens: int = Field(16, ge=1, description="the most tokens to generate per choice")
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False, description="nucleus sampling's mass")
    top_k: int | None = Field(None, ge=-1, description="sample among the k most likely (-1 or omitted: all)")
    stop: str | list[str] | None = Field(None, description="up to 4 strings; the text ends before the first")
    seed: int | None = Field(None, description="the same seed, settings and prompt give the same text")
    n: int = Field(1, ge=1, le=MAX_N, description="choices per prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="go on past the end-of-text token (exactly max_tokens)")


def create_lm_app(model: DecoderOnly, tokenizer: Tokenizer, name: str, scheduling: SchedulerConfig,
                  cfg: LMServeConfig = LMServeConfig()) -> FastAPI:
    """The application serving the language model `model`; its model thread starts and stops with the app."""
    metrics = LMMetrics()
    scheduler = Scheduler(model, tokenizer, scheduling)
    generator = Generator(scheduler, metrics, cfg.max_queue)
    page = (resources.files("transformer.serve") / "static" / "lm.html").read_text(encoding="utf-8")
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        generator.start()
        yield
        await generator.stop()  # uvicorn has drained the requests in flight by now

    app = FastAPI(title="transformer serve (language model)", description=__doc__, lifespan=lifespan)
    app.state.generator, app.state.metrics = generator, metrics
    _install_handlers(app, cfg, metrics)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        if body.model is not None and body.model != name:
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves {name!r}",
                           "model_not_found")
        prompts = _prompts(body, tokenizer, model.cfg.max_len, cfg, scheduler)
        pending = _submit(generator, prompts, body, cfg.timeout_s)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": name}
        usage_of = _usage(sum(map(len, prompts)))  # each prompt once, however many choices (as OpenAI counts)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_events(pending, head, usage_of if include_usage else None, cfg.timeout_s),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            choices, tokens = await _collect(pending, request, cfg.timeout_s)
        finally:
            pending.cancel()  # nothing more is read: what still runs stops
        return JSONResponse({**head, "choices": choices, "usage": usage_of(tokens)})

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                             "owned_by": "transformer", "max_model_len": model.cfg.max_len}]}

    @app.get("/health")
    async def health() -> JSONResponse:
        status = ("loading" if not generator.ready.is_set()
                  else f"failed: {generator.failure}" if generator.failure else "ready")
        return JSONResponse({"status": status, "model": name}, status_code=200 if status == "ready" else 503)

    @app.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    return app


def _prompts(body: CompletionRequest, tokenizer: Tokenizer, max_len: int, cfg: LMServeConfig,
             scheduler: Scheduler) -> list[list[int]]:
    """The prompts' token ids; `ApiError` naming the first limit the request goes over."""
    texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not texts:
        raise ApiError(422, "prompt: give at least one prompt", "prompt")
    if len(texts) * body.n > cfg.max_sequences:
        raise ApiError(413, f"{len(texts)} prompt(s) × n={body.n} is {len(texts) * body.n} sequences, over the "
                            f"limit of {cfg.max_sequences} per request", "max_sequences")
    cap = cfg.max_tokens or max_len
    if body.max_tokens > cap:
        raise ApiError(422, f"max_tokens={body.max_tokens} is over the limit of {cap}", "max_tokens")
    prompt_cap = cfg.max_prompt_tokens or max_len - 1
    prompts = []
    for i, text in enumerate(texts, start=1):
        which = "the prompt" if len(texts) == 1 else f"prompt {i}"
        try:
            ids = prompt_ids(tokenizer, text)
        except UserError as e:
            raise ApiError(422, f"{which}: {e}", "prompt") from None
        if len(ids) > prompt_cap:
            raise ApiError(413, f"{which} has {len(ids)} tokens, over the limit of {prompt_cap}", "max_prompt_tokens")
        if len(ids) + body.max_tokens > max_len:
            raise ApiError(422, f"{which} has {len(ids)} tokens; with max_tokens={body.max_tokens} that is over the "
                                f"model's max_len of {max_len} positions", "max_len")
        blocks = scheduler.blocks_needed(len(ids), body.max_tokens)
        if blocks > scheduler.pool.n_blocks:
            raise ApiError(413, f"{which} with max_tokens={body.max_tokens} needs {blocks} KV blocks, more than the "
                                f"server's {scheduler.pool.n_blocks}", "kv_blocks")
        prompts.append(ids)
    return prompts


def _submit(generator: Generator, prompts: list[list[int]], body: CompletionRequest, timeout_s: float) -> Pending:
    """The request's sequences handed to the model thread; `ApiError` 503 when `max_queue` are unanswered."""
    try:
        return generator.submit(prompts, _params(body), body.n, timeout_s)
    except QueueFull:
        raise ApiError(503, "the server is busy: too many requests are unanswered; retry later", "max_queue",
                       {"Retry-After": str(RETRY_AFTER_S)}) from None


def _params(body: CompletionRequest) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    if len(stop) > MAX_STOPS:
        raise ApiError(422, f"stop: {len(stop)} strings, over the limit of {MAX_STOPS}", "stop")
    return SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature,
                          top_k=None if body.top_k in (None, -1, 0) else body.top_k,
                          top_p=None if body.top_p == 1 else body.top_p, seed=body.seed,
                          stop=tuple(s for s in stop if s), ignore_eos=body.ignore_eos)


def _usage(prompt_tokens: int):
    return lambda completion: {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                               "total_tokens": prompt_tokens + completion}


def _failed(finish: str, timeout_s: float) -> ApiError:
    if finish == "timeout":
        return ApiError(504, f"no answer within the deadline of {timeout_s:g} s", "timeout_s")
    return ApiError(500, "generation failed (the server's log says why)", None)


async def _collect(pending: Pending, request: Request, timeout_s: float) -> tuple[list[dict], int]:
    """Every choice's text and finish, in order, and the tokens generated; stops early if the client goes away."""
    texts = [""] * len(pending.sequences)
    finish: list[str | None] = [None] * len(pending.sequences)
    while pending.left:
        try:
            out = await asyncio.wait_for(pending.outputs.get(), 0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                pending.cancel()
                return [], 0
            continue
        i = out.sequence.index
        texts[i] += out.text
        if out.finish is not None:
            if out.finish not in ("stop", "length"):
                pending.cancel()
                raise _failed(out.finish, timeout_s)
            finish[i] = out.finish
            pending.left -= 1
    choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
               for i, (text, reason) in enumerate(zip(texts, finish))]
    return choices, sum(len(s.generated) for s in pending.sequences)


async def _events(pending: Pending, head: dict, usage_of, timeout_s: float) -> AsyncIterator[str]:
    """The server-sent events of a streamed completion; the request is given up however the stream ends.

    One event per choice for what its sequence gained since the last event: a token's text, or the text of
    the few tokens that came while this stream was waiting to send (so that a busy server sends fewer, larger
    events rather than falling behind).
    """
    try:
        while pending.left:
            outputs = [await pending.outputs.get()]
            while not pending.outputs.empty():
                outputs.append(pending.outputs.get_nowait())
            failed = next((o for o in outputs if o.finish not in (None, "stop", "length")), None)
            if failed is not None:
                error = _failed(failed.finish, timeout_s)
                yield _sse({"error": {"message": error.message, "type": "server_error", "param": None,
                                      "code": error.code}})
                break
            for index, (text, finish) in _merged(outputs).items():
                if text or finish:
                    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
                    yield _sse({**head, "choices": [choice]})
                pending.left -= finish is not None
        else:
            if usage_of is not None:
                yield _sse({**head, "choices": [], "usage": usage_of(sum(len(s.generated) for s in pending.sequences))})
        yield "data: [DONE]\n\n"
    finally:
        pending.cancel()  # nothing more is read: what still runs stops


def _merged(outputs: list) -> dict[int, tuple[str, str | None]]:
    """Outputs in order -> per choice index, its texts joined and its finish (if one came)."""
    merged: dict[int, tuple[str, str | None]] = {}
    for out in outputs:
        text, finish = merged.get(out.sequence.index, ("", None))
        merged[out.sequence.index] = (text + out.text, out.finish or finish)
    return merged


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class CountRequests:
    """ASGI middleware: every answer counted by endpoint and status, with its time (to the end of a stream)."""

    def __init__(self, app: ASGIApp, metrics: LMMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def sent(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


def _install_handlers(app: FastAPI, cfg: LMServeConfig, metrics: LMMetrics) -> None:
    """Errors as OpenAI's error objects; bodies over `max_body_bytes` refused; every answer counted."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.message, e.code, e.headers)

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, e: BodyTooLarge) -> JSONResponse:
        return _error(413, e.detail, "max_body_bytes")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        if any(err["type"] == "json_invalid" or tuple(err["loc"]) == ("body",) for err in errors):
            ctx = errors[0].get("ctx", {}).get("error", "no body")
            return _error(400, f"the body is not valid JSON ({ctx})")
        where = ".".join(str(part) for part in errors[0]["loc"][1:])
        return _error(422, f"{where}: {errors[0]['msg']}", where or None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = "the body is not valid JSON in UTF-8" if e.status_code == 400 else str(e.detail)
        return _error(e.status_code, message)

    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)
    app.add_middleware(CountRequests, metrics=metrics)
