"""The stage runner: stages in order, skipping finished ones whose marker matches the recipe, redoing the rest."""

from __future__ import annotations

from typing import Callable

from .recipe import STAGE_ORDER, Recipe
from .rundir import StageDir
from .embed import run_embed
from .index import run_index
from .retrieve import load_few_shots, run_retrieve
from .select import run_select

STAGES: dict[str, Callable] = {"select": run_select, "embed": run_embed, "index": run_index, "retrieve": run_retrieve}


def preflight(recipe: Recipe) -> None:
    """Fail before any work starts when an input names nothing readable or a few-shot file is malformed (raises
    FileNotFoundError/ValueError/StageError)."""
    from .paths import resolve

    if recipe.select is not None:
        s = recipe.select
        for field, specs in (("select.in_domain", s.in_domain), ("select.corpus", s.corpus),
                             ("select.negatives", s.negatives)):
            if specs:
                _check_inputs(field, specs)
        if s.classifier:
            fs, path = resolve(s.classifier)
            if fs.get_file_info(path).type.name != "File":
                raise FileNotFoundError(f"select.classifier: no file at {s.classifier!r}")
    if recipe.embed is not None and recipe.embed.corpus is not None:  # null: select's output, made by this run
        _check_inputs("embed.corpus", recipe.embed.corpus)
    if recipe.retrieve is not None:
        load_few_shots(recipe.retrieve.few_shots, recipe.retrieve.few_shot_field)


def _check_inputs(field: str, specs: list[str]) -> None:
    from .corpus import SUPPORTED_SUFFIXES
    from .paths import expand_inputs

    try:
        expand_inputs(specs, SUPPORTED_SUFFIXES)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"{field}: {e}") from None


def run_recipe(recipe: Recipe, echo: Callable[[str], None] = print) -> dict[str, dict]:
    """Run every stage the recipe configures; returns each stage's report."""
    reports = {}
    for name in STAGE_ORDER:
        config = getattr(recipe, name)
        if config is None:
            continue
        stage = StageDir(f"{recipe.run_dir.rstrip('/')}/{name}")
        fingerprint = recipe.stage_fingerprint(name)
        if stage.completed_with(fingerprint):
            echo(f"[{name}] already complete in {stage.uri} (recipe unchanged): skipped")
            reports[name] = stage.read_json("report.json")
            continue
        # Anything left by an interrupted attempt is removed: the stage is redone, never appended to.
        stage.clear()
        echo(f"[{name}] running -> {stage.uri}")
        reports[name] = STAGES[name](config, stage)
        stage.mark_complete(fingerprint)
    return reports
