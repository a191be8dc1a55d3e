"""The OpenAI-compatible wire format the Serve app speaks: request bodies (validated with pydantic: a bad request is a
4xx with a JSON error, never a crash), the per-request limits, response bodies and server-sent-event chunks.

Only what our engines can honour is accepted: an unknown field is refused by name rather than silently ignored, and
types are strict (``"max_tokens": "16"`` and ``"stream": "yes"`` are refused; an int is still a valid float, as
OpenAI's clients send ``"temperature": 1``).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Annotated, Callable, ClassVar, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from .engines import Completion, SamplingParams


class APIError(Exception):
    """An error the client caused (or must be told about), sent as OpenAI's ``{"error": {...}}`` body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class RequestLimits(BaseModel):
    """What one request may ask of the endpoint (a recipe's ``serve.limits``). Over a limit is a 400 naming the
    field and the limit; a body over ``max_body_bytes`` is a 413. The defaults suit a 4k-32k-context model on one
    GPU; SamplingParams' own ranges (n <= 32, max_tokens <= 8192, 8 stop strings) still apply above them."""
    model_config = ConfigDict(extra="forbid")
    max_body_bytes: int = Field(2_097_152, gt=0, description="Request body size in bytes (2 MiB); more is a 413.")
    max_prompt_chars: int = Field(200_000, gt=0, description="Characters of one prompt (completions) or of all "
                                                             "messages' contents together (chat).")
    max_prompts: int = Field(32, gt=0, description="Prompts in one completions request.")
    max_messages: int = Field(256, gt=0, description="Messages in one chat request.")
    max_n: int = Field(16, gt=0, le=32, description="Completions per prompt (n).")
    max_tokens: int = Field(8192, gt=0, le=8192, description="max_tokens (or max_completion_tokens) of a request.")
    max_stop_strings: int = Field(4, ge=0, le=8, description="Stop strings (OpenAI's limit is 4).")
    max_stop_chars: int = Field(128, gt=0, description="Characters of one stop string (transformers' stop-string "
                                                       "matching precomputes vocabulary x length).")
    max_total_tokens: int = Field(131_072, gt=0, description="Work of one request: the sum over its prompts of "
                                  "n x (prompt tokens + max_tokens), what the engine may have to hold and write.")
    max_schema_bytes: int = Field(32_768, gt=0, description="response_format's JSON schema, as compact JSON.")
    max_schema_depth: int = Field(32, gt=0, description="Nesting of objects and arrays in that schema document.")


def _no_lone_surrogates(text: str) -> str:
    """JSON's ``"\\ud800"`` decodes to a lone surrogate: not Unicode text, and the tokenizer fails on it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"a lone surrogate (U+{ord(text[e.start]):04X}) at character {e.start} is not valid "
                         f"Unicode text") from None
    return text


Text = Annotated[str, AfterValidator(_no_lone_surrogates)]


def _each_text(value):
    """The surrogate check for a field that is a string or a list of them (one error at the field, not one per
    branch of the union)."""
    for i, text in enumerate([value] if isinstance(value, str) else value or []):
        try:
            _no_lone_surrogates(text)
        except ValueError as e:
            raise ValueError(f"{e}" if isinstance(value, str) else f"item {i}: {e}") from None
    return value


class _Strict(BaseModel):
    """No unknown fields, no coercion (a string is not an int or a bool; an int is still a float)."""
    model_config = ConfigDict(extra="forbid", strict=True)


class JSONSchemaFormat(_Strict):
    name: Text = "output"
    description: Optional[Text] = None
    schema_: dict = Field(alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Strict):
    """``text``, ``json_object`` (any JSON object) or ``json_schema`` (JSON valid against the given schema)."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None

    def schema(self) -> Optional[dict]:
        if self.type == "json_schema":
            if self.json_schema is None:
                raise APIError(400, "response_format: type 'json_schema' needs a 'json_schema' with a 'schema'",
                               param="response_format")
            return self.json_schema.schema_
        return {"type": "object"} if self.type == "json_object" else None


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields shared by both endpoints; ranges are SamplingParams' own (checked when converting)."""
    model: str
    max_tokens: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = Field(0, ge=-1, le=2**31 - 1, description="vLLM's extension; -1 or 0 = no top-k cut. Bounded "
                                                           "so that no engine is handed an integer wider than 32 bits.")
    n: int = 1
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: bool = False  # vLLM's extension (serving benchmarks): write max_tokens tokens whatever the model says
    response_format: Optional[ResponseFormat] = None
    # Standard OpenAI fields the engines do not implement. At these values they change nothing, so a client that
    # sends them (many send their defaults) is served; any other value is refused by name (``refuse_unhonoured``).
    user: Optional[str] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None

    # field -> the values that change nothing (None, an unset field, always does)
    NEUTRAL: ClassVar[dict[str, Callable[[object], bool]]] = {
        "user": lambda v: True, "presence_penalty": lambda v: v == 0, "frequency_penalty": lambda v: v == 0,
        "logit_bias": lambda v: not v}

    def unimplemented_fields(self) -> list[str]:
        """The standard fields this request sets that the engines do not implement (all at neutral values once
        ``refuse_unhonoured`` has passed): what a replica logs, once per field."""
        return [name for name in self.NEUTRAL if getattr(self, name) is not None]

    def refuse_unhonoured(self) -> None:
        """A 400 naming the first standard field set to a value that would change the answer."""
        for name, neutral in self.NEUTRAL.items():
            value = getattr(self, name)
            if value is not None and not neutral(value):
                raise APIError(400, f"{name}: {json.dumps(value)[:100]} is not supported by this endpoint "
                                    f"(accepted only as {_NEUTRAL_TEXT[name]})", param=name,
                               code="unsupported_parameter")

    @field_validator("stop")
    @classmethod
    def _stops_are_text(cls, value):
        return _each_text(value)

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else (self.stop or [])

    def requested_max_tokens(self, default_max_tokens: int) -> int:
        return self.max_tokens if self.max_tokens is not None else default_max_tokens

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k, 0), n=self.n, seed=self.seed,
            stop=self.stops, max_tokens=self.requested_max_tokens(default_max_tokens), ignore_eos=self.ignore_eos,
            json_schema=self.response_format.schema() if self.response_format else None)

    def check_limits(self, limits: RequestLimits, default_max_tokens: int) -> None:
        """A 400 for the first field over its limit; checked before anything costly (tokenizing, schema checks)."""
        _at_most("n", self.n, limits.max_n, "max_n")
        _at_most("max_tokens", self.requested_max_tokens(default_max_tokens), limits.max_tokens, "max_tokens")
        _at_most("stop", len(self.stops), limits.max_stop_strings, "max_stop_strings", what="stop strings")
        for i, stop in enumerate(self.stops):
            _at_most(f"stop.{i}" if isinstance(self.stop, list) else "stop", len(stop), limits.max_stop_chars,
                     "max_stop_chars", what="characters")
        schema = self.response_format.json_schema.schema_ if self.response_format and \
            self.response_format.json_schema else None
        if schema is not None:
            _at_most("response_format", json_depth(schema), limits.max_schema_depth, "max_schema_depth",
                     what="levels of nesting in the JSON schema")
            _at_most("response_format", len(json.dumps(schema, separators=(",", ":"))), limits.max_schema_bytes,
                     "max_schema_bytes", what="bytes of JSON schema")


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str]]
    echo: bool = False
    logprobs: Optional[int] = None  # completions' logprobs is a count of alternatives
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    NEUTRAL: ClassVar[dict[str, Callable[[object], bool]]] = {
        **_Sampling.NEUTRAL, "logprobs": lambda v: False, "best_of": lambda v: v == 1, "suffix": lambda v: v == ""}

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("expected a prompt or a non-empty list of prompts")
        return _each_text(value)

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def prompt_field(self, i: int) -> str:
        return "prompt" if isinstance(self.prompt, str) else f"prompt.{i}"

    def check_limits(self, limits: RequestLimits, default_max_tokens: int) -> None:
        _at_most("prompt", len(self.prompts), limits.max_prompts, "max_prompts", what="prompts")
        for i, prompt in enumerate(self.prompts):
            _at_most(self.prompt_field(i), len(prompt), limits.max_prompt_chars, "max_prompt_chars",
                     what="characters")
        super().check_limits(limits, default_max_tokens)


class ChatMessage(_Strict):
    role: Literal["developer", "system", "user", "assistant"]
    content: Text
    name: Optional[Text] = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_joined(cls, value):
        """OpenAI's content-part array, text parts only, becomes one text (parts joined by a newline, as vLLM
        does); an image or audio part cannot be honoured by a text model."""
        if not isinstance(value, list):
            return value
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str) \
                    or set(part) - {"type", "text"}:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"part {i}: only text parts ({{'type': 'text', 'text': ...}}) are supported, "
                                 f"not {str(kind)[:40]!r}")
            texts.append(part["text"])
        return "\n".join(texts)

    def for_template(self) -> dict:
        """The message as chat templates know it: OpenAI's ``developer`` role is the system role of older models."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content,
                **({"name": self.name} if self.name is not None else {})}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None  # OpenAI's newer name for max_tokens
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None

    NEUTRAL: ClassVar[dict[str, Callable[[object], bool]]] = {
        **_Sampling.NEUTRAL, "logprobs": lambda v: v is False, "top_logprobs": lambda v: v == 0}

    def requested_max_tokens(self, default_max_tokens: int) -> int:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return super().requested_max_tokens(default_max_tokens)

    def check_limits(self, limits: RequestLimits, default_max_tokens: int) -> None:
        _at_most("messages", len(self.messages), limits.max_messages, "max_messages", what="messages")
        _at_most("messages", sum(len(m.content) for m in self.messages), limits.max_prompt_chars,
                 "max_prompt_chars", what="characters of content")
        super().check_limits(limits, default_max_tokens)


_NEUTRAL_TEXT = {"user": "any text", "presence_penalty": "0", "frequency_penalty": "0", "logit_bias": "{}",
                 "logprobs": "false (chat) or left out (completions)", "top_logprobs": "0", "best_of": "1",
                 "suffix": "\"\""}


def _at_most(field: str, value: int, limit: int, limit_name: str, what: str = "") -> None:
    if value > limit:
        amount = f"{value} {what}".rstrip()
        raise APIError(400, f"{field}: {amount} is over this endpoint's limit of {limit} (serve.limits."
                            f"{limit_name})", param=field, code="limit_exceeded")


def json_depth(document) -> int:
    """How deeply objects and arrays nest in a parsed JSON document (a scalar is 0). Iterative, so that a document
    nested deeper than Python's recursion limit is measured rather than crashing the measurement."""
    deepest, todo = 0, [(document, 1)]
    while todo:
        node, depth = todo.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            todo.extend((child, depth + 1) for child in children)
    return deepest


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


def validation_message(errors: list[dict], most: int = 5) -> tuple[str, str | None]:
    """A one-line message and the first offending field, from pydantic/FastAPI validation errors: one part per
    field (a union's branches folded into it), the first ``most`` fields only (a list of a million wrong items should
    not make a megabyte of message)."""
    by_field: dict[str, list[str]] = {}
    for err in errors:
        field = "body" if err.get("type") == "json_invalid" else _field_name(err.get("loc", ()))
        message = err.get("msg", "invalid").removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            message = "unknown or unsupported field"
        elif err.get("type") == "json_invalid":
            message = "the body is not valid JSON"
        if message not in by_field.setdefault(field, []):
            by_field[field].append(message)
    parts = [f"{field}: {' or '.join(messages)}" for field, messages in list(by_field.items())[:most]]
    if len(by_field) > most:
        parts.append(f"and {len(by_field) - most} more fields")
    return "; ".join(parts), next(iter(by_field), None)


# The names pydantic gives a union's branches in an error's location ("prompt.str", "prompt.list[str].0").
_UNION_BRANCH = re.compile(r"^(str|int|float|bool|none|dict|list)$|\[")


def _field_name(loc) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts[:1] + [p for p in parts[1:] if not _UNION_BRANCH.search(p)]) or "body"
