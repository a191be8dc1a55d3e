"""Fields that name files or models are marked in the schema, and everything that must find them does so by walking
the schema: resolution against the recipe's folder, stage fingerprints, submit staging. The recipe reference is
written from the same schema. (No Ray here.)"""

import os
import re
import typing

import pytest
from pydantic import BaseModel

from domainsynth.pipelines.recipe import Recipe, build_recipe, input_lists, travelling_recipe
from domainsynth.pipelines.reference import reference
from domainsynth.pipelines.schema import path_fields

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# String fields whose name or description mentions a path, file, folder or model but which name none, each with why.
NOT_PATHS = {
    "run_dir": "where the run writes: resolved against the current directory, not the recipe's folder",
    "select.in_domain_text_field": "a field name of the in-domain file",
    "generate.engine_options": "engine constructor arguments",
    "synthesize.engine_options": "engine constructor arguments",
    "judge.engine_options": "engine constructor arguments",
    "preference.sample.engine_options": "engine constructor arguments",
    "synthesize.domino.prompt": "text placed after the soft prompt",
    "serve.served_model_name": "the name clients ask for",
    "evaluate.models.name": "the model's name in the results",
    "evaluate.code.after": "a release date (YYYY-MM-DD)",
    "kubernetes.image": "a container image tag",
    "kubernetes.project_dir": "a path inside the image",
    "kubernetes.volume.mount_path": "a path inside the pods",
}
# Lower or title case: "FILE:LINE" (the id a row without one gets) names no file.
LOOKS_LIKE_A_PATH = re.compile(r"(?i:path|folder|model|template|soft prompt|jsonl|parquet|director|glob|uri)|[Ff]ile")


def _string_fields(model: type[BaseModel], prefix: str = ""):
    for name, info in model.model_fields.items():
        nested = [a for a in (info.annotation, *typing.get_args(info.annotation))
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        if nested:
            yield from _string_fields(nested[0], f"{prefix}{name}.")
        elif _holds_str(info.annotation):
            yield f"{prefix}{name}", info


def _holds_str(annotation) -> bool:
    return annotation is str or any(_holds_str(a) for a in typing.get_args(annotation))


def test_every_field_that_looks_like_a_path_is_marked_or_explained():
    marked = {f.dotted.removesuffix(".*").replace(".[]", "") for f in path_fields(Recipe)}
    unmarked = [dotted for dotted, info in _string_fields(Recipe)
                if (LOOKS_LIKE_A_PATH.search(dotted.rsplit(".", 1)[-1]) or
                    LOOKS_LIKE_A_PATH.search(info.description or ""))
                and dotted not in marked and dotted not in NOT_PATHS]
    assert not unmarked, (f"fields that look like paths but carry no marker type (InputPaths, InputPath, ModelRef in "
                          f"pipelines/schema.py), or belong in NOT_PATHS with a reason: {unmarked}")
    assert not set(NOT_PATHS) & marked, "a field in NOT_PATHS is marked after all"


def test_the_fields_the_old_registries_missed_are_found():
    marked = {f.dotted for f in path_fields(Recipe)}
    assert {"synthesize.diversity.model", "qc.diversity.model", "judge.diversity.model", "select.quality.scorer",
            "serve.soft_prompts.*", "synthesize.domino.soft_prompt", "retrieve.index"} <= marked


@pytest.fixture
def recipe_folder(tmp_path):
    """A recipe folder holding a file or folder for every relative path the recipe below names."""
    for name in ("in.jsonl", "corpus.jsonl", "shots.jsonl", "docs.jsonl", "eval.jsonl", "refs.jsonl", "judge.jinja",
                 "craft.jinja"):
        (tmp_path / name).write_text('{"text": "x"}\n')
    for folder in ("llm", "minilm", "scorer"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.json").write_text("{}")
    return tmp_path


def _relative_recipe() -> dict:
    return {
        "run_dir": "/tmp/unused-run",
        "select": {"in_domain": "in.jsonl", "corpus": ["corpus.jsonl"], "quality": {"scorer": "hf:scorer"}},
        "embed": {"model": "minilm"},
        "retrieve": {"few_shots": "shots.jsonl"},
        "synthesize": {"model": "./llm", "method": "craft", "template": "craft.jinja",
                       "craft": {"documents": "docs.jsonl"}, "diversity": {"model": "minilm"}},
        "qc": {"references": "refs.jsonl", "decontaminate": {"eval_files": "eval.jsonl"},
               "diversity": {"model": "all-MiniLM-L6-v2"}},
        "judge": {"model": "llm", "template": "judge.jinja"},
    }


def test_relative_paths_resolve_against_the_recipe_folder_and_model_ids_stay(recipe_folder):
    recipe = build_recipe(_relative_recipe(), "recipe.yaml", str(recipe_folder))
    base = str(recipe_folder)
    assert recipe.select.in_domain == [f"{base}/in.jsonl"]
    assert recipe.select.quality.scorer == f"hf:{base}/scorer"  # the prefix stays, the model folder is resolved
    assert recipe.synthesize.diversity.model == f"{base}/minilm"
    assert recipe.synthesize.template == f"{base}/craft.jinja"
    assert recipe.qc.decontaminate.eval_files == [f"{base}/eval.jsonl"]
    assert recipe.judge.model == f"{base}/llm"  # a folder there: a path
    assert recipe.qc.diversity.model == "all-MiniLM-L6-v2"  # no folder of that name: a Hugging Face id
    # Only lists of inputs are listed for the skipped-files report; single paths and models are not.
    assert [field for field, _ in input_lists(recipe, "qc")] == ["qc.references", "qc.decontaminate.eval_files"]


def test_travelling_recipe_moves_every_marked_local_path(recipe_folder):
    recipe = build_recipe(_relative_recipe(), "recipe.yaml", str(recipe_folder))
    moved = []
    raw = travelling_recipe(recipe, lambda field, path: moved.append(field) or f"staged/{os.path.basename(path)}")
    assert sorted(moved) == sorted([
        "select.in_domain", "select.corpus", "select.quality.scorer", "embed.model", "retrieve.few_shots",
        "synthesize.model", "synthesize.template", "synthesize.craft.documents", "synthesize.craft.few_shots",
        "synthesize.diversity.model", "qc.references", "qc.decontaminate.eval_files", "judge.model",
        "judge.template"])
    assert raw["select"]["quality"]["scorer"] == "hf:staged/scorer"
    assert raw["qc"]["diversity"]["model"] == "all-MiniLM-L6-v2"


def test_the_recipe_reference_is_written_from_the_schema():
    with open(os.path.join(REPO, "docs", "recipe-reference.md"), encoding="utf-8") as f:
        assert f.read() == reference(), \
            "docs/recipe-reference.md is out of date: python -m domainsynth.pipelines.reference > docs/recipe-reference.md"
    for dotted in ("synthesize.craft.documents", "qc.near_dedup.threshold", "kubernetes.gpu_workers.gpus"):
        section, field = dotted.rsplit(".", 1)
        assert f"`{section}`" in reference() and f"| `{field}` |" in reference()
