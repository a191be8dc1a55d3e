"""The generator endpoint on a real local Ray Serve with the tiny Llama: OpenAI routes answer, streaming, structured
output, soft prompts served as models, bad requests refused with a 4xx JSON error, an API key, and replicas that
scale up under load and back down after it. Nothing is mocked; clients talk HTTP to 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time

import jsonschema
import pytest
import requests
from ray import serve

from domainsynth.actors.engines import SamplingParams, TransformersEngine
from domainsynth.actors.serve_app import generator_app
from domainsynth.actors.soft_prompt import load_soft_prompt
from domainsynth.pipelines.recipe import build_recipe
from domainsynth.pipelines.serve import build_application

from conftest import free_port
from schemas import QUIZ

APP = "generator"
# Short delays so that the test sees a whole scale-up and scale-down in well under a minute.
AUTOSCALING = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1, "upscale_delay_s": 1,
               "downscale_delay_s": 3, "look_back_period_s": 2}


@pytest.fixture(scope="module")
def server(ray_local, tiny_llama, soft_prompt_file):
    """The app built from a recipe's serve section, as `domainsynth serve RECIPE` builds it, plus a second app at
    /keyed that requires an API key."""
    port = free_port()
    recipe = build_recipe({"serve": {"model": tiny_llama, "served_model_name": "tiny", "port": port,
                                     "num_cpus": 0.5, "soft_prompts": {"medical": soft_prompt_file},
                                     "api_key_env": None, "autoscaling": AUTOSCALING}}, "test", "/")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_application(recipe.serve), name=APP, route_prefix="/")
    serve.run(generator_app(tiny_llama, served_model_name="tiny", api_key="s3cret", num_cpus=0.25),
              name="keyed", route_prefix="/keyed")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def post(url: str, body: dict, **kwargs) -> requests.Response:
    return requests.post(url, json=body, timeout=120, **kwargs)


def events(response: requests.Response) -> list:
    """The server-sent events of a streamed answer, parsed; '[DONE]' last."""
    out = []
    for line in response.iter_lines(decode_unicode=True):
        if line:
            assert line.startswith("data: ")
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_completions_chat_models_and_health_answer(server):
    health = requests.get(f"{server}/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    models = requests.get(f"{server}/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["tiny", "medical"]
    assert models["data"][1]["parent"] == "tiny" and models["data"][1]["soft_prompt_tokens"] == 8

    r = post(f"{server}/v1/completions", {"model": "tiny", "prompt": ["The liver", "Genes encode"], "n": 2,
                                          "max_tokens": 8, "temperature": 0.9, "seed": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["text"] and c["finish_reason"] in ("stop", "length") for c in body["choices"])
    assert 0 < body["usage"]["completion_tokens"] <= 4 * 8
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]

    chat = post(f"{server}/v1/chat/completions", {"model": "tiny", "max_tokens": 8, "messages": [
        {"role": "system", "content": "You are a biology tutor."}, {"role": "user", "content": "What is a gene?"}]})
    assert chat.status_code == 200, chat.text
    message = chat.json()["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"]
    # The chat template is applied server-side: the system and user turns are counted as prompt tokens.
    assert chat.json()["usage"]["prompt_tokens"] > 10


def test_the_openai_client_works_against_the_endpoint(server):
    """The contract clients rely on, checked with OpenAI's own Python client (completions, chat, streaming, models,
    and its error type for a 4xx)."""
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny", "medical"]
    completion = client.completions.create(model="tiny", prompt="Cells divide", max_tokens=6, temperature=0)
    assert completion.choices[0].text and completion.usage.completion_tokens <= 6
    chat = client.chat.completions.create(model="medical", max_tokens=6,
                                          messages=[{"role": "user", "content": "What is a gene?"}])
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", max_tokens=12, temperature=0, stream=True, messages=[{"role": "user", "content": "Hi"}])]
    assert len([p for p in pieces if p]) > 1
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="x", temperature=7)


def test_standard_openai_fields_at_neutral_values_are_served_and_change_nothing(server):
    """What OpenAI's client sends when a user passes its documented defaults: served (200), and the greedy answer is
    the one without them; a value that would change the answer is a 400 naming the field."""
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    plain = [{"role": "system", "content": "You are a tutor."}, {"role": "user", "content": "What is a gene?"}]
    greedy = dict(model="tiny", max_tokens=8, temperature=0)
    expected = client.chat.completions.create(messages=plain, **greedy).choices[0].message.content
    chat = client.chat.completions.create(
        messages=[{"role": "developer", "content": "You are a tutor."},  # OpenAI's newer name for system
                  {"role": "user", "content": [{"type": "text", "text": "What is a gene?"}]}],
        presence_penalty=0, frequency_penalty=0, logprobs=False, logit_bias={}, user="u-1", **greedy)
    assert chat.choices[0].message.content == expected
    parts = client.chat.completions.create(messages=[plain[0], {"role": "user", "content": [
        {"type": "text", "text": "What is"}, {"type": "text", "text": "a gene?"}]}], **greedy)
    one_text = client.chat.completions.create(
        messages=[plain[0], {"role": "user", "content": "What is\na gene?"}], **greedy)  # parts join by newline
    assert (parts.usage.prompt_tokens, parts.choices[0].message.content) == \
        (one_text.usage.prompt_tokens, one_text.choices[0].message.content)
    text = client.completions.create(model="tiny", prompt="Cells", max_tokens=6, temperature=0).choices[0].text
    assert client.completions.create(model="tiny", prompt="Cells", max_tokens=6, temperature=0, best_of=1,
                                     presence_penalty=0, user="u-1").choices[0].text == text

    refused = [("logprobs", dict(messages=plain, logprobs=True)),
               ("presence_penalty", dict(messages=plain, presence_penalty=0.5)),
               ("logit_bias", dict(messages=plain, logit_bias={"42": 5})),
               ("messages.1.content", dict(messages=[plain[0], {"role": "user", "content": [
                   {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]))]
    for field, kwargs in refused:
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model="tiny", max_tokens=4, **kwargs)
        assert error.value.body["param"] == field or field in error.value.body["message"], error.value.body
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model="tiny", prompt="x", max_tokens=4, logprobs=2)


@pytest.mark.parametrize("route, body", [
    ("completions", {"model": "tiny", "prompt": "The immune system"}),
    ("chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "The immune system"}]}),
])
def test_streaming_sends_the_same_text_in_pieces(server, route, body):
    greedy = {**body, "max_tokens": 24, "temperature": 0}
    whole = post(f"{server}/v1/{route}", greedy).json()["choices"][0]
    whole_text = whole.get("text", whole.get("message", {}).get("content"))
    r = post(f"{server}/v1/{route}", {**greedy, "stream": True, "stream_options": {"include_usage": True}},
             stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    got = events(r)
    assert got[-1] == "[DONE]"
    chunks, usage = got[:-2], got[-2]
    pieces = [c["choices"][0].get("text", c["choices"][0].get("delta", {}).get("content", "")) for c in chunks]
    assert "".join(pieces) == whole_text
    assert sum(1 for p in pieces if p) > 3  # written as it was generated, not sent whole at the end
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]
    assert usage["usage"]["completion_tokens"] == 24 or whole["finish_reason"] == "stop"


def test_structured_output_always_parses_against_its_schema(server):
    response_format = {"type": "json_schema", "json_schema": {"name": "quiz", "schema": QUIZ}}
    texts = []
    for seed in range(2):
        r = post(f"{server}/v1/completions", {"model": "tiny", "prompt": "Write a quiz question:", "n": 4,
                                              "max_tokens": 200, "seed": seed, "response_format": response_format})
        assert r.status_code == 200, r.text
        texts += [c["text"] for c in r.json()["choices"]]
    chat = post(f"{server}/v1/chat/completions", {"model": "medical", "max_tokens": 200, "response_format":
                                                  response_format, "messages": [{"role": "user", "content": "Quiz"}]})
    texts.append(chat.json()["choices"][0]["message"]["content"])
    streamed = post(f"{server}/v1/completions", {"model": "tiny", "prompt": "Q:", "max_tokens": 200, "stream": True,
                                                 "response_format": response_format}, stream=True)
    texts.append("".join(c["choices"][0]["text"] for c in events(streamed)[:-1]))
    assert len(texts) == 10
    for text in texts:
        jsonschema.validate(json.loads(text), QUIZ)


BAD_REQUESTS = [
    ("oversized prompt", "completions", {"model": "tiny", "prompt": "word " * 1200}, 400, "prompt"),
    ("max_tokens past the context", "completions", {"model": "tiny", "prompt": "x", "max_tokens": 5000}, 400,
     "prompt"),
    ("temperature out of range", "completions", {"model": "tiny", "prompt": "x", "temperature": 2.5}, 400,
     "temperature"),
    ("n out of range", "completions", {"model": "tiny", "prompt": "x", "n": 0}, 400, "n"),
    ("top_p out of range", "chat/completions", {"model": "tiny", "top_p": 0,
                                                "messages": [{"role": "user", "content": "x"}]}, 400, "top_p"),
    ("negative max_tokens", "completions", {"model": "tiny", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("unknown model", "completions", {"model": "gpt-5", "prompt": "x"}, 404, "model"),
    ("unknown field", "completions", {"model": "tiny", "prompt": "x", "best_of": 3}, 400, "best_of"),
    ("missing prompt", "completions", {"model": "tiny"}, 400, "prompt"),
    ("token-id prompt", "completions", {"model": "tiny", "prompt": [1, 2, 3]}, 400, "prompt"),
    ("no messages", "chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("unknown role", "chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages"),
    ("not a JSON schema", "completions", {"model": "tiny", "prompt": "x", "response_format": {
        "type": "json_schema", "json_schema": {"name": "q", "schema": {"type": "no-such-type"}}}}, 400,
     "json_schema"),
]


@pytest.mark.parametrize("case, route, body, status, field", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_are_refused_with_a_json_error(server, case, route, body, status, field):
    r = post(f"{server}/v1/{route}", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert field in (error["param"] or "") and error["message"]


def test_malformed_json_is_a_400_with_a_json_error(server):
    r = requests.post(f"{server}/v1/completions", data=b'{"model": "tiny", "prompt": ',
                      headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    # The replica is unharmed: the next request is answered.
    assert post(f"{server}/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2}).status_code == 200


def test_an_api_key_is_required_when_set(server):
    url = f"{server}/keyed/v1/completions"
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
    assert post(url, body).status_code == 401
    wrong = post(url, body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert post(url, body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert requests.get(f"{server}/keyed/v1/models", timeout=30).status_code == 401
    assert requests.get(f"{server}/keyed/health", timeout=30).status_code == 200  # probes need no key


def test_a_soft_prompt_gives_the_same_text_through_the_engine_and_the_endpoint(server, tiny_llama,
                                                                                  soft_prompt_file):
    engine = TransformersEngine(tiny_llama)
    prefix = load_soft_prompt(soft_prompt_file)
    greedy = SamplingParams(max_tokens=16, temperature=0)
    direct_plain = engine.generate(["The patient was"], greedy)[0][0].text
    direct_prefixed = engine.generate(["The patient was"], greedy, prefix=prefix)[0][0].text
    assert direct_prefixed != direct_plain  # the soft prompt changes what is written

    def served(model: str) -> str:
        return post(f"{server}/v1/completions", {"model": model, "prompt": "The patient was", "max_tokens": 16,
                                                 "temperature": 0}).json()["choices"][0]["text"]

    assert served("medical") == direct_prefixed
    assert served("tiny") == direct_plain


def running_replicas() -> int:
    return serve.status().applications[APP].deployments["generator"].replica_states.get("RUNNING", 0)


def test_replicas_scale_up_under_load_and_back_down(server):
    assert running_replicas() == 1
    stop, answered, failures = threading.Event(), [], []

    def client():
        deadline = time.monotonic() + 90  # bounded: each client stops by itself
        while not stop.is_set() and time.monotonic() < deadline and len(answered) < 2000:
            r = post(f"{server}/v1/completions", {"model": "tiny", "prompt": "Cells divide", "max_tokens": 96,
                                                  "temperature": 0.8})
            (answered if r.status_code == 200 else failures).append(r.status_code)

    clients = [threading.Thread(target=client, daemon=True) for _ in range(6)]
    for c in clients:
        c.start()
    most, deadline = 1, time.monotonic() + 90
    while time.monotonic() < deadline and most < 3:
        most = max(most, running_replicas())
        time.sleep(0.5)
    stop.set()
    for c in clients:
        c.join(timeout=120)
    assert most >= 2, f"no scale-up under 6 concurrent clients (max {most} replica)"
    assert answered and not failures

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and running_replicas() > 1:
        time.sleep(0.5)
    assert running_replicas() == 1, "replicas did not scale back down after the load stopped"


def test_serve_command_prints_the_url_and_stops_cleanly_on_ctrl_c(tiny_llama, tmp_path):
    """`domainsynth serve` as a user runs it, in its own process with its own embedded Ray."""
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "domainsynth.cluster.cli", "serve", "--model", tiny_llama,
                             "--port", str(port), "--max-replicas", "1", "--num-cpus", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "DOMAINSYNTH_API_KEY": ""})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "Ctrl-C stops it." not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            time.sleep(0.5)
        printed = (tmp_path / "serve.log").read_text()
        assert f"OpenAI API: http://127.0.0.1:{port}/v1" in printed
        r = post(f"http://127.0.0.1:{port}/v1/completions", {"model": "tiny-llama", "prompt": "x", "max_tokens": 3})
        assert r.status_code == 200, r.text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Stopped." in (tmp_path / "serve.log").read_text()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/health", timeout=5)


@pytest.mark.parametrize("args, message", [
    ([], "give --model, or a RECIPE with a serve section"),
    (["--model", "/no/such/model"], "serve.model: no model folder"),
    (["--model", "m", "--min-replicas", "3", "--max-replicas", "2"], "min_replicas (3) is above max_replicas"),
    (["--model", "m", "--soft-prompt", "medical"], "expected NAME=PATH"),
    (["--model", "m", "--port", "70000"], "serve.port"),
])
def test_bad_serve_arguments_fail_before_starting(args, message, capsys):
    from domainsynth.cluster.cli import main

    assert main(["serve", *args]) == 2
    assert message in capsys.readouterr().err
