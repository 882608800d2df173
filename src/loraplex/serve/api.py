"""The OpenAI-compatible HTTP API: /v1/models, /v1/chat/completions, /v1/completions (streamed or not).

Every error is a JSON body in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, never a traceback.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from .engine import BASE, Busy, Engine, Job
from .playground import playground_html
from .router import DEFAULT_THRESHOLD, ServedRouter

AUTO = "auto"


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status, headers=headers)


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[dict[str, Any]], None] = None


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


class CompletionRequest(_Request):
    prompt: Union[str, list[str]]
    max_tokens: Optional[int] = Field(16, ge=1)  # OpenAI's default for completions


def _text_of(content) -> str:
    if isinstance(content, list):  # content parts: only text ones
        parts = [part.get("text") for part in content]
        if any(not isinstance(p, str) for p in parts):
            raise ApiError(400, "only text content parts are supported", param="messages")
        return "".join(parts)
    return content or ""


async def _read_json(request: Request, limit: int) -> dict:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the request body is {int(length)} bytes; the limit is {limit}", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
    try:
        data = json.loads(bytes(body))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return data


def _parse(cls, data: dict):
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        return_message = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
        raise ApiError(400, return_message, param=param,
                       code="missing_field" if first["type"] == "missing" else "invalid_value") from None


def _stops(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError(400, "stop: up to 4 non-empty strings", param="stop")
    return stops


def app(run_dir: str | Path, merged: tuple | list = (), api_key: str | None = None, max_batch_size: int = 8,
        max_tokens_limit: int = 1024, max_body_bytes: int = 1 << 20, max_queue: int = 64,
        batch_wait_s: float = 0.005, auto_route: bool = True, route_threshold: float = DEFAULT_THRESHOLD) -> FastAPI:
    """The server as an ASGI app over the run's base, its adapters and the `merged` model folders.

    `max_tokens_limit`: the most tokens one request may ask for; `max_body_bytes`: the largest request body;
    `max_batch_size`: requests decoded together (1: one at a time); `max_queue`: requests waiting beyond that.
    `auto_route`: offer `model: auto` (see `loraplex.serve.router`), answering with `base` below `route_threshold`.
    """
    engine = Engine(run_dir, merged, max_batch_size=max_batch_size, max_queue=max_queue, batch_wait_s=batch_wait_s)
    router = ServedRouter.build(engine, route_threshold) if auto_route else None

    @asynccontextmanager
    async def lifespan(_):
        yield
        engine.close()

    api = FastAPI(title="loraplex", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    api.state.engine, api.state.router = engine, router

    @api.exception_handler(ApiError)
    async def _api_error(_, exc: ApiError):
        return exc.response()

    @api.exception_handler(HTTPException)
    async def _http_error(_, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None,
                              headers=getattr(exc, "headers", None))

    @api.exception_handler(Exception)
    async def _unexpected(_, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")

    @api.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                return error_response(401, "invalid API key: send it as 'Authorization: Bearer <key>'",
                                      code="invalid_api_key")
        return await call_next(request)

    @api.get("/v1/models")
    async def models():
        data = [entry.describe() for entry in engine.entries.values()]
        if router is not None:
            data.append(router.describe())
        return {"object": "list", "data": data}

    @api.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(playground_html())

    @api.get("/health")
    async def health():
        return {"status": "ok", **engine.stats}

    async def choose(name: str, prompt_for) -> tuple[Any, dict]:
        """The entry a request's `model` names; for `auto`, the router's pick and the header that says why."""
        if name == AUTO and router is not None:
            picked, score = await asyncio.to_thread(router.route, prompt_for(engine.entries[BASE]))
            return engine.entries[picked], {"x-loraplex-route": f"{picked}; score={score:.4f}"}
        if name not in engine.entries:
            names = list(engine.entries) + ([AUTO] if router is not None else [])
            raise ApiError(404, f"the model '{name}' does not exist; available: {', '.join(names)}", param="model",
                           code="model_not_found")
        return engine.entries[name], {}

    async def complete(kind: str, req, entry, prompt: str, headers: dict):
        ids = engine.encode(entry, prompt)
        context = engine.context_length(entry)
        if len(ids) >= context:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; {entry.id} holds at most {context} tokens "
                                "(prompt and answer together)", param="messages" if kind == "chat" else "prompt",
                           code="context_length_exceeded")
        wanted = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if wanted is not None and wanted > max_tokens_limit:
            raise ApiError(400, f"max_tokens is {wanted}; this server allows at most {max_tokens_limit}",
                           param="max_tokens", code="max_tokens_too_large")
        if wanted is not None and len(ids) + wanted > context:
            raise ApiError(400, f"the prompt ({len(ids)} tokens) and max_tokens ({wanted}) exceed the context of "
                                f"{entry.id} ({context} tokens)", param="max_tokens", code="context_length_exceeded")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: dict) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone: nobody waits for this request any more
                job.cancelled = True

        job = Job(entry, ids, wanted or min(max_tokens_limit, context - len(ids)), emit, req.temperature,
                  req.top_p, _stops(req.stop), req.seed)
        try:
            engine.submit(job)
        except Busy as exc:
            raise ApiError(503, exc.render(), type="server_error", code="overloaded") from None
        ident = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"
        if not req.stream:
            done = None
            try:
                while done is None:
                    event = await events.get()
                    if event["type"] == "error":
                        raise ApiError(500, event["message"], type="server_error")
                    if event["type"] == "done":
                        done = event
            finally:
                job.cancelled = True
            choice = ({"index": 0, "message": {"role": "assistant", "content": done["text"]}, "logprobs": None,
                       "finish_reason": done["finish_reason"]} if kind == "chat" else
                      {"index": 0, "text": done["text"], "logprobs": None, "finish_reason": done["finish_reason"]})
            body = {"id": ident, "object": obj, "created": created, "model": entry.id, "choices": [choice],
                    "usage": done["usage"]}
            return JSONResponse(body, headers=headers)

        def chunk(delta: str | None, finish: str | None, usage: dict | None = None, first: bool = False) -> str:
            if kind == "chat":
                payload = {"role": "assistant", "content": delta or ""} if first else (
                    {"content": delta} if delta else {})
                choice = {"index": 0, "delta": payload, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            body = {"id": ident, "object": f"{obj}.chunk" if kind == "chat" else obj, "created": created,
                    "model": entry.id, "choices": [choice]}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def stream():
            try:
                if kind == "chat":
                    yield chunk("", None, first=True)
                while True:
                    event = await events.get()
                    if event["type"] == "delta":
                        yield chunk(event["text"], None)
                    elif event["type"] == "error":
                        error = {"message": event["message"], "type": "server_error", "param": None, "code": None}
                        yield f"data: {json.dumps({'error': error})}\n\n"
                        break
                    else:
                        yield chunk(None, event["finish_reason"], event["usage"])
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled = True

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", **headers})

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = _parse(ChatRequest, await _read_json(request, max_body_bytes))
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text_of(m.content)}
                    for m in req.messages]

        def prompt_for(entry):
            try:
                return engine.chat_prompt(entry, messages)
            except Exception as exc:  # noqa: BLE001  (a chat template refusing the conversation)
                raise ApiError(400, f"the chat template refused these messages: {exc}", param="messages") from None

        entry, headers = await choose(req.model, prompt_for)
        return await complete("chat", req, entry, prompt_for(entry), headers)

    @api.post("/v1/completions")
    async def completions(request: Request):
        req = _parse(CompletionRequest, await _read_json(request, max_body_bytes))
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise ApiError(400, "send one prompt per request", param="prompt")
        entry, headers = await choose(req.model, lambda _: prompts[0])
        return await complete("text", req, entry, prompts[0], headers)

    return api

