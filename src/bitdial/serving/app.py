"""The OpenAI-compatible HTTP API (FastAPI): chat and text completions, models, health and metrics.

``create_app(engine, config)`` builds the app around a loaded :class:`~bitdial.runtime.engine.Engine`;
``bitdial serve`` runs it with uvicorn. Every error is a JSON body in OpenAI's schema with a 4xx status:
nothing a client sends can make the server answer 500 or stop. See ``docs/serving.md``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from bitdial.errors import BitdialError
from bitdial.runtime.generate import SamplingParams
from bitdial.serving import metrics as _metrics
from bitdial.serving.errors import ApiError, bad_request, error_body, from_validation_error
from bitdial.serving.precision import PrecisionGovernor, PrecisionPlan, backend_for
from bitdial.serving.schemas import ChatCompletionRequest, CompletionRequest, _GenerationBody
from bitdial.serving.worker import GenerationWorker, Job, QueueFull, ShuttingDown

log = logging.getLogger(__name__)


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bitdial")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


_version = _package_version()
_NOT_UNICODE = "The text is not valid Unicode (it holds a lone surrogate such as \\ud800)"
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


@dataclass
class ServerConfig:
    """Limits and identity of one server."""

    model_id: str = "bitdial"
    api_key: str | None = None  # None: no authentication
    max_queue: int = 16  # requests waiting behind the running one; more are refused with 429
    max_prompt_tokens: int | None = None  # None: the model's context minus one
    max_tokens_limit: int = 1024  # the largest max_tokens a request may ask for
    max_body_bytes: int = 4 << 20
    disconnect_poll_s: float = 0.2  # how often a waiting request checks that its client is still there

    def validate(self) -> None:
        if self.max_queue < 0:
            raise BitdialError(f"--max-queue must be >= 0, got {self.max_queue}")
        if self.max_tokens_limit < 1:
            raise BitdialError(f"--max-tokens-limit must be >= 1, got {self.max_tokens_limit}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise BitdialError(f"--max-prompt-tokens must be >= 1, got {self.max_prompt_tokens}")
        if self.api_key is not None and not self.api_key.strip():
            raise BitdialError("the API key is empty; give a non-empty --api-key or leave it out")


class ClientGone(Exception):
    """The client closed the connection while its request waited or ran."""


# --------------------------------------------------------------------------------------- job handle
class JobHandle:
    """Bridges a :class:`Job` on the worker thread to the request's event loop."""

    def __init__(self, worker: GenerationWorker, prompt_ids: list[int], params: SamplingParams,
                 plan: PrecisionPlan) -> None:
        self.worker = worker
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.job = Job(prompt_ids, params, plan, self._sink)
        self.finished = False

    def _sink(self, kind: str, payload: Any) -> None:  # worker thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))

    def submit(self) -> None:
        try:
            self.worker.submit(self.job)
        except QueueFull as e:
            raise ApiError(429, f"The server is busy: {e}. Retry later.", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except ShuttingDown as e:
            raise ApiError(503, f"The server is shutting down: {e}", type="server_error",
                           code="shutting_down") from None

    async def stream(self, request: Request, poll_s: float) -> AsyncIterator[tuple[str, Any]]:
        """The job's events until it ends; raises :class:`ClientGone` if the client disconnects."""
        last_check = time.monotonic()
        while True:
            try:
                kind, payload = await asyncio.wait_for(self.events.get(), timeout=poll_s)
            except asyncio.TimeoutError:
                kind, payload = "", None
            now = time.monotonic()
            if now - last_check >= poll_s:
                last_check = now
                if await request.is_disconnected():
                    raise ClientGone()
            if not kind:
                continue
            if kind in ("done", "error", "dropped"):
                self.finished = True
            yield kind, payload
            if self.finished:
                return

    def abandon(self) -> None:
        """Cancel the job unless it already ended (the response is gone)."""
        if not self.finished:
            self.finished = True
            self.worker.cancel(self.job)


# -------------------------------------------------------------------------------------------- helpers
def _now() -> int:
    return int(time.time())


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"The request body is {int(length)} bytes; this server accepts at most {limit}",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"The request body exceeds {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        raise bad_request("The request body is empty: send a JSON object")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"The request body is not valid JSON: {e}") from None
    except RecursionError:
        raise bad_request("The request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise bad_request(f"The request body must be a JSON object, got a JSON {type(data).__name__}")
    return data


def _parse(model: type[_GenerationBody], data: dict[str, Any]) -> Any:
    try:
        req = model.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e) from None
    req.check_supported()
    return req


def _usage(job: Job) -> dict[str, int]:
    r = job.result
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "total_tokens": r.prompt_tokens + r.completion_tokens}


def _finish_reason(job: Job) -> str:
    return job.result.finish_reason if job.result.finish_reason in ("stop", "length") else "stop"


# ------------------------------------------------------------------------------------------------ app
def create_app(engine: Any, config: ServerConfig | None = None, *,
               governor: PrecisionGovernor | None = None) -> FastAPI:
    """The API around a loaded engine. The generation thread starts with the app (its lifespan)."""
    cfg = config or ServerConfig()
    cfg.validate()
    gov = governor or PrecisionGovernor(backend_for(engine))
    metrics = _metrics.Metrics(cfg.model_id, {"version": _version, "precision": gov.backend.kind})
    worker = GenerationWorker(engine, gov, metrics, max_queue=cfg.max_queue)
    context = int(engine.model.config.max_seq_len)
    vocab = int(engine.model.config.vocab_size)
    max_prompt = min(cfg.max_prompt_tokens or context - 1, context - 1)
    created = _now()
    metrics.gauge("bitdial_queue_depth", "Requests waiting for the model.", lambda: worker.queue_depth)
    metrics.gauge("bitdial_queue_capacity", "The most requests that may wait (--max-queue).", lambda: cfg.max_queue)
    metrics.gauge("bitdial_busy", "1 while a generation runs.", lambda: int(worker.busy))
    metrics.gauge("bitdial_up", "1 while the generation thread is alive.", lambda: int(worker.alive))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker.start()
        log.info("serving %s (%s precision, targets %s), queue %d", cfg.model_id, gov.backend.kind,
                 gov.backend.targets or "-", cfg.max_queue)
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="bitdial", version=_version, lifespan=lifespan,
                  description="OpenAI-compatible API of one bitdial model (adaptive precision on CPUs).")
    app.state.engine, app.state.worker, app.state.metrics, app.state.governor = engine, worker, metrics, gov
    app.state.config = cfg

    # ---- errors: always OpenAI's schema ---------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(f"Invalid request: {e.errors()[0].get('msg', e)}"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        msg = {404: f"Unknown path {request.url.path}; see /v1/models, /v1/chat/completions, /v1/completions",
               405: f"Method {request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return JSONResponse(error_body(msg, code=str(e.status_code)), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error while serving a request")
        return JSONResponse(error_body("Internal server error; the server log has the details.",
                                       type="server_error"), status_code=500)

    app.add_middleware(_CountRequests, metrics=metrics)

    # ---- authentication -----------------------------------------------------------------------------
    def require_key(request: Request) -> None:
        if cfg.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), cfg.api_key.encode()):
            raise ApiError(401, "Invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(require_key)]

    # ---- info endpoints -------------------------------------------------------------------------------
    def model_card() -> dict[str, Any]:
        return {"id": cfg.model_id, "object": "model", "created": created, "owned_by": "bitdial",
                "bitdial": {"source": str(getattr(engine, "source", "")), "context_length": context,
                            **gov.describe()}}

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = worker.alive
        return JSONResponse({"status": "ok" if ok else "error", "model": cfg.model_id,
                             "queue_depth": worker.queue_depth, "max_queue": cfg.max_queue,
                             "busy": worker.busy}, status_code=200 if ok else 503)

    @app.get("/v1/models", dependencies=auth)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != cfg.model_id:
            raise ApiError(404, f"The model '{model_id}' does not exist; this server serves '{cfg.model_id}'",
                           param="model", code="model_not_found")
        return model_card()

    @app.get("/metrics", dependencies=auth)
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type=_metrics.CONTENT_TYPE)

    # ---- generation ------------------------------------------------------------------------------------
    def sampling(req: _GenerationBody, n_prompt: int, default_max: int | None, prompt_param: str) -> SamplingParams:
        if n_prompt == 0:
            raise bad_request("The prompt is empty: give at least one token", param=prompt_param)
        if n_prompt > max_prompt:
            raise bad_request(f"The prompt is {n_prompt} tokens long; this server accepts at most {max_prompt} "
                              f"prompt tokens (the model's context is {context})", param=prompt_param,
                              code="context_length_exceeded")
        room = context - n_prompt
        asked = req.requested_max_tokens
        if asked is not None and asked > cfg.max_tokens_limit:
            raise bad_request(f"max_tokens = {asked} exceeds this server's limit of {cfg.max_tokens_limit}",
                              param="max_tokens")
        if asked is not None and asked > room:
            raise bad_request(f"The prompt ({n_prompt} tokens) plus max_tokens ({asked}) exceeds the model's "
                              f"context of {context} tokens; lower max_tokens to at most {room}",
                              param="max_tokens", code="context_length_exceeded")
        max_tokens = asked if asked is not None else min(default_max or cfg.max_tokens_limit, cfg.max_tokens_limit, room)
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_k=req.top_k or 0,
            top_p=1.0 if req.top_p is None else req.top_p,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            stop=[s for s in req.stop_list if s],
            stop_ids=[] if req.ignore_eos else None,
            seed=req.seed,
        )

    async def run(request: Request, req: _GenerationBody, prompt_ids: list[int], params: SamplingParams,
                  kind: str, echo: str = "") -> Response:
        plan = gov.plan(req.bitdial)
        handle = JobHandle(worker, prompt_ids, params, plan)
        handle.submit()
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        obj = "chat.completion" if kind == "chat" else "text_completion"
        ts = _now()
        base = {"id": rid, "object": obj + (".chunk" if kind == "chat" else ""), "created": ts,
                "model": cfg.model_id, "system_fingerprint": f"bitdial-{_version}"}

        def chunk(text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            if kind == "chat":
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {**base, "choices": [choice]}

        if req.stream:
            include_usage = req.include_usage

            async def sse() -> AsyncIterator[str]:
                try:
                    if kind == "chat":
                        yield _sse(chunk("", None, role=True))
                    elif echo:
                        yield _sse(chunk(echo, None))
                    async for ev, payload in handle.stream(request, cfg.disconnect_poll_s):
                        if ev == "text":
                            yield _sse(chunk(payload, None))
                        elif ev == "done":
                            final = chunk(None if kind == "chat" else "", _finish_reason(handle.job))
                            final["bitdial"] = payload
                            yield _sse(final)
                            if include_usage:
                                yield _sse({**base, "choices": [], "usage": _usage(handle.job), "bitdial": payload})
                            yield "data: [DONE]\n\n"
                        elif ev == "error":
                            yield _sse(_generation_error(payload))
                            yield "data: [DONE]\n\n"
                        elif ev == "dropped":
                            yield _sse(error_body("The request was dropped before it ran (server shutting "
                                                  "down)", type="server_error"))
                            yield "data: [DONE]\n\n"
                except ClientGone:
                    log.info("client of %s disconnected", rid)
                finally:
                    handle.abandon()  # closed early: the client went away

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        try:
            async for ev, payload in handle.stream(request, cfg.disconnect_poll_s):
                if ev == "error":
                    e = _generation_error(payload)
                    status = 400 if isinstance(payload, ValueError) else 500
                    return JSONResponse(e, status_code=status)
                if ev == "dropped":
                    return JSONResponse(error_body("The request was dropped before it ran (server shutting "
                                                   "down)", type="server_error"), status_code=503)
        except ClientGone:
            log.info("client of %s disconnected", rid)
            return Response(status_code=499)
        finally:
            handle.abandon()
        job = handle.job
        text = echo + job.result.text
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": _finish_reason(job)}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": _finish_reason(job)}
        return JSONResponse({"id": rid, "object": obj, "created": ts, "model": cfg.model_id,
                             "system_fingerprint": f"bitdial-{_version}", "choices": [choice],
                             "usage": _usage(job), "bitdial": job.report})

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request) -> Response:
        req: ChatCompletionRequest = _parse(ChatCompletionRequest, await _read_json(request, cfg.max_body_bytes))
        messages = req.chat_messages()
        try:
            ids = await run_in_threadpool(engine.tokenizer.encode_chat, messages)
        except (ValueError, BitdialError) as e:
            raise bad_request(f"The messages cannot be rendered with the model's chat template: {e}",
                              param="messages") from None
        except TypeError:  # the tokenizer refuses strings that are not valid Unicode
            raise bad_request(_NOT_UNICODE, param="messages") from None
        params = sampling(req, len(ids), None, "messages")
        return await run(request, req, ids, params, "chat")

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request) -> Response:
        req: CompletionRequest = _parse(CompletionRequest, await _read_json(request, cfg.max_body_bytes))
        prompt = req.single_prompt()
        if isinstance(prompt, str):
            try:
                ids = await run_in_threadpool(engine.tokenizer.encode, prompt)
            except (TypeError, ValueError):
                raise bad_request(_NOT_UNICODE, param="prompt") from None
            echo = prompt if req.echo else ""
        else:
            bad = next((t for t in prompt if not 0 <= t < vocab), None)
            if bad is not None:
                raise bad_request(f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})", param="prompt")
            ids = prompt
            echo = engine.tokenizer.decode(ids) if req.echo else ""
        params = sampling(req, len(ids), COMPLETION_DEFAULT_MAX_TOKENS, "prompt")
        return await run(request, req, ids, params, "completion", echo)

    return app


class _CountRequests:
    """Pure ASGI middleware (it does not buffer streams): counts responses by endpoint and status."""

    def __init__(self, app: Any, metrics: _metrics.Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")
        status = 500

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.request(endpoint, status)


def _generation_error(e: Any) -> dict[str, Any]:
    if isinstance(e, ValueError):
        return error_body(str(e))
    return error_body(f"The generation failed: {type(e).__name__}; the server log has the details.",
                      type="server_error")
