"""One endpoint, many domains: the base model, two soft prompts and two LoRA adapters on one replica of a real local
Ray Serve (tiny Llama, real PEFT adapters). Requests that arrive together are generated together and each gets
exactly what it gets alone; a streaming client that disconnects frees its place in the batch; adapters and soft
prompts are listed and routed; a bad adapter folder fails before anything starts. Nothing is mocked."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import requests
from ray import serve

from domainsynth.actors.soft_prompt import save_soft_prompt
from domainsynth.pipelines.recipe import build_recipe
from domainsynth.pipelines.serve import build_application

from conftest import free_port
from test_continuous_batching import make_lora

APP = "domains"


@pytest.fixture(scope="module")
def domains(tiny_llama_4k, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("domains")
    rng = np.random.default_rng(0)
    soft = {name: save_soft_prompt(rng.standard_normal((8, 128)).astype(np.float32), str(root / f"{name}.safetensors"))
            for name in ("medical", "legal")}
    loras = {name: make_lora(tiny_llama_4k, root / name, seed) for seed, name in enumerate(("cardiology", "oncology"))}
    return {"soft_prompts": soft, "adapters": loras}


@pytest.fixture(scope="module")
def server(ray_local, tiny_llama_4k, domains):
    port = free_port()
    recipe = build_recipe({"serve": {
        "model": tiny_llama_4k, "served_model_name": "tiny", "port": port, "num_cpus": 0.5, "api_key_env": None,
        "max_batch_size": 8, "autoscaling": {"min_replicas": 1, "max_replicas": 1}, **domains}}, "test", "/")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_application(recipe.serve), name=APP, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.delete(APP)
    serve.shutdown()


MODELS = ["tiny", "medical", "legal", "cardiology", "oncology"]


def request_for(i: int) -> tuple[str, dict]:
    """A varied greedy request: every model, completions and chat, streamed or not, different lengths."""
    model, stream = MODELS[i % 5], i % 3 == 0
    if i % 2:
        return "/v1/chat/completions", {"model": model, "max_tokens": 5 + i % 9, "temperature": 0, "stream": stream,
                                        "messages": [{"role": "user", "content": f"Question {i}: what is a gene?"}]}
    return "/v1/completions", {"model": model, "prompt": ["The liver", "Cells divide when"][i % 4 // 2] * (1 + i % 3),
                               "max_tokens": 4 + i % 11, "temperature": 0, "stream": stream}


def answer(server: str, route: str, body: dict) -> str:
    r = requests.post(server + route, json=body, timeout=120, stream=body["stream"])
    assert r.status_code == 200, r.text
    if not body["stream"]:
        choice = r.json()["choices"][0]
        return choice.get("text", choice.get("message", {}).get("content"))
    text = ""
    for line in r.iter_lines(decode_unicode=True):
        if line and line != "data: [DONE]":
            choice = json.loads(line[len("data: "):])["choices"][0]
            text += choice.get("text") or choice.get("delta", {}).get("content") or ""
    return text


def test_domains_are_listed_and_routed(server):
    models = requests.get(f"{server}/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in models] == MODELS
    kinds = {m["id"]: (m["parent"], m["soft_prompt_tokens"], m["adapter"]) for m in models}
    assert kinds == {"tiny": (None, 0, None), "medical": ("tiny", 8, None), "legal": ("tiny", 8, None),
                     "cardiology": ("tiny", 0, "lora"), "oncology": ("tiny", 0, "lora")}
    # Each domain changes the text. (The random tiny Llama mostly repeats a prompt's last token; after a prompt of
    # one token it follows the soft prompt instead.)
    texts = {m: answer(server, "/v1/completions", {"model": m, "prompt": "A", "max_tokens": 8,
                                                   "temperature": 0, "stream": False}) for m in MODELS}
    assert all(texts[m] != texts["tiny"] for m in MODELS[1:]), texts
    assert texts["cardiology"] != texts["oncology"], texts
    r = requests.post(f"{server}/v1/completions", json={"model": "dermatology", "prompt": "x"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "cardiology" in r.json()["error"]["message"]


def test_concurrent_requests_of_all_domains_get_what_each_gets_alone(server):
    requests_ = [request_for(i) for i in range(20)]
    alone = [answer(server, route, body) for route, body in requests_]
    together: list = [None] * len(requests_)
    start = threading.Barrier(len(requests_))

    def client(i: int) -> None:
        start.wait()
        together[i] = answer(server, *requests_[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests_))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert together == alone
    health = requests.get(f"{server}/health", timeout=30).json()
    assert health["peak_running"] > 1 and health["running"] == 0  # generated together, and all done


def test_a_disconnected_streaming_client_frees_its_place(server):
    before = requests.get(f"{server}/health", timeout=30).json()["cancelled"]
    body = {"model": "oncology", "prompt": "The liver", "max_tokens": 4000, "temperature": 0, "stream": True}
    r = requests.post(f"{server}/v1/completions", json=body, timeout=120, stream=True)
    lines = r.iter_lines(decode_unicode=True)
    assert next(line for line in lines if line).startswith("data: ")  # it is being written
    r.close()  # the client goes away mid-stream
    deadline, health = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        health = requests.get(f"{server}/health", timeout=30).json()
        if health["running"] == 0 and health["cancelled"] == before + 1:
            break
        time.sleep(0.1)
    assert (health["running"], health["cancelled"]) == (0, before + 1)
    # and the replica serves the next request as before
    assert answer(server, "/v1/completions", {"model": "tiny", "prompt": "The liver", "max_tokens": 4,
                                              "temperature": 0, "stream": False})


def test_a_bad_adapter_folder_fails_before_anything_starts(tiny_llama, tmp_path, domains):
    (tmp_path / "empty").mkdir()
    recipe = build_recipe({"serve": {"model": tiny_llama, "adapters": {"ghost": str(tmp_path / "empty")}}},
                          "test", "/")
    with pytest.raises(ValueError, match=r"serve.adapters.ghost: .*empty is not a PEFT adapter folder"):
        build_application(recipe.serve)
    with pytest.raises(ValueError, match="is a soft prompt's name too"):
        build_recipe({"serve": {"model": tiny_llama, "soft_prompts": {"x": domains["soft_prompts"]["medical"]},
                                "adapters": {"x": domains["adapters"]["oncology"]}}}, "test", "/")
    with pytest.raises(ValueError, match="adapters: served by backend domainsynth"):
        build_recipe({"serve": {"model": tiny_llama, "engine": "vllm", "backend": "ray-serve-llm",
                                "adapters": {"x": domains["adapters"]["oncology"]}}}, "test", "/")
