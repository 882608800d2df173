"""What a request to the API may hold, checked in full before any work: the request bodies as the OpenAI API
documents them, less what this server cannot honour.

`null` means the field's default. A field that would change the answer and is not supported (`tools`,
`response_format`, `logprobs`, `n` > 1, ...) is refused with a 400 naming it, never dropped; fields that do not
change the answer (`user`, `metadata`, ...) are accepted and ignored; any other field is refused as unknown.
"""
from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

GREEDY_BELOW = 1e-5  # a temperature under this is greedy decoding (as vLLM does): softmax(logits / 1e-38) is NaN
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.Generator.manual_seed accepts
IGNORED_FIELDS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
# field -> the values that mean "not used" (the field may then be sent; any other value is refused)
UNSUPPORTED_FIELDS: dict[str, tuple] = {
    "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
    "response_format": ({"type": "text"},), "logprobs": (False, 0), "top_logprobs": (0,), "logit_bias": ({},),
    "presence_penalty": (0,), "frequency_penalty": (0,), "best_of": (1,), "echo": (False,), "suffix": ("",),
    "prediction": (), "modalities": (["text"],), "audio": (), "reasoning_effort": (), "web_search_options": (),
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Union[str, list[str]] = Field(default_factory=list)
    seed: Optional[int] = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=1)

    @field_validator("temperature")
    @classmethod
    def _greedy_when_tiny(cls, value: float) -> float:
        return 0.0 if value < GREEDY_BELOW else value

    @field_validator("stop")
    @classmethod
    def _up_to_four(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("up to 4 non-empty strings")
        return stops


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # `name` and the like: they do not reach the prompt

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[dict[str, Any]], None] = None


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


class CompletionRequest(_Request):
    prompt: Union[str, list[str]]
    max_tokens: Optional[int] = Field(16, ge=1)  # OpenAI's default for completions


def parse_request(cls: type[_Request], data: dict) -> _Request:
    """The request `data` checked field by field; an ApiError (400) names the first field that is wrong."""
    data = {key: value for key, value in data.items() if value is not None}  # null: the default
    for key in list(data):
        if key in cls.model_fields:
            continue
        if key in IGNORED_FIELDS or data[key] in UNSUPPORTED_FIELDS.get(key, ()):
            del data[key]
        elif key in UNSUPPORTED_FIELDS:
            raise ApiError(400, f"{key}: not supported by this server", param=key, code="unsupported_parameter")
        else:
            raise ApiError(400, f"{key}: unknown field", param=key, code="unknown_parameter")
    try:
        request = cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
        raise ApiError(400, message, param=param,
                       code="missing_field" if first["type"] == "missing" else "invalid_value") from None
    if request.stream_options is not None and not request.stream:
        raise ApiError(400, "stream_options: only allowed with stream: true", param="stream_options",
                       code="invalid_value")
    return request


def text_of(content) -> str:
    if isinstance(content, list):  # content parts: only text ones
        parts = [part.get("text") if part.get("type", "text") == "text" else None for part in content]
        if any(not isinstance(p, str) for p in parts):
            raise ApiError(400, "only text content parts are supported", param="messages",
                           code="unsupported_parameter")
        return "".join(parts)
    return content or ""


def is_json_content_type(value: str) -> bool:
    media = value.split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def decode_body(body: bytes) -> dict:
    """The JSON object of a request body; a lone UTF-16 surrogate (`"\\ud800"`) is refused here, since no tokenizer
    can encode it."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "the request holds a lone UTF-16 surrogate, which is not text", code="invalid_json") \
            from None
    return data
