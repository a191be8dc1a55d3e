"""The OpenAI-compatible wire format the Serve app speaks: request bodies (validated with pydantic: a bad request is a
4xx with a JSON error, never a crash), response bodies and server-sent-event chunks.

Only what our engines can honour is accepted: an unknown field is refused by name rather than silently ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .engines import Completion, SamplingParams


class APIError(Exception):
    """An error the client caused (or must be told about), sent as OpenAI's ``{"error": {...}}`` body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class JSONSchemaFormat(BaseModel):
    name: str = "output"
    schema_: dict = Field(alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(BaseModel):
    """``text``, ``json_object`` (any JSON object) or ``json_schema`` (JSON valid against the given schema)."""
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None

    def schema(self) -> Optional[dict]:
        if self.type == "json_schema":
            if self.json_schema is None:
                raise APIError(400, "response_format: type 'json_schema' needs a 'json_schema' with a 'schema'",
                               param="response_format")
            return self.json_schema.schema_
        return {"type": "object"} if self.type == "json_object" else None


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by both endpoints; ranges are SamplingParams' own (checked when converting)."""
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = Field(0, description="vLLM's extension; -1 or 0 = no top-k cut.")
    n: int = 1
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    response_format: Optional[ResponseFormat] = None
    user: Optional[str] = None  # accepted and ignored, as OpenAI clients may send it

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k, 0), n=self.n, seed=self.seed,
            stop=stop, max_tokens=self.max_tokens if self.max_tokens is not None else default_max_tokens,
            json_schema=self.response_format.schema() if self.response_format else None)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str]]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("expected a prompt or a non-empty list of prompts")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: Optional[str] = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None  # OpenAI's newer name for max_tokens

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return super().sampling_params(default_max_tokens)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(model: str, prompts: list[str], results: list[list[Completion]], echo: bool) -> dict:
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for prompt, row in zip(prompts, results):
        prompt_tokens += row[0].prompt_tokens
        for c in row:
            choices.append({"index": len(choices), "text": (prompt if echo else "") + c.text, "logprobs": None,
                            "finish_reason": c.finish_reason})
            completion_tokens += c.completion_tokens
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def chat_response(model: str, completions: list[Completion]) -> dict:
    choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                "finish_reason": c.finish_reason} for i, c in enumerate(completions)]
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(completions[0].prompt_tokens,
                                               sum(c.completion_tokens for c in completions))}


def sse(payload: dict | str) -> str:
    """One server-sent event, as OpenAI streams them (``data: [DONE]`` ends the stream)."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def completion_chunk(stream_id: str, model: str, index: int, text: str, finish_reason: str | None) -> dict:
    return {"id": stream_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def chat_chunk(stream_id: str, model: str, index: int, delta: dict, finish_reason: str | None) -> dict:
    return {"id": stream_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(stream_id: str, model: str, obj: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": stream_id, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """A one-line message and the first offending field, from pydantic/FastAPI validation errors."""
    parts, first = [], None
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        field = "body" if err.get("type") == "json_invalid" else ".".join(loc) or "body"
        first = first or field
        message = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            message = "unknown or unsupported field"
        elif err.get("type") == "json_invalid":
            message = "the body is not valid JSON"
        parts.append(f"{field}: {message}")
    return "; ".join(parts), first
