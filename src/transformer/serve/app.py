"""The FastAPI application: translation over HTTP with dynamic batching, limits, metrics and a web page.

Endpoints (the OpenAPI schema is at ``/docs`` and ``/openapi.json``):

- ``POST /translate`` ``{"text": str | [str], "beam": int?, "alpha": float?}`` ->
  ``{"translations": [str], "model": str, "elapsed_ms": float}``, in the order of the input.
- ``POST /attention`` ``{"text": str}`` -> the cross-attention heatmap of one sentence (last decoder layer,
  mean of the heads), for the page; 501 where the engine cannot show attention.
- ``GET /health``: 200 ``{"status": "ready"}`` once the model has decoded its warm-up sentence, else 503.
- ``GET /info``: the model, the engine, the defaults and the limits. ``GET /metrics``: Prometheus text.
- ``GET /``: the page (type, press Translate, read).

Every error is JSON ``{"error": message, "limit": name or null}``: 400 the body is not JSON in UTF-8;
413 a limit on size (``max_sentences``, ``max_chars``, ``max_body_bytes``: a chunked body is counted as it
arrives, ``model_max_tokens``); 422 a request of the wrong shape (a number not finite, a lone surrogate);
503 with ``Retry-After`` when ``max_queue`` requests are already waiting, at once; 504 when ``timeout_s``
passes first; 500 if decoding fails (the worker goes on).
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import AfterValidator, BaseModel, Field
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from transformer.errors import UserError
from transformer.serve.batcher import BatchConfig, Batcher, DeadlineExceeded, DecodingFailed, QueueFull
from transformer.serve.engine import Engine
from transformer.serve.metrics import Metrics

MAX_BEAM = 16  # a larger beam would let one request take the worker for a long time
RETRY_AFTER_S = 1
ENDPOINTS = ("/translate", "/attention", "/health", "/info", "/metrics", "/")


@dataclass(frozen=True)
class ServeConfig:
    batch: BatchConfig = field(default_factory=BatchConfig)
    max_chars: int = 1000  # characters per sentence
    max_sentences: int = 64  # sentences per request
    timeout_s: float = 30.0  # a request's deadline, from its arrival
    beam: int = 4  # the defaults of a request that gives none (the paper's)
    alpha: float = 0.6

    @property
    def max_body_bytes(self) -> int:
        """The largest body a request within the limits can have: every character written as a JSON escape."""
        return self.max_sentences * (12 * self.max_chars + 8) + 4096


def unicode_texts(noun: str):
    """A pydantic validator of a str or a list of str: each must be Unicode text (JSON can carry lone
    surrogates, "\\ud800", which are not); the error names "the NOUN" or "NOUN i" and where."""

    def check(text: str | list[str]) -> str | list[str]:
        for i, line in enumerate([text] if isinstance(text, str) else text, start=1):
            try:
                line.encode("utf-8")
            except UnicodeEncodeError as e:
                which = f"the {noun}" if isinstance(text, str) else f"{noun} {i}"
                where = f"(U+{ord(line[e.start]):04X}) at character {e.start + 1}"
                raise PydanticCustomError("unicode", f"{which} is not Unicode text: a lone surrogate {where}") from None
        return text

    return check


_unicode = unicode_texts("sentence")


class TranslateRequest(BaseModel):
    text: Annotated[str | list[str], AfterValidator(_unicode)] = Field(
        description="one sentence, or a list of sentences")
    beam: int | None = Field(None, ge=1, le=MAX_BEAM, description="beam size, 1 = greedy (default: the server's)")
    alpha: float | None = Field(None, ge=0, le=10, allow_inf_nan=False, description="length penalty ((5+|Y|)/6)^alpha")


class TranslateResponse(BaseModel):
    translations: list[str] = Field(description="one per sentence, in the order of the request")
    model: str
    elapsed_ms: float


class AttentionRequest(BaseModel):
    text: Annotated[str, AfterValidator(_unicode)] = Field(description="one sentence")
    beam: int | None = Field(None, ge=1, le=MAX_BEAM)
    alpha: float | None = Field(None, ge=0, le=10, allow_inf_nan=False)


class AttentionResponse(BaseModel):
    translation: str
    source: list[str] = Field(description="source pieces, then </s>")
    target: list[str] = Field(description="target pieces, then </s>")
    weights: list[list[float]] = Field(description="(target, source): the last decoder layer's cross-attention, "
                                                   "mean of the heads; each row sums to 1")
    layer: int
    model: str


class Health(BaseModel):
    status: str = Field(description="ready, loading or failed: ...")
    model: str


class Limits(BaseModel):
    max_chars: int
    max_sentences: int
    max_beam: int
    timeout_s: float
    max_queue: int


class Info(BaseModel):
    model: str
    engine: str
    beam: int
    alpha: float
    attention: bool = Field(description="whether POST /attention works with this engine")
    limits: Limits


class ErrorBody(BaseModel):
    error: str
    limit: str | None = Field(None, description="the limit that was hit, if any")


class ApiError(Exception):
    """An answer other than 200: `status`, a message, and the limit that was hit."""

    def __init__(self, status: int, message: str, limit: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.limit, self.headers = status, message, limit, headers


class BodyTooLarge(HTTPException):
    """A body over `max_body_bytes`: an HTTPException, as FastAPI re-raises those from reading a body (not 400)."""

    def __init__(self, message: str) -> None:
        super().__init__(413, message)


class BodyLimit:
    """ASGI middleware: `BodyTooLarge` from reading a body of more than `limit` bytes, whatever its framing.

    A Content-Length over the limit is refused before a byte is read; other bodies (chunked ones
    declare no length) are counted as they arrive, and reading stops at the chunk that goes over.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        received = 0

        async def counted() -> Message:
            nonlocal received
            if declared.isdigit() and int(declared) > self.limit:
                raise BodyTooLarge(f"the body has {int(declared)} bytes, over the limit of {self.limit}")
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyTooLarge(f"the body has more than {self.limit} bytes, over the limit")
            return message

        await self.app(scope, counted, send)


ERRORS = {code: {"model": ErrorBody} for code in (400, 413, 422, 500, 503, 504)}


def create_app(engine: Engine, cfg: ServeConfig = ServeConfig()) -> FastAPI:
    """The application serving `engine`; its batcher starts and stops with the app's lifespan."""
    metrics = Metrics()
    batcher = Batcher(engine, cfg.batch, metrics)
    page = (resources.files("transformer.serve") / "static" / "index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()  # uvicorn has drained the requests in flight by now

    app = FastAPI(title="transformer serve", description=__doc__, lifespan=lifespan)
    app.state.batcher, app.state.metrics = batcher, metrics
    _install_handlers(app, cfg, metrics)

    @app.post("/translate", response_model=TranslateResponse, responses=ERRORS)
    async def translate(body: TranslateRequest) -> TranslateResponse:
        start = time.perf_counter()
        lines = [body.text] if isinstance(body.text, str) else body.text
        if not lines:
            raise ApiError(422, "text: give at least one sentence")
        lengths = _check(engine, cfg, lines)
        out = await _queued(batcher.translate(lines, lengths, body.beam or cfg.beam, _alpha(body, cfg), cfg.timeout_s),
                            cfg.timeout_s)
        return TranslateResponse(translations=out, model=engine.name, elapsed_ms=_ms(start))

    @app.post("/attention", response_model=AttentionResponse, responses=ERRORS | {501: {"model": ErrorBody}})
    async def attention(body: AttentionRequest) -> AttentionResponse:
        _check(engine, cfg, [body.text])
        if not body.text.strip():
            raise ApiError(422, "text: the sentence is empty")
        beam, alpha = body.beam or cfg.beam, _alpha(body, cfg)
        heatmap = await _queued(batcher.call(lambda: engine.heatmap(body.text, beam, alpha), cfg.timeout_s),
                                cfg.timeout_s)
        if heatmap is None:
            raise ApiError(501, f"the {engine.kind} engine does not show attention")
        return AttentionResponse(**vars(heatmap), model=engine.name)

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health() -> JSONResponse:
        status = ("loading" if not batcher.ready.is_set()
                  else f"failed: {batcher.failure}" if batcher.failure else "ready")
        return JSONResponse({"status": status, "model": engine.name}, status_code=200 if status == "ready" else 503)

    @app.get("/info", response_model=Info)
    async def info() -> Info:
        limits = Limits(max_chars=cfg.max_chars, max_sentences=cfg.max_sentences, max_beam=MAX_BEAM,
                        timeout_s=cfg.timeout_s, max_queue=cfg.batch.max_queue)
        return Info(model=engine.name, engine=engine.kind, beam=cfg.beam, alpha=cfg.alpha,
                    attention=engine.has_heatmap, limits=limits)

    @app.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    return app


def _alpha(body: TranslateRequest | AttentionRequest, cfg: ServeConfig) -> float:
    return cfg.alpha if body.alpha is None else body.alpha


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


def _check(engine: Engine, cfg: ServeConfig, lines: list[str]) -> list[int]:
    """The source lengths of `lines` in tokens; `ApiError` 413 naming the first limit a request goes over."""
    if len(lines) > cfg.max_sentences:
        raise ApiError(413, f"{len(lines)} sentences, over the limit of {cfg.max_sentences} per request",
                       "max_sentences")
    for i, line in enumerate(lines, start=1):
        if len(line) > cfg.max_chars:
            raise ApiError(413, f"sentence {i} has {len(line)} characters, over the limit of {cfg.max_chars}",
                           "max_chars")
    lengths = engine.lengths(lines)
    for i, n in enumerate(lengths, start=1):
        if n > engine.max_source_tokens:
            raise ApiError(413, f"sentence {i} has {n} tokens, over the model's limit of {engine.max_source_tokens}",
                           "model_max_tokens")
    return lengths


async def _queued(work, timeout_s: float):
    """The result of the batcher's coroutine `work`, with its failures as HTTP answers."""
    try:
        return await work
    except QueueFull:
        raise ApiError(503, "the server is busy: too many requests are waiting; retry later", "max_queue",
                       {"Retry-After": str(RETRY_AFTER_S)}) from None
    except DeadlineExceeded:
        raise ApiError(504, f"no answer within the deadline of {timeout_s:g} s", "timeout_s") from None
    except UserError as e:
        raise ApiError(422, str(e)) from None
    except DecodingFailed as e:
        raise ApiError(500, f"decoding failed: {e}") from None


def _install_handlers(app: FastAPI, cfg: ServeConfig, metrics: Metrics) -> None:
    """Errors as JSON `ErrorBody`; metrics of every request; bodies over `max_body_bytes` refused (`BodyLimit`)."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse({"error": e.message, "limit": e.limit}, status_code=e.status, headers=e.headers)

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, e: BodyTooLarge) -> JSONResponse:
        return JSONResponse({"error": e.detail, "limit": "max_body_bytes"}, status_code=413)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        if any(err["type"] == "json_invalid" or tuple(err["loc"]) == ("body",) for err in errors):
            ctx = errors[0].get("ctx", {}).get("error", "no body")
            return JSONResponse({"error": f"the body is not valid JSON ({ctx})", "limit": None}, status_code=400)
        where = ".".join(str(part) for part in errors[0]["loc"][1:])
        # without the inputs: JSON cannot hold some of them (NaN, a lone surrogate)
        detail = [{key: value for key, value in err.items() if key != "input"} for err in errors]
        return JSONResponse({"error": f"{where}: {errors[0]['msg']}", "limit": None,
                             "detail": jsonable_encoder(detail)}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = "the body is not valid JSON in UTF-8" if e.status_code == 400 else str(e.detail)
        return JSONResponse({"error": message, "limit": None}, status_code=e.status_code, headers=e.headers)

    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)  # added before `count`, so inside it: 413s are counted

    @app.middleware("http")
    async def count(request: Request, call_next):
        start = time.perf_counter()
        endpoint = request.url.path if request.url.path in ENDPOINTS else "other"
        response = await call_next(request)
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        return response
