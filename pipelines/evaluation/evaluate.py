"""The loop's last question: did the adaptation help? Each model — the base, a pretrain stage's model, a LoRA or
soft-prompt adapter on its base — is scored by lm-eval-harness on the same tasks (built-in ones on the bundled data,
a user's task YAML, held-out perplexity on a user's text), one Ray task per model (a GPU each where the cluster has
them), and the results are set side by side with their standard errors and their change from the first model.

Writes ``<run>/evaluate/``: ``results.json`` (for machines), ``report.md`` (the table, deltas against the base),
``results.png`` (a bar chart per task), ``tasks/`` (each task as the YAML lm-eval's CLI reads:
``lm_eval --include_path <run>/evaluate/tasks`` reproduces a number) and ``models/`` (each model's lm-eval output,
kept so a rerun after an interruption scores only the models not yet done).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from typing import Literal, Optional

import yaml
from pydantic import Field, model_validator

from .. import paths
from ..corpus import SUPPORTED_SUFFIXES
from ..report import _png, _pyplot, markdown_table, write_report
from ..rundir import StageDir
from ..schema import InputPath, InputPaths, ModelRef, Strict, YamlPaths
from ..stage import Stage, StageClock, StageReport, check_inputs, check_model, progress, progress_interval
from ...actors.lm_eval_runner import CODE_TASK
from .decontamination import contamination_json
from .decontamination import markdown as contamination_markdown
from .tasks import (BUILTIN, TaskFileError, builtin_config, chance_accuracy, check_task, perplexity_config,
                    user_task_config)

MODELS_DIR, TASKS_DIR = "models", "tasks"
BuiltinTask = Literal[tuple(BUILTIN)]  # type: ignore[valid-type]


class EvalModel(Strict):
    """One model scored: a base model, optionally with a PEFT adapter on it."""
    model: ModelRef = Field(description="Hugging Face id or model folder (or smollm2).")
    adapter: Optional[InputPath] = Field(None, description="A PEFT folder put on the model: a LoRA adapter "
                                                           "(finetune, preference) or a soft prompt (softprompt).")
    name: Optional[str] = Field(None, description="The model's name in the results; null = made from its folders.")


class CodeEvalConfig(Strict):
    """pass@k on LeetCodeDataset-style problems: each model writes ``samples`` programs per problem, and each runs
    against the problem's tests in a sandboxed process (CPU, memory and wall-time limits, no network, a throwaway
    folder): a program that hangs, forks or eats memory is a failed sample, never a stuck run."""
    problems: Optional[InputPath] = Field(None, description="Problems (JSONL with LeetCodeDataset's fields); null = "
                                          "the bundled LeetCodeDataset v0.3.1 test split (228 problems, 2024-08 to "
                                          "2025-03).")
    after: Optional[str] = Field(None, pattern=r"^\d{4}-\d{2}-\d{2}$", description="Only problems released after "
                                 "this date (YYYY-MM-DD): DOMINO's cutoff against problems the model saw in training.")
    limit: Optional[int] = Field(None, gt=0, description="The first N problems; null = evaluate.limit.")
    samples: int = Field(1, ge=1, le=200, description="Programs sampled per problem (n of pass@k).")
    k: list[int] = Field(default_factory=lambda: [1], description="The k of each pass@k reported (each <= samples).")
    sampling: dict = Field(default_factory=lambda: {"temperature": 0.8, "top_p": 0.95, "max_tokens": 512,
                                                    "seed": 1234}, description="How programs are sampled "
                           "(generate.sampling's fields).")
    wall_seconds: float = Field(20.0, gt=0, description="Wall time of one program with its tests.")
    memory_mb: int = Field(1024, ge=64, description="Address space of one program.")

    @model_validator(mode="after")
    def _k_within_samples(self) -> "CodeEvalConfig":
        if not self.k or any(k < 1 or k > self.samples for k in self.k):
            raise ValueError(f"k: each must be 1..samples ({self.samples}); got {self.k}")
        return self


class EvaluateConfig(Strict):
    """lm-eval-harness on each model, side by side."""
    models: list[EvalModel] = Field(default_factory=list, description="The models, the base first (deltas are "
                                    "against it); empty = the recipe's: its base, each pretrain stage's model, the "
                                    "finetune and preference adapters and the soft prompt, as the recipe makes them.")
    tasks: list[BuiltinTask] = Field(default_factory=list, description="Built-in tasks on the bundled data: "
                                     + ", ".join(BUILTIN) + ".")
    task_files: Optional[YamlPaths] = Field(None, description="lm-eval task YAMLs of your own (plain YAML; "
                                             "local data_files are read from the YAML's folder).")
    perplexity_text: Optional[InputPaths] = Field(None, description="Held-out domain text (JSONL/Parquet) whose "
                                                  "perplexity each model gets (lm-eval's rolling log-likelihood).")
    perplexity_field: str = Field("text", description="perplexity_text: the field holding a document.")
    limit: Optional[int] = Field(None, gt=0, description="Items per task (the first N; null = all).")
    num_fewshot: Optional[int] = Field(None, ge=0, description="Few-shot examples per item; null = each task's "
                                       "own (zero for the built-in tasks).")
    batch_size: int = Field(8, gt=0, description="lm-eval's batch size.")
    bootstrap_iters: int = Field(100_000, ge=0, description="Bootstrap resamples for the standard errors of "
                                 "metrics without a closed form, such as F1 (lm-eval's default; its CLI has no flag).")
    seed: int = Field(1234, description="lm-eval's random seeds: Python, NumPy, torch and few-shot sampling (its "
                                       "CLI's --seed N).")
    cpus_per_model: float = Field(2, gt=0, description="CPUs of each model's Ray task (its torch threads).")
    code: Optional[CodeEvalConfig] = Field(None, description="pass@k on code problems with executable tests, each "
                                           "program in a sandboxed process (the task 'leetcode' in the results).")
    decontamination: bool = Field(True, description="Report which evaluated items each model's training data "
                                  "(as the recipe says) overlaps: qc's 13-gram rule, one Ray Data pass over it.")

    @model_validator(mode="after")
    def _something_to_score(self) -> "EvaluateConfig":
        if not (self.tasks or self.task_files or self.perplexity_text or self.code):
            raise ValueError("evaluate.tasks: give at least one of tasks, task_files, perplexity_text, code")
        return self


class EvaluateReport(StageReport):
    models: list[str]
    tasks: list[str]


# ---------------------------------------------------------------------------------------------------- which models
def recipe_models(recipe) -> list[EvalModel]:
    """What the recipe makes, in the order it makes it: the base model, each pretrain stage's model, the finetune
    adapter (on its base), the preference adapter (on its policy) and the soft prompt (on its frozen model)."""
    from ..training.finetune import ADAPTER_DIR, base_model
    from ..training.preference import policy_model
    from ..training.softprompt import SOFT_PROMPT_DIR

    run = recipe.run_dir
    models: list[EvalModel] = []
    if recipe.pretrain is not None:
        models.append(EvalModel(model=recipe.pretrain.model, name="base"))
        models += [EvalModel(model=paths.join(run, "pretrain", s.name, "model"), name=f"pretrain/{s.name}")
                   for s in recipe.pretrain.stages]
    if recipe.finetune is not None and (base := base_model(recipe.finetune, recipe)) is not None:
        if not models:
            models.append(EvalModel(model=base, name="base"))
        models.append(EvalModel(model=base, adapter=paths.join(run, "finetune", ADAPTER_DIR), name="finetune"))
    if recipe.preference is not None and (policy := policy_model(recipe.preference, recipe)) is not None:
        if not models:
            models.append(EvalModel(model=policy, name="base"))
        models.append(EvalModel(model=policy, adapter=paths.join(run, "preference", ADAPTER_DIR), name="preference"))
    if recipe.softprompt is not None:
        if not models:
            models.append(EvalModel(model=recipe.softprompt.model, name="base"))
        models.append(EvalModel(model=recipe.softprompt.model, adapter=paths.join(run, "softprompt", SOFT_PROMPT_DIR),
                                name="softprompt"))
    return models


def models_of(cfg: EvaluateConfig, recipe) -> list[EvalModel]:
    return cfg.models or recipe_models(recipe)


def model_labels(models: list[EvalModel]) -> list[str]:
    """Each model's name in the results: as given, else its folder's name (and its adapter's); unique."""
    labels, seen = [], {}
    for m in models:
        label = m.name or "+".join(_short(p) for p in (m.model, m.adapter) if p)
        seen[label] = seen.get(label, 0) + 1
        labels.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return labels


def _short(path: str) -> str:
    parts = [p for p in path.rstrip("/").split("/") if p]
    # a stage's output folder (".../finetune/adapter") says more with its stage's name
    return "/".join(parts[-2:]) if parts and parts[-1] in ("model", "adapter", "soft_prompt") else parts[-1]


# ----------------------------------------------------------------------------------------------------- which tasks
def task_configs(cfg: EvaluateConfig) -> list[dict]:
    """Every task as an lm-eval config (TaskFileError naming the file and field for a task that cannot run)."""
    return [config for config, _ in _tasks_with_sources(cfg)]


def _tasks_with_sources(cfg: EvaluateConfig) -> list[tuple[dict, str]]:
    """(config, where it comes from: the field or file an error names)."""
    configs = [(builtin_config(name), f"evaluate.tasks: {name}") for name in cfg.tasks]
    configs += [(user_task_config(path), f"task file {path}") for path in _files(cfg.task_files, (".yaml", ".yml"))]
    if cfg.perplexity_text:
        configs.append((perplexity_config("perplexity", _files(cfg.perplexity_text, SUPPORTED_SUFFIXES),
                                          cfg.perplexity_field),
                        "evaluate.perplexity_text"))
    names = [c["task"] for c, _ in configs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise TaskFileError(f"evaluate: task names must be unique; {', '.join(repeated)} appears more than once")
    return configs


def _files(specs: Optional[list[str]], suffixes: tuple[str, ...]) -> list[str]:
    """The files that input specs (files, folders, globs) name, as the stages expand them."""
    from ..paths import expand_inputs

    return [f.path for f in expand_inputs(specs, suffixes)[1]] if specs else []


# ----------------------------------------------------------------------------------------------------------- the run
def _settings(cfg: EvaluateConfig) -> dict:
    settings = {"num_fewshot": cfg.num_fewshot, "batch_size": cfg.batch_size, "limit": cfg.limit,
                "bootstrap_iters": cfg.bootstrap_iters, "seed": cfg.seed}
    if cfg.code is not None:
        settings["code"] = {**cfg.code.model_dump(mode="json"), "limit": cfg.code.limit or cfg.limit}
    return settings


def _result_name(model: EvalModel, tasks: list[dict], settings: dict) -> str:
    """The file a model's results are kept in: a hash of everything that decides them."""
    key = json.dumps([model.model, model.adapter, tasks, settings], sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16] + ".json"


def score_models(models: list[EvalModel], labels: list[str], tasks: list[dict], cfg: EvaluateConfig,
                 stage: StageDir) -> dict[str, dict]:
    """Each model's lm-eval output, one Ray task per model; a model scored before with the same tasks and settings
    (a rerun after an interruption) is read back, not scored again."""
    import ray

    from ...actors.lm_eval_runner import EvalProgress, evaluate_model
    from ..resources import cluster_gpus
    from ..training.hf_run import model_path

    settings, kept = _settings(cfg), StageDir(stage.child(MODELS_DIR))
    scored: dict[str, dict] = {}
    pending = {}
    every_s = progress_interval()
    counter = EvalProgress.remote()
    remote = ray.remote(evaluate_model).options(num_cpus=cfg.cpus_per_model,
                                                num_gpus=1 if cluster_gpus() else 0, max_retries=1)
    for model, label in zip(models, labels):
        name = _result_name(model, tasks, settings)
        previous = kept.read_json(name)
        if previous is not None:
            scored[label] = previous
            progress(f"[evaluate] {label}: scored before, kept")
            continue
        report = functools.partial(_report_to, counter, label)
        pending[remote.remote(model_path(model.model), model.adapter, tasks, settings, report, every_s)] = (label,
                                                                                                           name)
    progress(f"[evaluate] {len(pending)} model(s) to score on {len(tasks)} task(s)")
    shown: dict[str, int] = {}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=every_s)
        if not done:  # a progress line for each model whose count moved
            running = {label for label, _ in pending.values()}
            for label, count in ray.get(counter.snapshot.remote()).items():
                if label in running and count != shown.get(label):  # a model done has had its last line
                    shown[label] = count
                    progress(f"[evaluate] {label}: lm-eval requests scored so far: {count:,}")
            continue
        label, name = pending.pop(done[0])
        scored[label] = ray.get(done[0])
        kept.write_json(name, scored[label])
        progress(f"[evaluate] {label}: done, lm-eval requests scored: {scored[label]['requests']:,} "
                 f"({len(scored)}/{len(models)} models)")
    ray.kill(counter)
    return scored


def _report_to(counter, label: str, scored: int) -> None:
    counter.update.remote(label, scored)


def primary_metric(result: dict) -> Optional[str]:
    """The number a task is read by: accuracy for multiple choice, exact match (strict) for generation, bits per
    byte for perplexity; else the first metric lm-eval gives."""
    keys = [k for k in result if "," in k and "_stderr" not in k]
    for wanted in ("acc,none", "exact_match,strict-match", "exact_match,none", "bits_per_byte,none"):
        if wanted in keys:
            return wanted
    return keys[0] if keys else None


def results_table(labels: list[str], scored: dict[str, dict], tasks: list[str]) -> list[dict]:
    """One row per (task, metric, model): value, standard error, change from the first model, which way is better."""
    rows, base = [], labels[0]
    for task in tasks:
        metrics = [k for k in scored[base]["results"].get(task, {}) if "," in k and "_stderr" not in k]
        for metric in metrics:
            name, filt = metric.split(",", 1)
            for label in labels:
                result = scored[label]["results"].get(task, {})
                value = result.get(metric)
                stderr = result.get(f"{name}_stderr,{filt}")
                base_value = scored[base]["results"].get(task, {}).get(metric)
                rows.append({"task": task, "metric": metric, "model": label, "value": value,
                             "stderr": stderr if isinstance(stderr, (int, float)) else None,
                             "delta": (value - base_value) if label != base and _number(value) and
                             _number(base_value) else None,
                             "higher_is_better": scored[base]["higher_is_better"].get(task, {}).get(name),
                             "items": scored[label]["n_samples"].get(task, {}).get("effective")})
    return rows


def _number(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def results_png(labels: list[str], scored: dict[str, dict], tasks: list[str], chance: dict[str, float]) -> bytes:
    """A panel per task: each model's primary metric with its standard error, and guessing's accuracy (dashed) on a
    multiple-choice task."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(4.0, 2.6 * len(tasks)), 3.6), dpi=110, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, task in zip(axes[0], tasks):
        metric = primary_metric(scored[labels[0]]["results"].get(task, {}))
        values, errors = [], []
        for label in labels:
            result = scored[label]["results"].get(task, {})
            value = result.get(metric) if metric else None
            stderr = result.get(metric.replace(",", "_stderr,", 1)) if metric else None
            values.append(value if _number(value) else 0.0)
            errors.append(stderr if _number(stderr) else 0.0)
        ax.bar(range(len(labels)), values, yerr=errors, capsize=3, color=[colours[i % len(colours)]
                                                                          for i in range(len(labels))])
        if chance.get(task) is not None and metric and metric.startswith("acc"):
            ax.axhline(chance[task], color="#555555", linestyle="--", linewidth=0.9, label="chance")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{task}\n{metric or 'no metric'}", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _format(value, stderr) -> str:
    if not _number(value):
        return "n/a"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if _number(stderr) else "")


def results_markdown(labels: list[str], rows: list[dict], tasks: list[str], chance: dict) -> list[str]:
    """The results table: a row per task and metric, a column per model (value ± standard error, change from the
    first model), and guessing's accuracy."""
    lines = ["| task | metric | " + " | ".join(labels) + " | chance |", "|" + "---|" * (3 + len(labels))]
    by_key = {(r["task"], r["metric"], r["model"]): r for r in rows}
    for task in tasks:
        for metric in dict.fromkeys(r["metric"] for r in rows if r["task"] == task):
            cells = []
            for label in labels:
                row = by_key[(task, metric, label)]
                delta = f" ({row['delta']:+.4f})" if row["delta"] is not None else ""
                cells.append(_format(row["value"], row["stderr"]) + delta)
            arrow = {True: " ↑", False: " ↓"}.get(by_key[(task, metric, labels[0])]["higher_is_better"], "")
            guess = f"{chance[task]:.4f}" if chance.get(task) is not None and metric.startswith("acc") else ""
            lines.append(f"| {task} | {metric}{arrow} | " + " | ".join(cells) + f" | {guess} |")
    return lines


def lm_eval_command(cfg: EvaluateConfig, base: dict, tasks: list[str], task_dir: str) -> str:
    """lm-eval's own command line that reproduces the first model's numbers from the task YAMLs written here."""
    return (f"lm_eval --model hf --model_args {','.join(f'{k}={v}' for k, v in base['model_args'].items())} "
            f"--include_path {task_dir} --tasks {','.join(tasks)} --device {base['device']} --batch_size "
            f"{cfg.batch_size} --seed {cfg.seed}" + (f" --limit {cfg.limit}" if cfg.limit else "")
            + (f" --num_fewshot {cfg.num_fewshot}" if cfg.num_fewshot is not None else ""))


def run_evaluate(cfg: EvaluateConfig, stage: StageDir, recipe) -> dict:
    clock = StageClock()
    models = models_of(cfg, recipe)
    labels = model_labels(models)
    tasks = task_configs(cfg)
    lm_eval_names = [t["task"] for t in tasks]
    names = lm_eval_names + ([CODE_TASK] if cfg.code else [])
    task_dir = StageDir(stage.child(TASKS_DIR))
    for config in tasks:  # the YAML lm-eval's CLI reads, to reproduce any number here
        task_dir.write_text(f"{config['task']}.yaml", yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    with clock.phase("score"):
        scored = score_models(models, labels, tasks, cfg, stage)
    rows = results_table(labels, scored, names)
    chance = {config["task"]: chance_accuracy(config, cfg.limit) for config in tasks} | (
        {CODE_TASK: None} if cfg.code else {})
    items = sum(scored[label]["n_samples"].get(t, {}).get("effective", 0) for label in labels for t in names)
    base = scored[labels[0]]
    contamination = []
    if cfg.decontamination and tasks:
        with clock.phase("decontamination"):
            contamination = contamination_rows(tasks, cfg.limit, labels, recipe)
    stage.write_json("results.json", {
        "models": [{"name": label, **m.model_dump(mode="json"), "model_args": scored[label]["model_args"],
                    "device": scored[label]["device"]} for m, label in zip(models, labels)],
        "tasks": names, "chance_accuracy": chance, "rows": rows, "lm_eval_version": base.get("lm_eval_version"),
        "n_shot": base["n_shot"], "settings": _settings(cfg),
        **({"contamination": contamination_json(contamination)} if contamination else {})})
    stage.write_bytes("results.png", results_png(labels, scored, names, chance))
    report = {"stage": "evaluate", "rows_in": items, "rows_out": items, "models": labels, "tasks": names,
              **clock.timings(), "outputs": {"results": stage.child("results.json"), "tasks": stage.child(TASKS_DIR),
                                              "chart": stage.child("results.png")}}
    model_rows = [(label, f"{m.model}" + (f" + {m.adapter}" if m.adapter else "")) for m, label in zip(models, labels)]
    write_report(stage, report, "\n".join([
        "# evaluate — lm-eval-harness, model by model", "", markdown_table([
            *model_rows, ("items per model", ", ".join(f"{t} {base['n_samples'].get(t, {}).get('effective', 0):,}"
                                                       for t in names)),
            ("settings", f"{cfg.num_fewshot if cfg.num_fewshot is not None else 'each task own'} few-shot, batch "
                         f"{cfg.batch_size}, seed {cfg.seed}, lm-eval {base.get('lm_eval_version')}"),
            ("seconds", report["seconds"])]), "",
        f"Value ± standard error; in brackets the change from {labels[0]}. ↑: higher is better. chance: the "
        f"accuracy of guessing (the mean of 1 / choices over the items).", "",
        *results_markdown(labels, rows, names, chance), "", "![results](results.png)", "",
        *([f"Reproduce a number with lm-eval's CLI: `{lm_eval_command(cfg, base, lm_eval_names, stage.child(TASKS_DIR))}`"]
          if lm_eval_names else []), "", *code_lines(labels, scored, cfg),
        contamination_markdown(contamination) if contamination else ""]))
    return report


def contamination_rows(tasks: list[dict], limit: Optional[int], labels: list[str], recipe) -> list[dict]:
    """Per model and task, the evaluated items that the model's training data overlaps (decontamination.py)."""
    from .decontamination import eval_items, overlap_report, training_sources

    progress(f"[evaluate] decontamination: the {len(labels)} models' training data against the items scored")
    return overlap_report(eval_items(tasks, limit), {label: training_sources(recipe, label) for label in labels})


def code_lines(labels: list[str], scored: dict[str, dict], cfg: EvaluateConfig) -> list[str]:
    """The code task's sandbox outcomes per model: how the programs ended (passed, failed, timeout, memory, error),
    and the isolation the sandbox had."""
    if cfg.code is None:
        return []
    rows = []
    for label in labels:
        code = scored[label]["code"]
        statuses = ", ".join(f"{k} {v:,}" for k, v in code["statuses"].items() if v)
        rows.append((label, f"{code['samples']:,} programs: {statuses or 'none run'}"
                            + (f"; {len(code['unrunnable'])} problem(s) not runnable here" if code["unrunnable"]
                               else "")))
    first = scored[labels[0]]["code"]
    return [f"## {CODE_TASK}: programs in the sandbox", "",
            markdown_table([*rows, ("isolation", str(first["isolation"])),
                            ("limits", f"{cfg.code.wall_seconds:g} s wall, {cfg.code.memory_mb} MB per program"),
                            ("sampling", f"{cfg.code.samples} per problem, {cfg.code.sampling}")]), ""]


class Evaluate(Stage):
    name, config, report = "evaluate", EvaluateConfig, EvaluateReport
    help = ("lm-eval-harness on each model (base, pretrained stages, adapters, soft prompt): built-in tasks on the "
            "bundled data, your own task YAMLs, held-out perplexity; a table with standard errors and deltas.")
    kept_on_retry = (MODELS_DIR,)

    def check_recipe(self, cfg: EvaluateConfig, recipe) -> None:
        if not models_of(cfg, recipe):
            raise ValueError("evaluate.models: required unless the recipe has a pretrain, finetune, preference or "
                             "softprompt section (whose models it then scores)")

    def preflight(self, cfg: EvaluateConfig, recipe) -> None:
        if recipe.ray.address is None and recipe.ray.num_cpus is not None and cfg.cpus_per_model > recipe.ray.num_cpus:
            raise ValueError(f"evaluate.cpus_per_model: {cfg.cpus_per_model:g} CPUs a model, but the local Ray has "
                             f"{recipe.ray.num_cpus} (ray.num_cpus): the models would never be scheduled")
        if cfg.perplexity_text:
            check_inputs("evaluate.perplexity_text", cfg.perplexity_text)
        for i, model in enumerate(cfg.models):
            check_model(f"evaluate.models[{i}].model", model.model)
            if model.adapter and not paths.is_uri(model.adapter) and not os.path.isfile(
                    os.path.join(model.adapter, "adapter_config.json")):
                raise FileNotFoundError(f"evaluate.models[{i}].adapter: {model.adapter!r} holds no PEFT adapter "
                                        f"(expected a folder with adapter_config.json)")
        for config, where in _tasks_with_sources(cfg):  # each builds and renders its first item before a model loads
            check_task(config, where)
        if cfg.code is not None:
            from .code_tasks import load_problems

            try:
                if not load_problems(cfg.code.problems, 1, cfg.code.after):
                    raise ValueError(f"no problem released after {cfg.code.after}")
            except (OSError, ValueError, KeyError) as e:
                raise ValueError(f"evaluate.code.problems: {e}") from None

    def run(self, cfg: EvaluateConfig, stage: StageDir, recipe) -> dict:
        return run_evaluate(cfg, stage, recipe)

    def summary(self, r: EvaluateReport) -> str:
        return f"evaluate: {len(r.models)} model(s) on {len(r.tasks)} task(s), {r.rows_out:,} items scored"
