"""The generator endpoint: a Ray Serve deployment whose replicas each hold an engine, speaking OpenAI's API.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``"stream": true``), ``GET /v1/models``
and ``GET /health``; ``/docs``, ``/redoc`` and ``/openapi.json`` only when asked for (``api_docs``). Soft prompts are
served as models of their own (the way vLLM serves LoRA adapters): a request for model ``medical`` is generated with
the ``medical`` soft prompt before its tokens.

Every answer that is not a success is OpenAI's ``{"error": {...}}`` body: a 4xx for anything the client sent
(FastAPI's own 404/405/validation errors included), a 500 without traceback text for a fault of ours. A request
passes ``RequestGate`` first (API key, then body size and type), then the request models' strict types and
``RequestLimits``, then the engine's checks (prompt tokens, context, total work, the JSON schema compiling).

Domains are models of their own on one base model in memory: a soft prompt (``soft_prompts``) is placed before the
prompt's tokens, a LoRA adapter (``adapters``, PEFT folders) changes the weights for its rows only. With the
transformers engine, requests that arrive together are generated together (``actors/continuous_batching.py``): a
replica decodes up to ``max_batch_size`` sequences, of any domains, lengths and parameters, in each step, and a
sequence whose client disconnects leaves the batch at the next step. With the vLLM engine the replica holds vLLM's
``AsyncLLM`` (``AsyncVLLMEngine``), which does the same across requests, streams token by token and aborts a
request whose client left. Requests a replica holds count as its ongoing requests, which Serve's autoscaler scales
on.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route signatures' types at run time, inside a
# replica where cloudpickle kept only the globals the method bodies use. For the same reason every helper the
# deployment's methods call is defined above the class: ``serve.ingress`` pickles the routes while the module is
# still being read.
import asyncio
import hmac
import json
import logging
import os
from email.message import Message
from typing import AsyncIterator, Iterator, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import openai_api as oa
from .continuous_batching import ContinuousBatcher, Sequence
from .engines import Completion, SamplingParams, UnsatisfiableSchema, effective_temperature, load_engine
from .soft_prompt import load_soft_prompt

logger = logging.getLogger("ray.serve")
api = FastAPI(title="domainsynth generator", description="OpenAI-compatible completions from a domain generator")
# FastAPI's documentation routes exist on every app; RequestGate answers 404 for them unless the app was asked for
# them (the app object is shared by every deployment in a process, so it cannot be built per deployment).
DOCS_PATHS = frozenset(p for p in (api.docs_url, api.redoc_url, api.openapi_url, api.swagger_ui_oauth2_redirect_url)
                       if p)
UNAUTHENTICATED_PATHS = frozenset({"/health"})  # probes need no key
ROUTES = "POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health"


class ErrorResponse(JSONResponse):
    """OpenAI's error body, as ASCII JSON: a message quoting the client's lone surrogates cannot fail to encode
    (Starlette's JSONResponse writes UTF-8, which has no bytes for them)."""

    def __init__(self, error: oa.APIError, headers: Optional[dict] = None):
        super().__init__(error.body(), status_code=error.status, headers=headers)

    def render(self, content) -> bytes:
        return json.dumps(content).encode("ascii")


@api.exception_handler(oa.APIError)
async def _api_error(request: Request, error: oa.APIError) -> JSONResponse:
    return ErrorResponse(error)


@api.exception_handler(RequestValidationError)
async def _bad_body(request: Request, error: RequestValidationError) -> JSONResponse:
    message, field = oa.validation_message(error.errors())
    return ErrorResponse(oa.APIError(400, message, param=field))


@api.exception_handler(ValidationError)
async def _bad_parameters(request: Request, error: ValidationError) -> JSONResponse:
    """Out-of-range sampling parameters, found when a request becomes SamplingParams."""
    message, field = oa.validation_message(error.errors())
    return ErrorResponse(oa.APIError(400, message, param=field))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """FastAPI's and Starlette's own refusals (unknown path, wrong method, an unreadable body) in OpenAI's shape."""
    where = f"{request.method} {request.url.path}"[:200]
    if error.status_code == 404:
        message, code = f"Invalid URL ({where}); this endpoint serves {ROUTES}", "unknown_url"
    elif error.status_code == 405:
        allowed = (error.headers or {}).get("Allow", "")
        message, code = f"Method not allowed ({where}); allowed: {allowed}", "method_not_allowed"
    else:
        message, code = f"{error.detail}", None
    kind = "server_error" if error.status_code >= 500 else "invalid_request_error"
    return ErrorResponse(oa.APIError(error.status_code, message, type=kind, code=code), headers=error.headers)


class RequestGate:
    """Pure ASGI middleware, first to see every request: the API key (from the headers, before the body is read,
    so that a stranger's malformed body is a 401 and not a validation report), the documentation switch, the body
    size (413) and type (415), and a last resort that turns an unexpected exception into OpenAI's 500 body, with
    the traceback in the replica's log rather than in the answer. Its settings are those of the deployment the
    replica runs (``current_deployment``)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            refusal, receive = await self._screen(scope, receive)
            if refusal is not None:
                await ErrorResponse(refusal)(scope, receive, tracked_send)
                return
            await self.app(scope, receive, tracked_send)
        except _ClientGone:
            return
        except Exception:
            logger.exception("request %s %s failed", scope.get("method"), scope.get("path"))
            if not started:  # once the answer has begun there is no status left to change
                error = oa.APIError(500, "internal server error (the server log has the details)",
                                    type="server_error")
                await ErrorResponse(error)(scope, receive, send)

    async def _screen(self, scope, receive):
        """(a refusal or None, the receive function the app should read the body from)."""
        server = current_deployment()
        path, headers = route_path(scope), Headers(scope=scope)
        if path not in UNAUTHENTICATED_PATHS and not server.key_accepted(headers.get("authorization")):
            return oa.APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                               type="authentication_error", code="invalid_api_key"), receive
        if path in DOCS_PATHS and not server.api_docs:
            return oa.APIError(404, f"Invalid URL ({scope.get('method')} {path}); API docs are off (serve.api_docs)",
                               code="unknown_url"), receive
        limit = server.limits.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and not declared.strip().isdigit():
            return oa.APIError(400, "Content-Length is not a number", param="body"), receive
        if declared is not None and int(declared) > limit:
            return _too_large(limit), receive
        body = await read_body(receive, limit)
        if body is None:
            return _too_large(limit), receive
        if body and not is_json(headers.get("content-type")):
            return oa.APIError(415, "the body must be JSON, sent with 'Content-Type: application/json'",
                               param="body", code="unsupported_media_type"), receive
        return None, replay(body, receive)


def current_deployment() -> "GeneratorServer":
    """The deployment instance this replica runs (how Serve hands class-based routes their ``self`` too)."""
    return serve.get_replica_context().servable_object


class _ClientGone(Exception):
    """The client disconnected before its body arrived: there is nobody to answer."""


def _too_large(limit: int) -> oa.APIError:
    return oa.APIError(413, f"body: larger than this endpoint's limit of {limit} bytes (serve.limits.max_body_bytes)",
                       param="body", code="limit_exceeded")


def route_path(scope) -> str:
    """The path within the application (Serve passes the full path, with its route prefix as ``root_path``)."""
    path, root = scope.get("path", ""), scope.get("root_path", "").rstrip("/")
    if root and path.startswith(root):
        return path[len(root):] or "/"
    return path


def is_json(content_type: Optional[str]) -> bool:
    """``application/json`` or ``application/...+json``, with any parameters (``; charset=utf-8``)."""
    if not content_type:
        return False
    message = Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


async def read_body(receive, limit: int) -> Optional[bytes]:
    """The whole request body, or None as soon as it passes ``limit`` bytes (a chunked body declares no length)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive):
    """A receive function that hands the app the body already read, then the client's later messages (a streamed
    answer listens on it for the client's disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


api.add_middleware(RequestGate)


def schema_error(error: UnsatisfiableSchema) -> oa.APIError:
    return oa.APIError(400, f"response_format: {error}", param="response_format", code="invalid_json_schema")


DEPLOYMENT_NAME = "generator"  # what a Serve config file's `deployments` entries name


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class GeneratorServer:
    def __init__(self, model: str, engine: str = "transformers", engine_options: Optional[dict] = None,
                 served_model_name: Optional[str] = None, soft_prompts: Optional[dict] = None,
                 adapters: Optional[dict] = None, api_key: Optional[str] = None, default_max_tokens: int = 16,
                 limits: Optional[oa.RequestLimits] = None, api_docs: bool = False, max_batch_size: int = 32):
        if engine == "vllm":  # vLLM's AsyncLLM: its own continuous batching, token streaming, LoRA requests
            self.engine = load_engine(model, engine, asynchronous=True, adapters=adapters, **(engine_options or {}))
        else:
            self.engine = load_engine(model, engine, **(engine_options or {}))
            self.engine.load_adapters(adapters or {})  # a folder that is not a LoRA of this base fails here
        self.engine_kind = engine
        self.base_model = served_model_name or os.path.basename(model.rstrip("/"))
        # model name -> (soft prompt or None, LoRA adapter name or None)
        self.domains: dict = {self.base_model: (None, None)}
        for name, path in (soft_prompts or {}).items():
            prefix = load_soft_prompt(path)
            self.engine.check_prefix(prefix)  # a prompt of the wrong width fails the replica at start, not later
            self.domains[name] = (prefix, None)
        self.domains.update({name: (None, name) for name in adapters or {}})
        # Continuous batching: ours where this process runs the model step by step, vLLM's own otherwise.
        self.batcher = ContinuousBatcher(self.engine, max_batch_size) if engine == "transformers" else None
        self.api_key = api_key
        self.default_max_tokens = default_max_tokens
        self.limits = limits or oa.RequestLimits()
        self.api_docs = api_docs
        self._fields_logged: set[str] = set()

    @api.get("/health")
    async def health(self) -> dict:
        load = self.batcher.load() if self.batcher else {}
        return {"status": "ok", "model": self.base_model, "engine": self.engine_kind, **load}

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "domainsynth",
             "root": self.base_model, "parent": None if name == self.base_model else self.base_model,
             "max_model_len": self.engine.max_model_len,
             "soft_prompt_tokens": 0 if prefix is None else int(prefix.shape[0]),
             "adapter": "lora" if adapter else None}
            for name, (prefix, adapter) in self.domains.items()]}

    @api.post("/v1/completions")
    async def completions(self, body: oa.CompletionRequest):
        prefix, adapter = self._domain(body.model)
        params = self._sampling_params(body)
        lengths = [self._prompt_tokens(prompt, prefix, params, body.prompt_field(i))
                   for i, prompt in enumerate(body.prompts)]
        self._check_work(lengths, params)
        if body.stream:
            return self._sse(self._completion_events(body, params, prefix, adapter))
        results = await self._generate(body.prompts, params, prefix, adapter)
        return oa.completion_response(body.model, body.prompts, results, body.echo)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: oa.ChatCompletionRequest):
        prefix, adapter = self._domain(body.model)
        params = self._sampling_params(body)
        try:
            prompt = self.engine.chat_prompt([m.for_template() for m in body.messages])
        except Exception as e:  # the model's chat template refused the conversation (e.g. roles out of order)
            raise oa.APIError(400, f"messages: the model's chat template refused them: {e}", param="messages")
        self._check_work([self._prompt_tokens(prompt, prefix, params, "messages")], params)
        if body.stream:
            return self._sse(self._chat_events(body, prompt, params, prefix, adapter))
        results = await self._generate([prompt], params, prefix, adapter)
        return oa.chat_response(body.model, results[0])

    # -- checks (cheapest first) -------------------------------------------------------------------------------------

    def key_accepted(self, authorization: Optional[str]) -> bool:
        """Whether an ``Authorization`` header carries this deployment's key (always, when it has none)."""
        if self.api_key is None:
            return True
        given = authorization or ""
        token = given[7:] if given.lower().startswith("bearer ") else ""
        return hmac.compare_digest(token.encode(), self.api_key.encode())

    def _log_once(self, fields: list[str]) -> None:
        new = [f for f in fields if f not in self._fields_logged]
        if new:
            self._fields_logged.update(new)
            logger.info("accepting %s at values that change nothing (this endpoint does not implement them; "
                        "logged once per replica)", ", ".join(new))

    def _domain(self, model: str) -> tuple:
        """(soft prompt, adapter name) of the model a request names; a 404 for a name not served here."""
        if model not in self.domains:
            raise oa.APIError(404, f"model {model[:100]!r} does not exist here; served: {', '.join(self.domains)}",
                              param="model", code="model_not_found")
        return self.domains[model]

    def _sampling_params(self, body: Union[oa.CompletionRequest, oa.ChatCompletionRequest]) -> SamplingParams:
        """The standard fields it sets that no engine implements (neutral values only), its limits, then its
        parameters' ranges (a 400 from SamplingParams), then its JSON schema."""
        body.refuse_unhonoured()
        self._log_once(body.unimplemented_fields())
        body.check_limits(self.limits, self.default_max_tokens)
        params = body.sampling_params(self.default_max_tokens)
        if params.json_schema is not None:
            problem = self.engine.json_schema_problem(params.json_schema)
            if problem:
                raise oa.APIError(400, f"response_format: the JSON schema cannot be used for structured output: "
                                       f"{problem}", param="response_format", code="invalid_json_schema")
        return params

    def _prompt_tokens(self, prompt: str, prefix, params: SamplingParams, field: str) -> int:
        """The prompt's length in tokens, soft prompt included, once it is known to be neither empty nor too long."""
        tokens = self.engine.prompt_length(prompt, prefix)
        if tokens == 0:  # vLLM's OpenAI server refuses these too ("the decoder prompt cannot be empty")
            raise oa.APIError(400, f"{field}: the prompt is empty: it has no tokens (this model's tokenizer adds no "
                                   f"BOS token)", param=field)
        overflow = self.engine.context_overflow(prompt, params, prefix, tokens=tokens)
        if overflow:
            raise oa.APIError(400, f"{field}: {overflow}", param=field, code="context_length_exceeded")
        return tokens

    def _check_work(self, prompt_tokens: list[int], params: SamplingParams) -> None:
        """One request's work, n x (prompt tokens + max_tokens) summed over its prompts, within the limit."""
        total = params.n * sum(tokens + params.max_tokens for tokens in prompt_tokens)
        if total > self.limits.max_total_tokens:
            raise oa.APIError(
                400, f"max_tokens: {len(prompt_tokens)} prompt(s) x n {params.n} x (prompt tokens + max_tokens "
                     f"{params.max_tokens}) = {total} tokens is over this endpoint's limit of "
                     f"{self.limits.max_total_tokens} (serve.limits.max_total_tokens)",
                param="max_tokens", code="limit_exceeded")

    # -- generation --------------------------------------------------------------------------------------------------

    async def _generate(self, prompts: list[str], params: SamplingParams, prefix, adapter) -> list[list[Completion]]:
        """``params.n`` completions for each prompt. Batched: each prompt's choices are sequences of the running
        batch (a seeded choice j samples with seed + j, as when streamed; greedy choices are written once)."""
        if self.batcher is None:
            return await self.engine.generate_async(prompts, params, prefix, adapter)
        copies = 1 if effective_temperature(params.temperature) == 0 else params.n

        async def one(prompt: str, choice_params: SamplingParams) -> Completion:
            text, last = "", None
            async for last in self._batched_deltas(prompt, choice_params, prefix, adapter):
                text += last.text
            return Completion(text, last.finish_reason, last.prompt_tokens, last.completion_tokens)

        rows = await asyncio.gather(*[
            asyncio.gather(*[one(prompt, choice_params) for _, prompt, choice_params
                             in self._choices([prompt], params.model_copy(update={"n": copies}))])
            for prompt in prompts])
        return [list(row) * (params.n // copies) for row in rows]

    async def _batched_deltas(self, prompt: str, params: SamplingParams, prefix, adapter) -> AsyncIterator:
        """One sequence of the running batch, as its pieces arrive. However this ends (finished, failed, or the
        client gone and this generator closed or cancelled), the sequence leaves the batch."""
        loop, pieces = asyncio.get_running_loop(), asyncio.Queue()
        ids = self.engine.tokenizer(prompt, add_special_tokens=True).input_ids
        sequence = Sequence(ids, params, lambda item: loop.call_soon_threadsafe(pieces.put_nowait, item),
                            prefix=prefix, adapter=adapter)
        self.batcher.submit(sequence)
        try:
            while True:
                item = await pieces.get()
                if isinstance(item, UnsatisfiableSchema):
                    raise schema_error(item)
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finish_reason:
                    return
        finally:
            self.batcher.cancel(sequence)

    async def _deltas(self, prompt: str, params: SamplingParams, prefix, adapter) -> AsyncIterator:
        pieces = (self._batched_deltas(prompt, params, prefix, adapter) if self.batcher is not None
                  else self.engine.stream_async(prompt, params, prefix, adapter))
        try:
            async for delta in pieces:
                yield delta
        finally:
            await pieces.aclose()  # the client left mid-stream: the sequence leaves the batch now

    def _choices(self, prompts: list[str], params: SamplingParams) -> Iterator[tuple[int, str, SamplingParams]]:
        """(choice index, prompt, params) for each streamed choice: choices are written one after another, and with
        a seed each gets its own (seed + j), so that n seeded samples differ."""
        for i, prompt in enumerate(prompts):
            for j in range(params.n):
                seed = None if params.seed is None else params.seed + j
                yield i * params.n + j, prompt, params.model_copy(update={"n": 1, "seed": seed})

    async def _completion_events(self, body: oa.CompletionRequest, params: SamplingParams, prefix, adapter):
        stream_id, prompt_tokens, completion_tokens = oa.new_id("cmpl"), 0, 0
        for index, prompt, choice_params in self._choices(body.prompts, params):
            if body.echo:
                yield oa.completion_chunk(stream_id, body.model, index, prompt, None)
            async for delta in self._deltas(prompt, choice_params, prefix, adapter):
                yield oa.completion_chunk(stream_id, body.model, index, delta.text, delta.finish_reason)
                if delta.finish_reason:
                    completion_tokens += delta.completion_tokens
                    prompt_tokens += delta.prompt_tokens if index % params.n == 0 else 0
        if body.stream_options and body.stream_options.include_usage:
            yield oa.usage_chunk(stream_id, body.model, "text_completion", prompt_tokens, completion_tokens)

    async def _chat_events(self, body: oa.ChatCompletionRequest, prompt: str, params: SamplingParams, prefix,
                           adapter):
        stream_id, prompt_tokens, completion_tokens = oa.new_id("chatcmpl"), 0, 0
        for index, _, choice_params in self._choices([prompt], params):
            yield oa.chat_chunk(stream_id, body.model, index, {"role": "assistant", "content": ""}, None)
            async for delta in self._deltas(prompt, choice_params, prefix, adapter):
                content = {"content": delta.text} if delta.text else {}
                yield oa.chat_chunk(stream_id, body.model, index, content, delta.finish_reason)
                if delta.finish_reason:
                    completion_tokens += delta.completion_tokens
                    prompt_tokens = delta.prompt_tokens
        if body.stream_options and body.stream_options.include_usage:
            yield oa.usage_chunk(stream_id, body.model, "chat.completion.chunk", prompt_tokens, completion_tokens)

    @staticmethod
    def _sse(events: AsyncIterator[dict]) -> StreamingResponse:
        async def body():
            try:
                async for event in events:
                    yield oa.sse(event)
            except oa.APIError as e:  # headers are gone already: the error travels as an event, then the stream ends
                yield oa.sse(e.body())
            except Exception:
                logger.exception("generation failed mid-stream")
                yield oa.sse(oa.APIError(500, "generation failed (the server log has the details)",
                                         type="server_error").body())
            yield oa.sse("[DONE]")

        return StreamingResponse(body(), media_type="text/event-stream")


def generator_app(model: str, *, engine: str = "transformers", engine_options: dict | None = None,
                  served_model_name: str | None = None, soft_prompts: dict[str, str] | None = None,
                  adapters: dict[str, str] | None = None, api_key: str | None = None, default_max_tokens: int = 16,
                  limits: oa.RequestLimits | dict | None = None, api_docs: bool = False,
                  autoscaling_config: dict | None = None, num_replicas: int | None = None, num_cpus: float = 1.0,
                  num_gpus: float = 0.0, max_ongoing_requests: int = 32, max_batch_size: int = 32,
                  runtime_env: dict | None = None) -> serve.Application:
    """The bound application: ``autoscaling_config`` (Serve's own keys) or a fixed ``num_replicas``. ``limits``:
    what one request may ask (``RequestLimits`` or its fields; defaults otherwise); ``api_docs``: serve ``/docs``,
    ``/redoc`` and ``/openapi.json``; ``adapters``: model name -> PEFT LoRA folder; ``max_batch_size``: sequences
    a replica decodes together (transformers engine)."""
    limits = oa.RequestLimits.model_validate(limits or {})
    if default_max_tokens > limits.max_tokens:  # every request without max_tokens would be refused
        raise ValueError(f"default_max_tokens ({default_max_tokens}) is above limits.max_tokens ({limits.max_tokens})")
    actor_options: dict = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if runtime_env:
        actor_options["runtime_env"] = runtime_env
    options: dict = {"ray_actor_options": actor_options, "max_ongoing_requests": max_ongoing_requests}
    if autoscaling_config:
        options["autoscaling_config"] = autoscaling_config
    else:
        options["num_replicas"] = num_replicas or 1
    if engine == "transformers" and not num_gpus:
        engine_options = {"torch_threads": max(1, round(num_cpus)), **(engine_options or {})}
    return GeneratorServer.options(**options).bind(
        model, engine=engine, engine_options=engine_options, served_model_name=served_model_name,
        soft_prompts=soft_prompts, adapters=adapters, api_key=api_key, default_max_tokens=default_max_tokens,
        limits=limits, api_docs=api_docs, max_batch_size=max_batch_size)
