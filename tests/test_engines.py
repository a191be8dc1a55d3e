"""The transformers engine with a tiny Llama built here (random weights: the text is gibberish, the behaviour is
real): seeded sampling, greedy decoding, batching with left padding, soft-prompt prefixes, stop strings and
parameter validation. No Ray needed: this is what the Serve replicas and batch actors will hold."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from domainsynth.actors.engines import SamplingParams, TransformersEngine
from domainsynth.cluster.cli import main

from schemas import QUIZ


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "model"
    assert main(["models", "make-tiny", str(out)]) == 0  # through the CLI, as a user makes one
    return TransformersEngine(str(out))


GREEDY = SamplingParams(max_tokens=10, temperature=0)


def test_seeded_sampling_repeats_and_n_gives_n_completions(engine):
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, n=3, seed=7)
    first = engine.generate(["The patient was", "Genes encode proteins"], params)
    again = engine.generate(["The patient was", "Genes encode proteins"], params)
    assert [[c.text for c in row] for row in first] == [[c.text for c in row] for row in again]
    assert [len(row) for row in first] == [3, 3]
    assert len({c.text for c in first[0]}) > 1  # three samples, not one repeated
    other = engine.generate(["The patient was"], params.model_copy(update={"seed": 8}))
    assert [c.text for c in other[0]] != [c.text for c in first[0]]


def test_greedy_with_n_gives_n_copies_of_the_greedy_text(engine):
    # transformers refuses num_return_sequences > 1 without sampling; vLLM answers with n identical texts
    prompts = ["The patient was", "Genes"]
    copies = engine.generate(prompts, GREEDY.model_copy(update={"n": 3}))
    once = engine.generate(prompts, GREEDY)
    assert [[c.text for c in row] for row in copies] == [[row[0].text] * 3 for row in once]
    tiny = engine.generate(prompts[:1], GREEDY.model_copy(update={"n": 2, "temperature": 1e-6}))
    assert [c.text for c in tiny[0]] == [once[0][0].text] * 2  # below 1e-5 counts as greedy


def test_batched_prompts_decode_as_they_would_alone(engine):
    prompts = ["Cells", "The immune system defends the body against infection by"]
    together = engine.generate(prompts, GREEDY)
    alone = [engine.generate([p], GREEDY)[0] for p in prompts]
    assert [row[0].text for row in together] == [row[0].text for row in alone]
    completion = together[0][0]
    assert completion.completion_tokens <= 10 and completion.prompt_tokens == engine.count_tokens("Cells")
    assert completion.finish_reason in ("stop", "length")


def test_a_soft_prompt_prefix_changes_the_output(engine):
    plain = engine.generate(["The patient was"], GREEDY)[0][0].text
    prefix = np.random.default_rng(0).standard_normal((8, engine.hidden_size)).astype(np.float32)
    prefixed = engine.generate(["The patient was"], GREEDY, prefix=prefix)[0][0].text
    assert prefixed != plain
    assert engine.generate(["The patient was"], GREEDY, prefix=prefix)[0][0].text == prefixed
    with pytest.raises(ValueError, match=r"prefix: expected shape \[m, 128\]"):
        engine.generate(["x"], GREEDY, prefix=prefix[:, :10])


def test_stop_strings_end_the_completion_before_the_stop(engine):
    text = engine.generate(["The patient was"], SamplingParams(max_tokens=20, temperature=0))[0][0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip()
    stopped = engine.generate(["The patient was"], SamplingParams(max_tokens=20, temperature=0, stop=[stop]))[0][0]
    assert stop not in stopped.text and text.startswith(stopped.text) and stopped.finish_reason == "stop"


def test_streaming_writes_the_same_text_in_pieces_and_never_sends_a_stop_string(engine):
    """How the endpoint streams from this engine: its continuous batcher's pieces."""
    import threading

    from domainsynth.actors.continuous_batching import ContinuousBatcher, Sequence

    batcher = ContinuousBatcher(engine, max_batch_size=2)

    def stream(params):
        pieces, done = [], threading.Event()

        def emit(item):
            pieces.append(item)
            if isinstance(item, Exception) or item.finish_reason:
                done.set()

        batcher.submit(Sequence(engine.tokenizer("The patient was").input_ids, params, emit))
        assert done.wait(60)
        return pieces

    params = SamplingParams(max_tokens=20, temperature=0)
    whole = engine.generate(["The patient was"], params)[0][0]
    deltas = stream(params)
    assert "".join(d.text for d in deltas) == whole.text and len([d for d in deltas if d.text]) > 3
    assert deltas[-1].finish_reason == whole.finish_reason
    assert deltas[-1].completion_tokens == whole.completion_tokens and all(d.finish_reason is None for d in deltas[:-1])
    stop = whole.text[len(whole.text) // 2:len(whole.text) // 2 + 3]
    stopped = stream(params.model_copy(update={"stop": [stop]}))
    text = "".join(d.text for d in stopped)
    assert stop not in text and whole.text.startswith(text) and stopped[-1].finish_reason == "stop"
    assert not any(stop in d.text for d in stopped)


@pytest.mark.parametrize("field, value", [("temperature", 3.0), ("top_p", 0.0), ("max_tokens", 0), ("n", 0),
                                          ("top_k", -1), ("seed", -5), ("stopp", ["x"])])
def test_out_of_range_sampling_parameters_are_refused(field, value):
    with pytest.raises(ValidationError) as err:
        SamplingParams(**{field: value})
    assert field in str(err.value)


def test_chat_prompts_use_the_model_chat_template(engine):
    prompt = engine.chat_prompt([{"role": "user", "content": "What do genes encode?"}])
    assert prompt.endswith("<|assistant|>\n") and "What do genes encode?" in prompt
    assert engine.generate([prompt], GREEDY)[0][0].completion_tokens > 0




def test_structured_output_always_parses_against_its_schema(engine):
    """Random weights would write anything; the grammar leaves them only JSON that fits the schema."""
    import json

    import jsonschema

    completions = []
    for seed in range(3):
        params = SamplingParams(max_tokens=200, temperature=1.0, n=4, seed=seed, json_schema=QUIZ)
        completions += [c for row in engine.generate(["Write a quiz question:", "Q"], params) for c in row]
    assert len(completions) == 24
    for c in completions:
        jsonschema.validate(json.loads(c.text), QUIZ)
        assert c.finish_reason == "stop"
    greedy = engine.generate(["Write a quiz question:"], GREEDY.model_copy(update={"max_tokens": 200,
                                                                                   "json_schema": QUIZ}))
    jsonschema.validate(json.loads(greedy[0][0].text), QUIZ)
    with pytest.raises(ValidationError, match="not a valid JSON schema"):
        SamplingParams(json_schema={"type": "no-such-type"})
