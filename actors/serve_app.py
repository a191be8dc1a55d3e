"""The generator endpoint: a Ray Serve deployment whose replicas each hold an engine, speaking OpenAI's API.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``"stream": true``), ``GET /v1/models``
and ``GET /health``. Soft prompts are served as models of their own (the way vLLM serves LoRA adapters): a request
for model ``medical`` is generated with the ``medical`` soft prompt before its tokens.

A replica runs one generation at a time (the engine batches within a request); requests waiting on it count as its
ongoing requests, which is what Serve's autoscaler scales on.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route signatures' types at run time, inside a
# replica where cloudpickle kept only the globals the method bodies use.
import asyncio
import hmac
import logging
import os
from typing import AsyncIterator, Iterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve

from . import openai_api as oa
from .engines import SamplingParams, load_engine
from .soft_prompt import load_soft_prompt

logger = logging.getLogger("ray.serve")
api = FastAPI(title="domainsynth generator", description="OpenAI-compatible completions from a domain generator")


@api.exception_handler(oa.APIError)
async def _api_error(request: Request, error: oa.APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


@api.exception_handler(RequestValidationError)
async def _bad_body(request: Request, error: RequestValidationError) -> JSONResponse:
    message, field = oa.validation_message(error.errors())
    return JSONResponse(oa.APIError(400, message, param=field).body(), status_code=400)


@api.exception_handler(ValidationError)
async def _bad_parameters(request: Request, error: ValidationError) -> JSONResponse:
    """Out-of-range sampling parameters, found when a request becomes SamplingParams."""
    message, field = oa.validation_message(error.errors())
    return JSONResponse(oa.APIError(400, message, param=field).body(), status_code=400)


DEPLOYMENT_NAME = "generator"  # what a Serve config file's `deployments` entries name


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class GeneratorServer:
    def __init__(self, model: str, engine: str = "transformers", engine_options: Optional[dict] = None,
                 served_model_name: Optional[str] = None, soft_prompts: Optional[dict] = None,
                 api_key: Optional[str] = None, default_max_tokens: int = 16):
        self.engine = load_engine(model, engine, **(engine_options or {}))
        self.engine_kind = engine
        self.base_model = served_model_name or os.path.basename(model.rstrip("/"))
        self.prefixes = {self.base_model: None}
        for name, path in (soft_prompts or {}).items():
            prefix = load_soft_prompt(path)
            self.engine.check_prefix(prefix)  # a prompt of the wrong width fails the replica at start, not later
            self.prefixes[name] = prefix
        self.api_key = api_key
        self.default_max_tokens = default_max_tokens
        self._engine_lock = asyncio.Lock()

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.base_model, "engine": self.engine_kind}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorise(request)
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "domainsynth",
             "root": self.base_model, "parent": None if prefix is None else self.base_model,
             "max_model_len": self.engine.max_model_len,
             "soft_prompt_tokens": 0 if prefix is None else int(prefix.shape[0])}
            for name, prefix in self.prefixes.items()]}

    @api.post("/v1/completions")
    async def completions(self, body: oa.CompletionRequest, request: Request):
        self._authorise(request)
        prefix = self._prefix(body.model)
        params = body.sampling_params(self.default_max_tokens)
        for i, prompt in enumerate(body.prompts):
            self._check_fits(prompt, prefix, params, "prompt" if isinstance(body.prompt, str) else f"prompt.{i}")
        if body.stream:
            return self._sse(self._completion_events(body, params, prefix))
        results = await self._run(self.engine.generate, body.prompts, params, prefix)
        return oa.completion_response(body.model, body.prompts, results, body.echo)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: oa.ChatCompletionRequest, request: Request):
        self._authorise(request)
        prefix = self._prefix(body.model)
        params = body.sampling_params(self.default_max_tokens)
        try:
            prompt = self.engine.chat_prompt([m.model_dump(exclude_none=True) for m in body.messages])
        except Exception as e:  # the model's chat template refused the conversation (e.g. roles out of order)
            raise oa.APIError(400, f"messages: the model's chat template refused them: {e}", param="messages")
        self._check_fits(prompt, prefix, params, "messages")
        if body.stream:
            return self._sse(self._chat_events(body, prompt, params, prefix))
        results = await self._run(self.engine.generate, [prompt], params, prefix)
        return oa.chat_response(body.model, results[0])

    # -- checks ----------------------------------------------------------------------------------------------------

    def _authorise(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise oa.APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                              type="authentication_error", code="invalid_api_key")

    def _prefix(self, model: str):
        if model not in self.prefixes:
            raise oa.APIError(404, f"model {model!r} does not exist here; served: {', '.join(self.prefixes)}",
                              param="model", code="model_not_found")
        return self.prefixes[model]

    def _check_fits(self, prompt: str, prefix, params: SamplingParams, field: str) -> None:
        overflow = self.engine.context_overflow(prompt, params, prefix)
        if overflow:
            raise oa.APIError(400, f"{field}: {overflow}", param=field, code="context_length_exceeded")

    # -- generation --------------------------------------------------------------------------------------------------

    async def _run(self, fn, *args):
        """One engine call at a time per replica, off the event loop so health checks and queueing go on."""
        async with self._engine_lock:
            return await asyncio.to_thread(fn, *args)

    async def _deltas(self, prompt: str, params: SamplingParams, prefix) -> AsyncIterator:
        async with self._engine_lock:
            deltas: Iterator = self.engine.stream(prompt, params, prefix)
            done = object()
            while (delta := await asyncio.to_thread(next, deltas, done)) is not done:
                yield delta

    def _choices(self, prompts: list[str], params: SamplingParams) -> Iterator[tuple[int, str, SamplingParams]]:
        """(choice index, prompt, params) for each streamed choice: choices are written one after another, and with
        a seed each gets its own (seed + j), so that n seeded samples differ."""
        for i, prompt in enumerate(prompts):
            for j in range(params.n):
                seed = None if params.seed is None else params.seed + j
                yield i * params.n + j, prompt, params.model_copy(update={"n": 1, "seed": seed})

    async def _completion_events(self, body: oa.CompletionRequest, params: SamplingParams, prefix):
        stream_id, prompt_tokens, completion_tokens = oa.new_id("cmpl"), 0, 0
        for index, prompt, choice_params in self._choices(body.prompts, params):
            if body.echo:
                yield oa.completion_chunk(stream_id, body.model, index, prompt, None)
            async for delta in self._deltas(prompt, choice_params, prefix):
                yield oa.completion_chunk(stream_id, body.model, index, delta.text, delta.finish_reason)
                if delta.finish_reason:
                    completion_tokens += delta.completion_tokens
                    prompt_tokens += delta.prompt_tokens if index % params.n == 0 else 0
        if body.stream_options and body.stream_options.include_usage:
            yield oa.usage_chunk(stream_id, body.model, "text_completion", prompt_tokens, completion_tokens)

    async def _chat_events(self, body: oa.ChatCompletionRequest, prompt: str, params: SamplingParams, prefix):
        stream_id, prompt_tokens, completion_tokens = oa.new_id("chatcmpl"), 0, 0
        for index, _, choice_params in self._choices([prompt], params):
            yield oa.chat_chunk(stream_id, body.model, index, {"role": "assistant", "content": ""}, None)
            async for delta in self._deltas(prompt, choice_params, prefix):
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
            except Exception as e:  # headers are gone already: the error travels as an event, then the stream ends
                logger.exception("generation failed mid-stream")
                yield oa.sse(oa.APIError(500, f"generation failed: {e}", type="server_error").body())
            yield oa.sse("[DONE]")

        return StreamingResponse(body(), media_type="text/event-stream")


def generator_app(model: str, *, engine: str = "transformers", engine_options: dict | None = None,
                  served_model_name: str | None = None, soft_prompts: dict[str, str] | None = None,
                  api_key: str | None = None, default_max_tokens: int = 16, autoscaling_config: dict | None = None,
                  num_replicas: int | None = None, num_cpus: float = 1.0, num_gpus: float = 0.0,
                  max_ongoing_requests: int = 8, runtime_env: dict | None = None) -> serve.Application:
    """The bound application: ``autoscaling_config`` (Serve's own keys) or a fixed ``num_replicas``."""
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
        soft_prompts=soft_prompts, api_key=api_key, default_max_tokens=default_max_tokens)

