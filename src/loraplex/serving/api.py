"""The OpenAI-compatible HTTP API: /v1/models, /v1/chat/completions, /v1/completions (streamed or not).

Every error is a JSON body in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, never a traceback;
what a request may hold is in `schema`.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import traceback
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .engine import BASE, Busy, Engine, Job, WorkerStopped
from .playground import playground_html
from .router import DEFAULT_THRESHOLD, ServedRouter
from .schema import (ApiError, ChatRequest, CompletionRequest, decode_body, is_json_content_type, parse_request,
                     text_of)

AUTO = "auto"
DISCONNECT_POLL_S = 0.25  # how often a request checks that its client is still there (uvicorn does not say)
log = logging.getLogger("loraplex.serving")


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status, headers=headers)


def internal_error(where: str, detail: str) -> ApiError:
    """A 500 that says only "internal error" and an id; the detail goes to the server's log under that id."""
    ident = uuid.uuid4().hex[:12]
    log.error("internal error %s in %s: %s", ident, where, detail)
    return ApiError(500, f"internal error (id {ident}; the server's log has the details)", type="server_error",
                    code="internal_error")


async def _read_json(request: Request, limit: int) -> dict:
    if not is_json_content_type(request.headers.get("content-type", "")):
        raise ApiError(415, "the request body must be sent as Content-Type: application/json",
                       code="unsupported_media_type")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the request body is {int(length)} bytes; the limit is {limit}", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
    return decode_body(bytes(body))


@dataclass
class AppState:
    """What every route reads: the engine, the `model: auto` router (None without it) and the request limits."""

    engine: Engine
    router: ServedRouter | None
    requests: _Requests
    max_body_bytes: int


def app(run_dir: str | Path, merged: tuple | list = (), api_key: str | None = None, max_batch_size: int = 8,
        max_tokens_limit: int = 1024, max_body_bytes: int = 1 << 20, max_queue: int = 64,
        batch_wait_s: float = 0.005, auto_route: bool = True, route_threshold: float = DEFAULT_THRESHOLD) -> FastAPI:
    """The server as an ASGI app over the run's base, its adapters and the `merged` model folders.

    `max_tokens_limit`: the most tokens one request may ask for; `max_body_bytes`: the largest request body;
    `max_batch_size`: requests decoded together (1: one at a time); `max_queue`: requests waiting beyond that.
    `auto_route`: offer `model: auto` (see `loraplex.serving.router`), answering with `base` for prompts farther
    from every adapter's data than `route_threshold` times the distance calibrated on its held-out prompts.
    """
    engine = Engine(run_dir, merged, max_batch_size=max_batch_size, max_queue=max_queue, batch_wait_s=batch_wait_s)
    router = ServedRouter.build(engine, route_threshold) if auto_route else None
    api = FastAPI(title="loraplex", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    api.state.loraplex = AppState(engine, router, _Requests(engine, router, max_tokens_limit), max_body_bytes)
    api.state.engine, api.state.router = engine, router
    _error_handlers(api, api_key)
    api.add_api_route("/v1/models", list_models, methods=["GET"])
    api.add_api_route("/", playground, methods=["GET"], response_class=HTMLResponse)
    api.add_api_route("/health", health, methods=["GET"])
    api.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    api.add_api_route("/v1/completions", completions, methods=["POST"])
    return api


@asynccontextmanager
async def _lifespan(api: FastAPI):
    yield
    api.state.loraplex.engine.close()


def _state(request: Request) -> AppState:
    return request.app.state.loraplex


async def list_models(request: Request):
    state = _state(request)
    data = [entry.describe() for entry in state.engine.entries.values()]
    if state.router is not None:
        data.append(state.router.describe())
    return {"object": "list", "data": data}


async def playground():
    return HTMLResponse(playground_html())


async def health(request: Request):
    engine = _state(request).engine
    if not engine.alive:
        return error_response(503, "the generation worker has stopped (the server's log says why); restart "
                              "the server", type="server_error", code="worker_stopped")
    return {"status": "ok", **engine.stats}


async def chat_completions(request: Request):
    state = _state(request)
    req = parse_request(ChatRequest, await _read_json(request, state.max_body_bytes))
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": text_of(m.content)}
                for m in req.messages]

    def prompt_for(entry):
        try:
            return state.engine.chat_prompt(entry, messages)
        except Exception as exc:  # noqa: BLE001  (a chat template refusing the conversation)
            raise ApiError(400, f"the chat template refused these messages: {exc}", param="messages") from None

    return await state.requests.answer("chat", req, prompt_for, request)


async def completions(request: Request):
    state = _state(request)
    req = parse_request(CompletionRequest, await _read_json(request, state.max_body_bytes))
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if len(prompts) != 1:
        raise ApiError(400, "send one prompt per request", param="prompt")
    return await state.requests.answer("text", req, lambda _: prompts[0], request)


def _error_handlers(api: FastAPI, api_key: str | None) -> None:
    @api.exception_handler(ApiError)
    async def _api_error(_, exc: ApiError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @api.exception_handler(HTTPException)
    async def _http_error(_, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None,
                              headers=getattr(exc, "headers", None))

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        error = internal_error(request.url.path, "".join(traceback.format_exception(exc)))
        return error_response(error.status, error.message, error.type, code=error.code)

    if api_key is not None:
        api.add_middleware(_ApiKey, key=api_key)


class _ApiKey:
    """Every /v1 request needs `Authorization: Bearer <key>`. A plain ASGI middleware: Starlette's
    BaseHTTPMiddleware would wrap `receive` and hide a client's disconnect from the routes."""

    def __init__(self, asgi, key: str):
        self.asgi, self.key = asgi, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            token = given[7:] if given[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.key):
                response = error_response(401, "invalid API key: send it as 'Authorization: Bearer <key>'",
                                          code="invalid_api_key")
                return await response(scope, receive, send)
        await self.asgi(scope, receive, send)


class _Requests:
    """From a checked request to its answer: model, prompt tokens (off the event loop), limits, the job, and the
    response, whole or streamed; a client that goes away cancels its job."""

    def __init__(self, engine: Engine, router: ServedRouter | None, max_tokens_limit: int):
        self.engine, self.router, self.max_tokens_limit = engine, router, max_tokens_limit

    async def answer(self, kind: str, req, prompt_for, request: Request):
        wanted = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if wanted is not None and wanted > self.max_tokens_limit:
            raise ApiError(400, f"max_tokens is {wanted}; this server allows at most {self.max_tokens_limit}",
                           param="max_tokens", code="max_tokens_too_large")
        auto = req.model == AUTO and self.router is not None
        entry, headers = self._entry(BASE if auto else req.model), {}
        ids = await self._tokens(kind, entry, prompt_for, wanted)
        if auto:  # the length is checked before the router embeds anything
            try:
                picked, distance = await self.router.route(lambda each: self._tokens(kind, each, prompt_for, wanted))
            except WorkerStopped as exc:
                raise ApiError(503, exc.render(), type="server_error", code="worker_stopped") from None
            headers["x-loraplex-route"] = f"{picked}; distance={distance:.4f}"
            if picked != BASE:
                entry = self._entry(picked)
                ids = await self._tokens(kind, entry, prompt_for, wanted)  # its own template and system prompt
        job, events = self._submit(entry, ids, wanted, req)
        ident = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        reply = _Reply(kind, ident, entry.id, job, events)
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return _JobStream(job, reply.stream(request, usage), media_type="text/event-stream",
                              headers={"cache-control": "no-cache", **headers})
        done = await reply.wait(request)
        return JSONResponse(reply.body(done) if done else {}, headers=headers)

    def _entry(self, name: str):
        if name not in self.engine.entries:
            names = list(self.engine.entries) + ([AUTO] if self.router is not None else [])
            raise ApiError(404, f"the model '{name}' does not exist; available: {', '.join(names)}", param="model",
                           code="model_not_found")
        return self.engine.entries[name]

    async def _tokens(self, kind: str, entry, prompt_for, wanted: int | None) -> list[int]:
        """The prompt's token ids, rendered and tokenized on a thread (a 1 MiB prompt must not stall the event
        loop), and checked against the model's context."""
        ids = await asyncio.to_thread(lambda: self.engine.encode(entry, prompt_for(entry)))
        context = self.engine.context_length(entry)
        if len(ids) >= context:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; {entry.id} holds at most {context} tokens "
                                "(prompt and answer together)", param="messages" if kind == "chat" else "prompt",
                           code="context_length_exceeded")
        if wanted is not None and len(ids) + wanted > context:
            raise ApiError(400, f"the prompt ({len(ids)} tokens) and max_tokens ({wanted}) exceed the context of "
                                f"{entry.id} ({context} tokens)", param="max_tokens", code="context_length_exceeded")
        return ids

    def _submit(self, entry, ids: list[int], wanted: int | None, req) -> tuple[Job, asyncio.Queue]:
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: dict) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone: nobody waits for this request any more
                job.cancelled = True

        max_tokens = wanted or min(self.max_tokens_limit, self.engine.context_length(entry) - len(ids))
        job = Job(entry, ids, max_tokens, emit, req.temperature, req.top_p, req.stop, req.seed)
        try:
            self.engine.submit(job)
        except Busy as exc:
            code = "worker_stopped" if isinstance(exc, WorkerStopped) else "overloaded"
            raise ApiError(503, exc.render(), type="server_error", code=code) from None
        return job, events


class _JobStream(StreamingResponse):
    """A streamed answer whose job is cancelled when the response ends, however it ends: Starlette stops
    iterating the events when the client disconnects, without closing their generator."""

    def __init__(self, job: Job, content, **kwargs):
        super().__init__(content, **kwargs)
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancelled = True


def _failure(event: dict) -> ApiError:
    if event.get("status") == 503:
        return ApiError(503, event["message"], type="server_error", code="worker_stopped")
    return internal_error("generation", event["message"])


class _Reply:
    """One job's events turned into the OpenAI response: one body, or server-sent chunks."""

    def __init__(self, kind: str, ident: str, model: str, job: Job, events: asyncio.Queue):
        self.kind, self.ident, self.model, self.job, self.events = kind, ident, model, job, events
        self.created, self.object = int(time.time()), "chat.completion" if kind == "chat" else "text_completion"
        self.checked = time.monotonic()  # when the client's connection was last asked whether it is still there

    async def next_event(self, request: Request) -> dict | None:
        """The job's next event; None once the client has gone (uvicorn drops what is sent to a closed connection
        without a word, so the connection is asked, at least every DISCONNECT_POLL_S)."""
        while True:
            try:
                event = await asyncio.wait_for(self.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                event = None
            if time.monotonic() - self.checked >= DISCONNECT_POLL_S or event is None:
                if await request.is_disconnected():
                    return None
                self.checked = time.monotonic()
            if event is not None:
                return event

    async def wait(self, request: Request) -> dict | None:
        """The job's "done" event; None once the client has gone. The job is cancelled either way."""
        try:
            while (event := await self.next_event(request)) is not None:
                if event["type"] == "error":
                    raise _failure(event)
                if event["type"] == "done":
                    return event
            return None
        finally:
            self.job.cancelled = True

    def body(self, done: dict) -> dict:
        choice = ({"index": 0, "message": {"role": "assistant", "content": done["text"]}, "logprobs": None,
                   "finish_reason": done["finish_reason"]} if self.kind == "chat" else
                  {"index": 0, "text": done["text"], "logprobs": None, "finish_reason": done["finish_reason"]})
        return {"id": self.ident, "object": self.object, "created": self.created, "model": self.model,
                "choices": [choice], "usage": done["usage"]}

    def chunk(self, delta: str | None, finish: str | None, first: bool = False, usage: dict | None = None) -> str:
        if usage is not None:  # stream_options.include_usage: a last chunk with no choices
            choices = []
        elif self.kind == "chat":
            payload = {"role": "assistant", "content": delta or ""} if first else ({"content": delta} if delta else {})
            choices = [{"index": 0, "delta": payload, "logprobs": None, "finish_reason": finish}]
        else:
            choices = [{"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}]
        body = {"id": self.ident, "object": f"{self.object}.chunk" if self.kind == "chat" else self.object,
                "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def stream(self, request: Request, include_usage: bool):
        """Server-sent events; a client that disconnects ends the generator, and `finally` cancels the job."""
        try:
            if self.kind == "chat":
                yield self.chunk("", None, first=True)
            while True:
                event = await self.next_event(request)
                if event is None:
                    return
                if event["type"] == "delta":
                    yield self.chunk(event["text"], None)
                    continue
                if event["type"] == "error":
                    error = _failure(event)
                    body = {"message": error.message, "type": error.type, "param": None, "code": error.code}
                    yield f"data: {json.dumps({'error': body})}\n\n"
                else:
                    yield self.chunk(None, event["finish_reason"])
                    if include_usage:
                        yield self.chunk(None, None, usage=event["usage"])
                break
            yield "data: [DONE]\n\n"
        finally:
            self.job.cancelled = True
