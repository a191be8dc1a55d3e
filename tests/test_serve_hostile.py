"""Hostile and malformed requests against the generator endpoint, on a real local Ray Serve with the tiny Llama: each
is answered with a 4xx and OpenAI's error body (never a 5xx, never a hang), per-request limits come from the recipe,
the API key is checked before the body is read, the docs routes are off unless asked for, and a bounded fuzz of a
few hundred mutated requests finds no 5xx. Clients talk HTTP to 127.0.0.1 only."""

from __future__ import annotations

import json
import random
import time
from collections import Counter

import pytest
import requests
from ray import serve

from domainsynth.actors import serve_app
from domainsynth.actors.engines import SamplingParams, TransformersEngine, effective_temperature
from domainsynth.actors.openai_api import RequestLimits
from domainsynth.actors.serve_app import generator_app
from domainsynth.pipelines.recipe import RecipeError, build_recipe
from domainsynth.pipelines.serve import build_application

from conftest import free_port

KEY = "s3cret"
# Small limits, so that each is cheap to reach on 2 CPUs and the fuzz's valid requests stay quick.
LIMITS = {"max_body_bytes": 200_000, "max_prompt_chars": 5_000, "max_prompts": 4, "max_messages": 8, "max_n": 4,
          "max_tokens": 32, "max_stop_strings": 2, "max_stop_chars": 16, "max_total_tokens": 2_000,
          "max_schema_bytes": 2_000, "max_schema_depth": 8}
ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def server(ray_local, tiny_llama):
    """The app built from a recipe with LIMITS (no key, docs off), plus one at /keyed made by generator_app with the
    default limits, an API key and the docs on."""
    port = free_port()
    recipe = build_recipe({"serve": {"model": tiny_llama, "served_model_name": "tiny", "port": port, "num_cpus": 0.5,
                                     "api_key_env": None, "default_max_tokens": 4, "limits": LIMITS,
                                     "autoscaling": {"min_replicas": 1, "max_replicas": 1}}}, "test", "/")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_application(recipe.serve), name="hostile", route_prefix="/")
    serve.run(generator_app(tiny_llama, served_model_name="tiny", api_key=KEY, api_docs=True, num_cpus=0.25),
              name="keyed", route_prefix="/keyed")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def post(url: str, body: dict, **kwargs) -> requests.Response:
    return requests.post(url, json=body, timeout=60, **kwargs)


def post_raw(url: str, data: bytes, content_type: str | None = "application/json", **kwargs) -> requests.Response:
    headers = {"content-type": content_type} if content_type else {}
    return requests.post(url, data=data, headers={**headers, **kwargs.pop("headers", {})}, timeout=60, **kwargs)


def error_of(r: requests.Response, status: int) -> dict:
    """The OpenAI error of a refused request, after checking its status and shape."""
    assert r.status_code == status, r.text[:500]
    error = r.json()["error"]
    assert set(error) == ERROR_FIELDS and error["message"], error
    assert "Traceback" not in r.text
    return error


def completion(**fields) -> dict:
    return {"model": "tiny", "prompt": "The liver", "max_tokens": 2, **fields}


def chat(**fields) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "What is a gene?"}], "max_tokens": 2, **fields}


def json_schema(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}


# -- the 500s found on main -----------------------------------------------------------------------------------------

SCHEMA_PROBLEMS = [
    ("dangling $ref", {"$ref": "#/$defs/nope"}, "Cannot find"),
    ("minimum above maximum", {"type": "integer", "minimum": 5, "maximum": 1}, "minimum greater than maximum"),
    ("a $ref to itself", {"$ref": "#"}, "no JSON value satisfies it"),
    ("mutual $refs", {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
     "no JSON value satisfies it"),
    ("minLength above maxLength", {"type": "string", "minLength": 5, "maxLength": 1}, "greater than maxLength"),
    ("empty enum", {"enum": []}, "enum"),
    ("an integer past 64 bits", {"type": "integer", "minimum": 10**30}, "Integer exceeds"),
]


@pytest.mark.parametrize("case, schema, says", SCHEMA_PROBLEMS, ids=[c[0] for c in SCHEMA_PROBLEMS])
def test_json_schemas_xgrammar_cannot_compile_are_a_400(server, case, schema, says):
    for route, body in (("completions", completion()), ("chat/completions", chat())):
        error = error_of(post(f"{server}/v1/{route}", {**body, "response_format": json_schema(schema)}), 400)
        assert error["param"] == "response_format" and error["code"] == "invalid_json_schema"
        assert says in error["message"] and ".cc:" not in error["message"]  # no C++ source location


def test_a_schema_only_lone_byte_tokens_could_write_is_a_400_not_nan_sampling(server):
    """Structured output bans lone bytes of multi-byte characters; a schema that needs exactly those dead-ends
    mid-generation. Found while streaming, it arrives as an error event of the same kind."""
    unicorns = json_schema({"type": "string", "pattern": "^🦄+$", "minLength": 2})
    error = error_of(post(f"{server}/v1/completions", completion(max_tokens=8, response_format=unicorns)), 400)
    assert error["param"] == "response_format" and "cannot be completed" in error["message"]
    streamed = post(f"{server}/v1/completions", completion(max_tokens=8, stream=True, response_format=unicorns))
    assert streamed.status_code == 200
    events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert events[-1]["error"]["type"] == "invalid_request_error" and events[-1]["error"]["param"] == "response_format"


def test_an_empty_prompt_is_a_400_as_vllm_answers_it(server):
    """The tiny tokenizer adds no BOS token, so "" has no tokens at all: vLLM's OpenAI server refuses such a prompt
    ("the decoder prompt cannot be empty") and so do we. A prompt that tokenizes to something is generated from."""
    error = error_of(post(f"{server}/v1/completions", completion(prompt="")), 400)
    assert error["param"] == "prompt" and "empty" in error["message"]
    assert error_of(post(f"{server}/v1/completions", completion(prompt=["x", ""])), 400)["param"] == "prompt.1"
    assert post(f"{server}/v1/completions", completion(prompt=" ")).status_code == 200


def test_a_tiny_positive_temperature_decodes_greedily(server):
    greedy = post(f"{server}/v1/completions", completion(max_tokens=6, temperature=0)).json()
    for tiny in (1e-300, 5e-324, 1e-6):
        r = post(f"{server}/v1/completions", completion(max_tokens=6, temperature=tiny))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == greedy["choices"][0]["text"]
    assert post(f"{server}/v1/completions", completion(temperature=1e-3)).status_code == 200  # raised to 0.01


@pytest.mark.parametrize("seed", [2**63, 2**64, 10**30, -1])
def test_seeds_outside_a_signed_64_bit_integer_are_a_400(server, seed):
    error = error_of(post(f"{server}/v1/completions", completion(seed=seed)), 400)
    assert error["param"] == "seed"


def test_the_largest_seed_works_for_every_choice_of_a_stream(server):
    r = post(f"{server}/v1/completions", completion(seed=2**63 - 1, n=3, stream=True, temperature=0.9))
    assert r.status_code == 200 and '"server_error"' not in r.text and r.text.rstrip().endswith("[DONE]")


@pytest.mark.parametrize("route, raw", [
    ("completions", b'{"model": "tiny", "prompt": "\\ud800", "max_tokens": 2}'),
    ("completions", b'{"model": "tiny", "prompt": ["ok", "x\\udfff"], "max_tokens": 2}'),
    ("completions", b'{"model": "tiny", "prompt": "x", "stop": ["\\ud83d"], "max_tokens": 2}'),
    ("chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udc00"}]}'),
    ("completions", b'{"model": "tiny", "prompt": "x", "\\ud800": 1}'),
    ("completions", b'{"model": "\\ud800", "prompt": "x"}'),
])
def test_lone_surrogates_are_refused_wherever_they_are(server, route, raw):
    r = post_raw(f"{server}/v1/{route}", raw)
    assert r.status_code in (400, 404), r.text
    error_of(r, r.status_code)


def test_odd_but_valid_unicode_is_generated_from(server):
    for prompt in ("\u0000\u0001", "שלום עולם", "🦄🧬" * 50, "e\u0301\u0301\u0301", "\ufeffBOM", "\U0010ffff"):
        assert post(f"{server}/v1/completions", completion(prompt=prompt)).status_code == 200, prompt


# -- limits -----------------------------------------------------------------------------------------------------------

LIMIT_CASES = [
    ("prompts", "completions", completion(prompt=["x"] * 5), "prompt", "max_prompts"),
    ("prompt characters", "completions", completion(prompt="a" * 5_001), "prompt", "max_prompt_chars"),
    ("characters of one of the prompts", "completions", completion(prompt=["x", "a" * 5_001]), "prompt.1",
     "max_prompt_chars"),
    ("n", "completions", completion(n=5), "n", "max_n"),
    ("max_tokens", "completions", completion(max_tokens=33), "max_tokens", "max_tokens"),
    ("max_completion_tokens", "chat/completions", {**chat(), "max_tokens": None, "max_completion_tokens": 33},
     "max_tokens", "max_tokens"),
    ("stop strings", "completions", completion(stop=["a", "b", "c"]), "stop", "max_stop_strings"),
    ("stop string length", "completions", completion(stop="a" * 17), "stop", "max_stop_chars"),
    ("total work", "completions", completion(prompt=["word " * 100] * 4, n=4, max_tokens=32), "max_tokens",
     "max_total_tokens"),
    ("schema size", "completions", completion(response_format=json_schema(
        {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(100)}})),
     "response_format", "max_schema_bytes"),
    ("schema depth", "completions", completion(response_format=json_schema(
        json.loads('{"type": "array", "items": ' * 9 + "{}" + "}" * 9))), "response_format", "max_schema_depth"),
    ("messages", "chat/completions", {**chat(), "messages": [{"role": "user", "content": "x"}] * 9}, "messages",
     "max_messages"),
    ("message characters", "chat/completions", {**chat(), "messages": [{"role": "user", "content": "a" * 3_000}] * 2},
     "messages", "max_prompt_chars"),
]


@pytest.mark.parametrize("case, route, body, field, limit", LIMIT_CASES, ids=[c[0] for c in LIMIT_CASES])
def test_a_request_over_a_limit_is_a_400_naming_the_field_and_the_limit(server, case, route, body, field, limit):
    error = error_of(post(f"{server}/v1/{route}", {k: v for k, v in body.items() if v is not None}), 400)
    assert error["param"] == field and error["code"] == "limit_exceeded"
    assert f"serve.limits.{limit}" in error["message"] and str(LIMITS[limit]) in error["message"]


def test_requests_at_the_limits_are_answered(server):
    body = completion(prompt=["x", "y"], n=2, max_tokens=4, stop=["a" * 16, "b"])
    assert post(f"{server}/v1/completions", body).status_code == 200


def test_a_body_over_max_body_bytes_is_a_413_declared_or_chunked(server):
    big = json.dumps(completion(prompt="a" * 200_001)).encode()
    error = error_of(post_raw(f"{server}/v1/completions", big), 413)
    assert "serve.limits.max_body_bytes" in error["message"]

    def chunks():
        yield big[:100]
        for i in range(100, len(big), 10_000):
            yield big[i:i + 10_000]

    error_of(post_raw(f"{server}/v1/completions", chunks()), 413)  # no Content-Length: counted as it arrives
    assert post(f"{server}/v1/completions", completion()).status_code == 200


def test_the_default_limits_stop_a_100k_character_stop_string_at_once(server):
    started = time.monotonic()
    r = post(f"{server}/keyed/v1/completions", completion(stop="a" * 100_000), headers={"Authorization": f"Bearer {KEY}"})
    error = error_of(r, 400)
    assert "serve.limits.max_stop_chars" in error["message"] and str(RequestLimits().max_stop_chars) in error["message"]
    assert time.monotonic() - started < 5


def test_limits_are_validated_with_the_recipe():
    with pytest.raises(RecipeError, match="serve.limits.max_n"):
        build_recipe({"serve": {"model": "m", "limits": {"max_n": 0}}}, "test", "/")
    with pytest.raises(RecipeError, match="serve.limits.max_prompt"):
        build_recipe({"serve": {"model": "m", "limits": {"max_prompt": 10}}}, "test", "/")
    recipe = build_recipe({"serve": {"model": "m"}}, "test", "/")
    assert recipe.serve.limits == RequestLimits() and recipe.serve.api_docs is False
    with pytest.raises(ValueError, match="default_max_tokens"):
        generator_app("m", default_max_tokens=64, limits={"max_tokens": 32})


# -- types ------------------------------------------------------------------------------------------------------------

STRICT_CASES = [
    ("max_tokens", "16"), ("max_tokens", 16.0), ("max_tokens", True), ("n", "2"), ("n", 1.5), ("seed", "3"),
    ("stream", "yes"), ("stream", 1), ("echo", "false"), ("temperature", "0.5"), ("temperature", True),
    ("top_k", "1"), ("top_k", 2**40), ("top_p", None), ("prompt", 5), ("prompt", [1, 2]), ("stop", 7),
    ("stream_options", {"include_usage": "yes"}), ("model", 3), ("user", 1),
]


@pytest.mark.parametrize("field, value", STRICT_CASES, ids=[f"{f}={v!r}"[:40] for f, v in STRICT_CASES])
def test_no_string_to_number_or_bool_coercion(server, field, value):
    error = error_of(post(f"{server}/v1/completions", completion(**{field: value})), 400)
    assert (error["param"] or "").startswith(field)


def test_an_int_is_still_a_valid_float(server):
    assert post(f"{server}/v1/completions", completion(temperature=1, top_p=1)).status_code == 200


# -- FastAPI's and Starlette's own refusals, in OpenAI's shape -----------------------------------------------------

def test_unknown_paths_and_wrong_methods_get_the_openai_error_body(server):
    assert error_of(requests.get(f"{server}/v2/completions", timeout=30), 404)["code"] == "unknown_url"
    assert error_of(requests.post(f"{server}/v1/completion", json=completion(), timeout=30), 404)
    wrong = error_of(requests.get(f"{server}/v1/completions", timeout=30), 405)
    assert wrong["code"] == "method_not_allowed" and "POST" in wrong["message"]
    assert requests.get(f"{server}/v1/completions", timeout=30).headers["allow"] == "POST"
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):
        error_of(requests.request(method, f"{server}/v1/chat/completions", timeout=30), 405)
    error_of(requests.post(f"{server}/health", timeout=30), 405)


@pytest.mark.parametrize("case, data, content_type, status", [
    ("text/plain", b'{"model": "tiny", "prompt": "x"}', "text/plain", 415),
    ("form", b"model=tiny&prompt=x", "application/x-www-form-urlencoded", 415),
    ("no content type", b'{"model": "tiny", "prompt": "x"}', None, 415),
    ("truncated JSON", b'{"model": "tiny", "prompt": ', "application/json", 400),
    ("not UTF-8", b'{"model": "tiny", "prompt": "\xff\xfe"}', "application/json", 400),
    ("NaN", b'{"model": "tiny", "prompt": "x", "temperature": NaN}', "application/json", 400),
    ("Infinity", b'{"model": "tiny", "prompt": "x", "top_p": -Infinity}', "application/json", 400),
    ("a JSON list", b"[]", "application/json", 400),
    ("a JSON string", b'"hello"', "application/json", 400),
    ("null", b"null", "application/json", 400),
    ("empty body", b"", "application/json", 400),
    ("nested past the recursion limit", b'{"model": "tiny", "prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
     "application/json", 400),
])
def test_bodies_that_are_not_a_json_request_are_a_4xx(server, case, data, content_type, status):
    error_of(post_raw(f"{server}/v1/completions", data, content_type), status)


def test_a_json_content_type_with_parameters_is_json(server):
    body = json.dumps(completion()).encode()
    assert post_raw(f"{server}/v1/completions", body, "application/json; charset=utf-8").status_code == 200


# -- the API key first, docs off -------------------------------------------------------------------------------------

def test_a_missing_or_wrong_key_is_a_401_before_the_body_is_looked_at(server):
    url = f"{server}/keyed/v1/completions"
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        for data in (b"{", b'{"model": 5}', b"x" * 3_000_000, json.dumps(completion()).encode()):
            assert error_of(post_raw(url, data, headers=headers), 401)["code"] == "invalid_api_key"
        assert error_of(requests.get(f"{server}/keyed/v1/models", headers=headers, timeout=30), 401)
        assert error_of(requests.get(f"{server}/keyed/nowhere", headers=headers, timeout=30), 401)
    with_key = {"Authorization": f"Bearer {KEY}"}
    assert error_of(post_raw(url, b"{", headers=with_key), 400)["param"] == "body"
    assert post(url, completion(), headers=with_key).status_code == 200
    assert requests.get(f"{server}/keyed/health", timeout=30).status_code == 200


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"])
def test_the_docs_routes_are_off_unless_asked_for(server, path):
    assert error_of(requests.get(f"{server}{path}", timeout=30), 404)["code"] == "unknown_url"
    assert error_of(requests.get(f"{server}/keyed{path}", timeout=30), 401)  # on, but behind the key
    assert requests.get(f"{server}/keyed{path}", headers={"Authorization": f"Bearer {KEY}"},
                        timeout=30).status_code == 200


def test_serves_own_routes_listing_is_the_proxys_not_the_apps(server):
    """/-/routes (and /-/healthz) are answered by Serve's HTTP proxy before any application sees the request
    (ray/serve/_private/proxy.py): no app can close them, and they list only route prefixes and app names."""
    assert requests.get(f"{server}/-/routes", timeout=30).json() == {"/": "hostile", "/keyed": "keyed"}
    assert requests.get(f"{server}/-/healthz", timeout=30).status_code == 200


# -- a genuine fault is a 500 without traceback text -------------------------------------------------------------

def test_an_unexpected_exception_is_a_500_with_the_openai_body_and_no_traceback(monkeypatch):
    """RequestGate in-process around an app that fails, with a stand-in for the replica's deployment."""
    import asyncio

    class Deployment:
        api_key, api_docs, limits = None, False, RequestLimits()

        def key_accepted(self, authorization):
            return True

    async def failing_app(scope, receive, send):
        raise RuntimeError("secret detail at /srv/model/weights")

    monkeypatch.setattr(serve_app, "current_deployment", Deployment)
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/v1/models", "root_path": "", "headers": [],
             "query_string": b""}
    asyncio.run(serve_app.RequestGate(failing_app)(scope, receive, send))
    assert sent[0]["status"] == 500
    body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert body["error"]["type"] == "server_error" and "secret" not in json.dumps(body)


# -- the engine, as the batch stages use it ------------------------------------------------------------------------

def test_sampling_params_and_the_engine_take_the_edge_values(tiny_llama):
    assert effective_temperature(0) == 0 and effective_temperature(1e-300) == 0
    assert effective_temperature(1e-3) == 0.01 and effective_temperature(0.7) == 0.7
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2**63)
    engine = TransformersEngine(tiny_llama)
    greedy = engine.generate(["Cells"], SamplingParams(max_tokens=4, temperature=0))[0][0].text
    assert engine.generate(["Cells"], SamplingParams(max_tokens=4, temperature=1e-300))[0][0].text == greedy
    # A batch stage offsets its seed per batch (seed + offset, unvalidated); past 2**64 torch would refuse it.
    offset_seed = SamplingParams(max_tokens=2, temperature=0.9).model_copy(update={"seed": 2**64 + 5})
    assert engine.generate(["Cells"], offset_seed)[0][0].text
    with pytest.raises(ValueError, match="empty"):
        engine.generate(["Cells", ""], SamplingParams(max_tokens=2))
    assert engine.json_schema_problem({"type": "object"}) is None
    assert "no JSON value" in engine.json_schema_problem({"$ref": "#"})


# -- fuzz ---------------------------------------------------------------------------------------------------------------

HOSTILE_VALUES = [
    None, True, False, 0, -1, 1, 2, 3, 2**31, 2**63, 2**64, -2**63 - 1, 10**30, 0.5, -0.0, 1e-300, 1e308, -1e308,
    "", "16", "yes", "true", "null", "\u0000", "\u202e\u2066", "🦄" * 200, "a" * 6_000, [], [None], ["x"] * 9, {},
    {"a": {"b": {"c": [1, [2, [3]]]}}}, json.loads("[" * 60 + "]" * 60),
]
BAD_SCHEMAS = [schema for _, schema, _ in SCHEMA_PROBLEMS] + [
    {"type": "no-such-type"}, {"type": "string", "pattern": "(("}, {"type": "string", "pattern": "^🦄+$", "minLength": 2},
    {"type": "string", "maxLength": 10**9}, {"not": {}}, {"allOf": [{"type": "string"}, {"type": "integer"}]},
    {"type": "object", "required": ["a"], "additionalProperties": False}, {"type": "integer", "multipleOf": 7},
    {"properties": "x"}, {"$ref": "http://127.0.0.1:1/schema.json"}, {"enum": ["é", "\u0001", "🧬"]},
    {"type": "array", "minItems": 3, "maxItems": 1}, json.loads('{"items": ' * 7 + "{}" + "}" * 7), True, False, [],
    {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]},
]
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n",
          "seed", "stop", "stream", "stream_options", "response_format", "echo", "user", "best_of", "logprobs", "x"]
PATHS = ["/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/v1/completions/", "/V1/COMPLETIONS",
         "/v1//completions", "/v1/completions?x=%00", "/v1/%ff", "/..%2f..%2fetc/passwd", "/" + "a" * 2_000, "/docs",
         "/openapi.json", "/v1/models/tiny"]
CONTENT_TYPES = ["text/plain", None, "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                 "application/json; charset=latin-1", "application/problem+json", "application/jsonx"]
RAW_BODIES = [b"{", b"[]", b"null", b'"x"', b"\xff\xfe\x00", b"\xef\xbb\xbf{}", b'{"model": "tiny", "model": 1}',
              b'{"model": "tiny", "prompt": "x", "temperature": NaN}', b'{"prompt": Infinity}', b"{}" * 1000,
              b'{"model": "tiny", "prompt": ' + b"[" * 3_000 + b"]" * 3_000 + b"}", b"x" * 250_000]


def mutated_request(rng: random.Random, server: str) -> tuple[str, str, dict]:
    """(method, url, requests keyword arguments): a valid body of either route, mutated once or a few times."""
    route = rng.choice(["/v1/completions", "/v1/chat/completions"])
    body = completion() if route == "/v1/completions" else chat()
    kind = rng.random()
    if kind < 0.08:
        return rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]), server + route, {"json": body}
    if kind < 0.16:
        return rng.choice(["GET", "POST"]), server + rng.choice(PATHS), {"json": body}
    if kind < 0.24:
        content_type = rng.choice(CONTENT_TYPES)
        return "POST", server + route, {"data": json.dumps(body).encode(),
                                        "headers": {"content-type": content_type} if content_type else {}}
    if kind < 0.32:
        return "POST", server + route, {"data": rng.choice(RAW_BODIES), "headers": {"content-type": "application/json"}}
    if kind < 0.38:  # the keyed app: always a 401 without its key, whatever the body
        return "POST", f"{server}/keyed{route}", {"data": rng.choice(RAW_BODIES + [json.dumps(body).encode()]),
                                                  "headers": {"content-type": "application/json"}}
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        mutate_body(rng, body)
    if rng.random() < 0.05:  # a lone surrogate somewhere in the text, as raw JSON
        raw = json.dumps(body).replace("The liver", "\\ud800 liver").replace("What is", "\\udfff")
        return "POST", server + route, {"data": raw.encode(), "headers": {"content-type": "application/json"}}
    return "POST", server + route, {"json": body}


def in_range_value(rng: random.Random, field: str):
    """A value the field accepts (or just past its limit), so that mutated requests reach the engine too."""
    choices = {
        "prompt": lambda: rng.choice(["x", " ", "\u0000", "🧬" * rng.randint(1, 40), "word " * rng.randint(1, 300),
                                      ["a", "b"], ["x"] * rng.randint(1, 5)]),
        "max_tokens": lambda: rng.choice([1, 2, 4, 33]), "max_completion_tokens": lambda: rng.choice([1, 3]),
        "temperature": lambda: rng.choice([0, 1, 2, 1e-300, 1e-4, rng.random() * 2, 2.0000001]),
        "top_p": lambda: rng.choice([1e-300, 1, rng.random() or 1.0]), "top_k": lambda: rng.choice([-1, 0, 1, 5]),
        "n": lambda: rng.randint(1, 5), "seed": lambda: rng.choice([0, 2**63 - 1, rng.getrandbits(63)]),
        "stop": lambda: rng.choice(["a", ["e", " "], "x" * 16, "x" * 17, ["a", "b", "c"], "🧬"]),
        "stream": lambda: True, "echo": lambda: rng.choice([True, False]),
        "stream_options": lambda: {"include_usage": rng.choice([True, False])},
    }
    return choices[field]() if field in choices else rng.choice(HOSTILE_VALUES)


def mutate_body(rng: random.Random, body: dict) -> None:
    field = rng.choice(FIELDS)
    action = rng.random()
    if action < 0.4:
        body[field] = in_range_value(rng, field)
    elif action < 0.5:
        body.pop(field, None)
    elif field == "response_format":
        body["response_format"] = rng.choice([json_schema(rng.choice(BAD_SCHEMAS)), {"type": "json_object"},
                                              {"type": "json_schema"}, {"type": "text"}, {"type": "xml"}])
    elif field == "messages" and action < 0.8:
        body["messages"] = rng.choice([
            [{"role": "robot", "content": "x"}], [{"role": "user"}], [{"role": "user", "content": None}],
            [{"role": "user", "content": [{"type": "text", "text": "x"}]}], [{"role": "assistant", "content": "x"}],
            [{"role": "system", "content": "s"}, {"role": "system", "content": "t"}], "hello",
            [{"role": "user", "content": rng.choice(HOSTILE_VALUES)}]])
    else:
        body[field] = rng.choice(HOSTILE_VALUES)
    if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool) \
            and 4 < body["max_tokens"] <= 32:
        body["max_tokens"] = 4  # keep valid requests quick on 2 CPUs


def send_and_classify(method: str, url: str, kwargs: dict) -> str:
    """'2xx', '4xx', '5xx' or 'timeout'; a 4xx must carry OpenAI's error body (a 401 on the keyed app, whatever the
    body), and a 2xx stream no server_error event."""
    try:
        r = requests.request(method, url, timeout=(5, 30), **kwargs)
    except requests.Timeout:
        return "timeout"
    if r.status_code >= 500:
        return "5xx"
    if "/keyed/" in url:
        assert r.status_code == 401, (method, url, r.text[:300])
    if r.status_code >= 400:
        if method != "HEAD":
            error = r.json()["error"]
            assert set(error) == ERROR_FIELDS, (method, url, r.text[:300])
        return "4xx"
    assert '"server_error"' not in r.text, (method, url, r.text[:300])
    return "2xx"


def test_fuzz_a_few_hundred_mutated_requests_get_no_5xx_and_no_hang(server):
    """500 requests from a fixed seed, sent by 4 clients at once (so that checks on the event loop meet generation
    in its thread, as they do under load)."""
    from concurrent.futures import ThreadPoolExecutor

    rng = random.Random(14)
    cases = [mutated_request(rng, server) for _ in range(500)]
    started = time.monotonic()
    with ThreadPoolExecutor(4) as clients:
        outcomes = list(clients.map(lambda case: send_and_classify(*case), cases))
    elapsed = time.monotonic() - started
    counts = Counter(outcomes)
    failures = [(outcome, method, url[:120], str(kwargs)[:300])
                for outcome, (method, url, kwargs) in zip(outcomes, cases) if outcome in ("5xx", "timeout")]
    print(f"\nfuzz: {counts['2xx']} 2xx, {counts['4xx']} 4xx, {counts['5xx']} 5xx, {counts['timeout']} timeouts "
          f"in {elapsed:.1f}s")
    assert not failures, failures[:10]
    assert counts["2xx"] > 50 and counts["4xx"] > 200  # the mutations reach both sides
    assert post(f"{server}/v1/completions", completion()).status_code == 200  # and the replica is still well
