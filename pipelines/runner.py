"""The stage runner: stages in order, skipping finished ones whose marker matches the recipe, redoing the rest."""

from __future__ import annotations

from typing import Callable

from .recipe import STAGE_ORDER, Recipe
from .rundir import StageDir
from .curation.embed import run_embed
from .synthesis.generate import run_generate
from .curation.index import run_index
from .synthesis.judge import prepare as check_judge, run_judge
from .synthesis.qc import check_qc, run_qc
from .curation.retrieve import load_few_shots, run_retrieve
from .curation.select import run_select
from .synthesis.synthesize import check_synthesize, default_references, run_synthesize

STAGES: dict[str, Callable] = {"select": run_select, "embed": run_embed, "index": run_index, "retrieve": run_retrieve,
                               "generate": run_generate, "synthesize": run_synthesize, "qc": run_qc,
                               "judge": run_judge}


def upstream_context(recipe: Recipe, name: str) -> dict:
    """What qc and judge read when the recipe names no input (the stage before them in this run) and the references
    they compare with when it names none (synthesize's)."""
    if name not in ("qc", "judge"):
        return {}
    before = "qc" if name == "judge" and recipe.qc is not None else "synthesize"
    references = default_references(recipe.synthesize) if recipe.synthesize is not None else None
    return {"upstream": f"{recipe.run_dir.rstrip('/')}/{before}/data", "references": references}


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
    if recipe.generate is not None:
        _check_model("generate.model", recipe.generate.model)
        _check_inputs("generate.prompts", recipe.generate.prompts)
        if recipe.generate.soft_prompt:
            _check_soft_prompt("generate.soft_prompt", recipe.generate.soft_prompt)
    if recipe.synthesize is not None:
        _check_model("synthesize.model", recipe.synthesize.model)
        craft = recipe.synthesize.craft if recipe.synthesize.method == "craft" else None
        if craft is not None and recipe.retrieve is None:  # with retrieve, this run writes the documents
            _check_inputs("synthesize.craft.documents", craft.documents)
        check_synthesize(recipe.synthesize)
    if recipe.qc is not None:
        if recipe.qc.input is not None:
            _check_inputs("qc.input", recipe.qc.input)
        check_qc(recipe.qc, upstream_context(recipe, "qc")["references"])
    if recipe.judge is not None:
        _check_model("judge.model", recipe.judge.model)
        if recipe.judge.input is not None:
            _check_inputs("judge.input", recipe.judge.input)
        check_judge(recipe.judge)
    if recipe.serve is not None:
        _check_model("serve.model", recipe.serve.model)
        for name, path in recipe.serve.soft_prompts.items():
            _check_soft_prompt(f"serve.soft_prompts.{name}", path)


def _check_model(field: str, model: str) -> None:
    """A model given as a path must be there; anything else is taken for a Hugging Face id (resolved by the
    engine, on the cluster)."""
    import os

    if not (os.path.isabs(model) or model.startswith(("./", "../", "~"))):
        return
    folder = os.path.expanduser(model)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{field}: no model folder at {model!r}")
    if not os.path.isfile(os.path.join(folder, "config.json")):  # what every Hugging Face model folder holds
        raise FileNotFoundError(f"{field}: {model!r} holds no model (expected a Hugging Face model folder with a "
                                f"config.json)")


def _check_soft_prompt(field: str, path: str) -> None:
    from ..actors.soft_prompt import load_soft_prompt

    try:
        load_soft_prompt(path)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"{field}: {e}") from None


def _check_inputs(field: str, specs: list[str]) -> None:
    from .corpus import SUPPORTED_SUFFIXES
    from .paths import expand_inputs

    try:
        fs, files = expand_inputs(specs, SUPPORTED_SUFFIXES)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"{field}: {e}") from None
    # Empty files are caught here, before any work; stopping at the first file with bytes keeps this to one look-up
    # on an object store. (Files of blank or malformed lines are found by the stage.)
    if not any(fs.get_file_info(f.path).size for f in files):
        raise ValueError(f"{field}: the input is empty: {', '.join(specs)} holds only empty files")


def run_recipe(recipe: Recipe, echo: Callable[[str], None] = print) -> dict[str, dict]:
    """Run every stage the recipe configures; returns each stage's report."""
    reports = {}
    input_digests: dict[str, str] = {}  # each stage's inputs looked at once per run (listings, small-file hashes)
    for name in STAGE_ORDER:
        config = getattr(recipe, name)
        if config is None:
            continue
        stage = StageDir(f"{recipe.run_dir.rstrip('/')}/{name}")
        fingerprint = recipe.stage_fingerprint(name, input_digests)
        if stage.completed_with(fingerprint):
            echo(f"[{name}] already complete in {stage.uri} (recipe and inputs unchanged): skipped")
            reports[name] = stage.read_json("report.json")
            continue
        # Anything left by an interrupted attempt is removed: the stage is redone, never appended to.
        stage.clear()
        echo(f"[{name}] running -> {stage.uri}")
        skipped = skipped_inputs(recipe, name)
        for field, files in skipped.items():
            echo(f"[{name}] {field}: {len(files)} file(s) not read (listed in report.json): "
                 + ", ".join(f["path"] for f in files[:3]) + (", ..." if len(files) > 3 else ""))
        try:
            report = STAGES[name](config, stage, **upstream_context(recipe, name))
            reports[name] = add_skipped_files(stage, report, skipped)
        except BaseException:
            stage.remove()  # a failed stage leaves nothing that could pass for its output
            raise
        stage.mark_complete(fingerprint)
    return reports


def skipped_inputs(recipe: Recipe, name: str) -> dict[str, list[dict]]:
    """For each input field of stage ``name`` that names directories or globs: the files there that are not read
    (hidden, or of another format), so that a user sees what a folder held beside the inputs."""
    from .corpus import SUPPORTED_SUFFIXES
    from .paths import expand_inputs_and_skipped
    from .recipe import input_lists

    found = {}
    for field, specs in input_lists(recipe, name):
        _, _, skipped = expand_inputs_and_skipped(specs, SUPPORTED_SUFFIXES)
        if skipped:
            found[field] = skipped
    return found


def add_skipped_files(stage: StageDir, report: dict, skipped: dict[str, list[dict]]) -> dict:
    """``skipped_files`` in the report (always, empty when none) and a section of report.md listing them."""
    report = {**report, "skipped_files": skipped}
    stage.write_json("report.json", report)
    if skipped:
        lines = ["", "## Input files not read", ""]
        lines += [f"- `{f['path']}` ({field}): {f['reason']}" for field, files in skipped.items() for f in files]
        stage.write_text("report.md", (stage.read_text("report.md") or "") + "\n".join(lines) + "\n")
    return report
