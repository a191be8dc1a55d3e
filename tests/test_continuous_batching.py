"""Continuous batching in the transformers engine (``actors/continuous_batching.py``), without Serve: sequences of
different lengths, parameters, soft prompts and LoRA adapters, arriving together or one after another, get exactly
what each gets alone (greedy, and seeded sampling), and what ``TransformersEngine.generate`` writes. The tiny Llama
and two real PEFT LoRA adapters on it (random, non-zero updates, so each changes the text), whose per-row
application is checked against PEFT's own forward."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from domainsynth.actors.continuous_batching import ContinuousBatcher, Sequence
from domainsynth.actors.engines import SamplingParams, TransformersEngine


def make_lora(base: str, folder, seed: int) -> str:
    """A LoRA adapter of ``base`` as finetune writes one (PEFT folder), with random B so that it changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("loras")
    return {"cardiology": make_lora(tiny_llama, root / "cardiology", 1), "oncology": make_lora(tiny_llama, root / "oncology", 2)}


@pytest.fixture(scope="module")
def engine(tiny_llama, adapters):
    engine = TransformersEngine(tiny_llama, torch_threads=1)
    engine.load_adapters(adapters)
    return engine


@pytest.fixture(scope="module")
def batcher(engine):
    return ContinuousBatcher(engine, max_batch_size=6)


def submit_all(batcher, engine, cases, stagger_s: float = 0.0) -> list:
    """Submit every (prompt, params, prefix, adapter) case, ``stagger_s`` apart; (text, finish, tokens) of each, or
    its exception."""
    results, finished = [None] * len(cases), [threading.Event() for _ in cases]
    for i, (prompt, params, prefix, adapter) in enumerate(cases):
        pieces = []

        def emit(item, i=i, pieces=pieces):
            if isinstance(item, Exception):
                results[i] = item
                finished[i].set()
                return
            pieces.append(item.text)
            if item.finish_reason:
                results[i] = ("".join(pieces), item.finish_reason, item.completion_tokens)
                finished[i].set()

        ids = engine.tokenizer(prompt, add_special_tokens=True).input_ids
        batcher.submit(Sequence(ids, params, emit, prefix=prefix, adapter=adapter))
        if stagger_s:
            time.sleep(stagger_s)
    for event in finished:
        assert event.wait(120)
    return results


PROMPTS = ["The liver", "Genes encode proteins that", "A", "Cells divide when the growth signal arrives and"]


def cases_for(engine, params_of) -> list:
    prefix = np.random.default_rng(0).standard_normal((8, engine.hidden_size)).astype(np.float32)
    return [(prompt, params_of(i), soft, adapter)
            for i, (prompt, soft, adapter) in enumerate(
                (p, s, a) for p in PROMPTS for s in (None, prefix) for a in (None, "cardiology", "oncology"))]


def test_greedy_sequences_get_what_they_get_alone_whenever_they_arrive(engine, batcher):
    cases = cases_for(engine, lambda i: SamplingParams(temperature=0, max_tokens=6 + i % 7))
    alone = [submit_all(batcher, engine, [case])[0] for case in cases]
    peak_before = batcher.peak_running
    together = submit_all(batcher, engine, cases)
    staggered = submit_all(batcher, engine, cases, stagger_s=0.005)
    assert together == alone and staggered == alone
    assert batcher.peak_running == 6 > peak_before  # they were decoded together, up to the batch's size
    # The adapters are routed: each changes the text of most prompts, and differently from the other.
    by_domain = {}
    for (prompt, _, prefix, adapter), result in zip(cases, alone):
        by_domain.setdefault((prompt, prefix is None), {})[adapter] = result[0]
    differ = [texts[None] != texts["cardiology"] != texts["oncology"] for texts in by_domain.values()]
    assert sum(differ) >= len(differ) - 1
    # Rows without an adapter are the base model's, as TransformersEngine.generate writes them.
    for (prompt, params, prefix, adapter), result in zip(cases, alone):
        if adapter is None:
            reference = engine.generate([prompt], params, prefix)[0][0]
            assert (reference.text, reference.finish_reason, reference.completion_tokens) == result


def test_seeded_sampling_stop_strings_and_json_in_a_batch(engine, batcher):
    def params_of(i):
        if i % 3 == 0:
            return SamplingParams(temperature=0.9, top_p=0.9, max_tokens=10, seed=i)
        if i % 3 == 1:
            return SamplingParams(temperature=0, max_tokens=12, stop=["iver", "at"])
        return SamplingParams(temperature=0.7, max_tokens=24, seed=i,
                              json_schema={"type": "object", "properties": {"a": {"type": "integer"}},
                                           "required": ["a"]})

    cases = cases_for(engine, params_of)
    alone = [submit_all(batcher, engine, [case])[0] for case in cases]
    assert submit_all(batcher, engine, cases) == alone
    import json

    for (_, params, _, _), (text, finish, _) in zip(cases, alone):
        assert not any(stop in text for stop in params.stop)
        if params.json_schema and finish == "stop":
            assert isinstance(json.loads(text)["a"], int)


def test_a_cancelled_sequence_leaves_the_batch_and_the_others_go_on(engine, batcher):
    long = SamplingParams(temperature=0, max_tokens=400)
    short = ("Genes encode proteins that", SamplingParams(temperature=0, max_tokens=8), None, "oncology")
    expected = submit_all(batcher, engine, [short])[0]
    ids = engine.tokenizer("The liver", add_special_tokens=True).input_ids
    first = threading.Event()
    doomed = Sequence(ids, long, lambda item: first.set())
    cancelled_before = batcher.cancelled
    batcher.submit(doomed)
    assert first.wait(60)
    batcher.cancel(doomed)
    assert submit_all(batcher, engine, [short])[0] == expected
    deadline = time.monotonic() + 30
    while batcher.load()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert batcher.load()["running"] == 0 and batcher.cancelled == cancelled_before + 1
    assert len(doomed.generated) < 400


def test_adapter_rows_give_pefts_logits_each_row_its_own(engine, adapters, tiny_llama):
    """Our per-row adapters against PEFT's own forward of each adapter, and a batch mixing base and both adapters."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([engine.tokenizer("Genes encode proteins that fold").input_ids])
    expected = {None: AutoModelForCausalLM.from_pretrained(tiny_llama)(input_ids=ids).logits}
    for name, path in adapters.items():
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), path).eval()
        with torch.no_grad():
            expected[name] = peft_model(input_ids=ids).logits
    assert not torch.allclose(expected["cardiology"], expected[None], atol=1e-3)  # the adapters do change things
    order = [None, "cardiology", "oncology", "cardiology"]
    engine.lora.select([engine.lora.slot(name) for name in order])
    try:
        with torch.no_grad():
            mixed = engine.model(input_ids=ids.repeat(len(order), 1)).logits
    finally:
        engine.lora.select(None)
    for row, name in enumerate(order):
        torch.testing.assert_close(mixed[row:row + 1], expected[name], atol=2e-5, rtol=1e-4)


def test_an_adapter_that_is_not_lora_of_this_base_fails_naming_it(tiny_llama, tmp_path):
    from domainsynth.actors.tiny_models import make_tiny_llama

    engine = TransformersEngine(tiny_llama, torch_threads=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"adapter 'nothing' \(.*empty\): not a LoRA adapter"):
        engine.load_adapters({"nothing": str(tmp_path / "empty")})
    wider = make_tiny_llama(tmp_path / "wide", hidden_size=192)  # a LoRA of another base: its shapes do not fit
    with pytest.raises(ValueError, match=r"adapter 'wide' \(.*wide-lora\): not a LoRA adapter this model can load"):
        engine.load_adapters({"wide": make_lora(str(wider), tmp_path / "wide-lora", 0)})
    assert engine.adapters == {}
