"""The stage runner: stages in order, skipping finished ones whose marker matches the recipe, redoing the rest."""

from __future__ import annotations

import gc
import os
import re
from typing import Callable

from . import paths
from .recipe import Recipe
from .rundir import StageDir, StageError
from .stage import Stage, StageReport, check_model, check_soft_prompt, progress_to


class StageFailed(StageError):
    """A stage broke for a reason that is not its input's (an engine that cannot run, an actor that kept dying, a
    bug): the message names the stage and the cause, without Ray's nested tracebacks."""

    def __init__(self, stage: str, error: BaseException):
        self.stage, self.error = stage, error
        super().__init__(f"stage {stage} failed: {describe_failure(error)}")


# A traceback's exception line: "EngineBroken: the engine fails ..." (Ray's own wrappers left out).
_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?(?!RayTaskError|UserCodeException)(\w*(?:Error|Exception|Broken|Exit)): (.+)$")


def describe_failure(error: BaseException, limit: int = 600) -> str:
    """The root cause of a (possibly Ray-wrapped) error in a line: an actor's death with Ray's reason, or the last
    exception of the task's traceback that Ray Data carries as text (its wrappers hold no exception object)."""
    import ray.exceptions

    if isinstance(error, ray.exceptions.ActorDiedError):
        return "a worker actor died and Ray's restarts ran out: " + str(error).strip().splitlines()[0][:limit]
    text = str(error)
    found = [m.groups() for m in map(_EXCEPTION_LINE.match, (line.strip() for line in text.splitlines())) if m]
    if isinstance(error, ray.exceptions.RayError) and found:
        name, message = found[-1]
    else:
        name, message = type(error).__name__, " ".join(line.strip() for line in text.splitlines() if line.strip())
    text = f"{name}: {message}"
    return text if len(text) <= limit else text[:limit] + " ..."


def preflight(recipe: Recipe) -> None:
    """Fail before any work starts when an input names nothing readable, a model folder is not there, or a template
    or few-shot file is malformed: each configured stage's own checks, then the endpoint's (raises
    FileNotFoundError/ValueError/StageError naming the field)."""
    for stage, cfg in recipe.configured_stages():
        stage.preflight(cfg, recipe)
    if recipe.serve is not None:
        from .training.preference import adapted_model

        if not (recipe.has_stage() and recipe.serve.model == adapted_model(recipe)):  # else this run makes it
            check_model("serve.model", recipe.serve.model)
        for name, path in recipe.serve.soft_prompts.items():
            check_soft_prompt(f"serve.soft_prompts.{name}", path)
        from .serve import check_adapters

        # An adapter this run trains (a finetune output) is checked when the endpoint starts.
        check_adapters({name: path for name, path in recipe.serve.adapters.items()
                        if not recipe.has_stage() or os.path.exists(path)})


def run_recipe(recipe: Recipe, echo: Callable[[str], None] = print) -> dict[str, dict]:
    """Run every stage the recipe configures; returns each stage's report (report.json's content, checked against
    the stage's report type)."""
    with progress_to(echo):
        return _run_stages(recipe, echo)


def _run_stages(recipe: Recipe, echo: Callable[[str], None]) -> dict[str, dict]:
    reports = {}
    input_digests: dict[str, str] = {}  # each stage's inputs looked at once per run (listings, small-file hashes)
    summaries: dict[str, str] = {}  # each finished stage's summary line, to explain an empty output downstream
    for stage, cfg in recipe.configured_stages():
        # Actors of an earlier stage (or run) that failed can be held only by cyclic garbage (the exception's
        # traceback, a log record keeping it): until Python's collector gets to it, their CPUs stay taken and this
        # stage's pool waits for them. Collect it now, so that the cluster is what the stage plans for.
        gc.collect()
        name = stage.name
        folder = StageDir(paths.join(recipe.run_dir, name))
        check_upstream_kept_rows(recipe, stage, cfg, reports, summaries)
        fingerprint = recipe.stage_fingerprint(name, input_digests)
        if folder.completed_with(fingerprint):
            report = stage.report.model_validate(folder.read_json("report.json"))
            reports[name], summaries[name] = report.model_dump(mode="json"), stage.summary(report)
            echo(f"[{name}] already complete in {folder.uri} (recipe and inputs unchanged): skipped")
            continue
        # Anything left by an interrupted attempt is removed (a training stage keeps its checkpoints, to
        # resume from): the stage is redone, never appended to.
        folder.clear(keep=stage.kept_on_retry)
        echo(f"[{name}] started -> {folder.uri}")
        skipped = skipped_inputs(recipe, name)
        for field, files in skipped.items():
            echo(f"[{name}] {field}: {len(files)} file(s) not read (listed in report.json): "
                 + ", ".join(f["path"] for f in files[:3]) + (", ..." if len(files) > 3 else ""))
        try:
            report = stage.report.model_validate({**stage.run(cfg, folder, recipe), "skipped_files": skipped})
            write_report_json(folder, report)
        except BaseException as e:
            folder.remove(keep=stage.kept_on_retry)  # nothing that could pass for its output stays
            if isinstance(e, Exception) and not isinstance(e, StageError):
                raise StageFailed(name, e) from e
            raise
        folder.mark_complete(fingerprint)
        reports[name], summaries[name] = report.model_dump(mode="json"), stage.summary(report)
        echo(f"[{name}] finished in {report.seconds:,.1f}s")
    return reports


def check_upstream_kept_rows(recipe: Recipe, stage: Stage, cfg, reports: dict[str, dict],
                             summaries: dict[str, str]) -> None:
    """Stop before ``stage`` when it reads an earlier stage's output that kept no rows (a folder with no files, which
    would otherwise fail as a missing input): the error says which stage emptied it and why."""
    from .recipe import input_lists

    reads = [(field, spec) for field, specs in input_lists(recipe, stage.name) for spec in specs]
    reads += list(stage.upstream(cfg, recipe).items())
    for field, spec in reads:
        for upstream, report in reports.items():
            if report["rows_out"] == 0 and spec == paths.join(recipe.run_dir, upstream, "data"):
                raise StageError(f"{field}: {upstream} kept no rows, so {stage.name} has nothing to read "
                                 f"({summaries[upstream]}); its dropped rows and report.md are in "
                                 f"{paths.join(recipe.run_dir, upstream)}")


def skipped_inputs(recipe: Recipe, name: str) -> dict[str, list[dict]]:
    """For each input field of stage ``name`` that names directories or globs: the files there that are not read
    (hidden, or of another format), so that a user sees what a folder held beside the inputs."""
    from .corpus import SUPPORTED_SUFFIXES
    from .paths import expand_inputs_and_skipped
    from .recipe import input_lists_with_suffixes

    found = {}
    for field, specs, suffixes in input_lists_with_suffixes(recipe, name):
        _, _, skipped = expand_inputs_and_skipped(specs, suffixes or SUPPORTED_SUFFIXES)
        if skipped:
            found[field] = skipped
    return found


def write_report_json(folder: StageDir, report: StageReport) -> None:
    """report.json as validated (the accounting contract holds), and report.md's list of input files not read."""
    folder.write_json("report.json", report.model_dump(mode="json"))
    if report.skipped_files:
        lines = ["", "## Input files not read", ""]
        lines += [f"- `{f['path']}` ({field}): {f['reason']}" for field, files in report.skipped_files.items()
                  for f in files]
        folder.write_text("report.md", (folder.read_text("report.md") or "") + "\n".join(lines) + "\n")
