"""evaluate on a real local Ray with the tiny model: lm-eval-harness scores a model and the same model under a soft
prompt (a PEFT prompt-tuning folder) on a built-in task, a user's task YAML and held-out perplexity, with results
equal to lm-eval's own CLI on the same inputs; a rerun after an interruption keeps the models already scored; a
malformed task file fails before any work, naming the file and the field; progress counts the requests scored."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from domainsynth.cluster.cli import main
from domainsynth.pipelines.recipe import build_recipe
from domainsynth.pipelines.runner import run_recipe

from conftest import DATA, read_jsonl_gz, write_jsonl

LIMIT = 6


@pytest.fixture(scope="module")
def soft_prompt_adapter(tmp_path_factory, tiny_llama) -> str:
    """A PEFT prompt-tuning folder for the tiny Llama (4 virtual tokens, PEFT's random initialisation)."""
    import torch
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))
    folder = str(tmp_path_factory.mktemp("soft-prompt") / "adapter")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def user_task(tmp_path_factory) -> str:
    """A user's multiple-choice task: a JSONL beside a short lm-eval YAML that names it by a relative path."""
    folder = tmp_path_factory.mktemp("user-task")
    write_jsonl(folder / "claims.jsonl", [
        {"claim": "Insulin lowers blood glucose.", "verdict": "true"},
        {"claim": "Antibiotics cure viral colds.", "verdict": "false"},
        {"claim": "Red blood cells carry oxygen.", "verdict": "true"},
        {"claim": "The liver pumps blood.", "verdict": "false"},
        {"claim": "Neurons transmit signals.", "verdict": "true"},
        {"claim": "Bones are made of glass.", "verdict": "false"}])
    (folder / "claims.yaml").write_text(
        "task: claims\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: claims.jsonl\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: \"Claim: {{claim}}\\nTrue or false?\"\n"
        "doc_to_choice: [\"true\", \"false\"]\ndoc_to_target: \"{{['true', 'false'].index(verdict)}}\"\n"
        "metric_list:\n  - metric: acc\n")
    return str(folder / "claims.yaml")


@pytest.fixture(scope="module")
def held_out_text(tmp_path_factory) -> str:
    medical = read_jsonl_gz(DATA / "medical_abstracts.jsonl.gz")
    return str(write_jsonl(tmp_path_factory.mktemp("held-out") / "abstracts.jsonl",
                           [{"text": r["text"]} for r in medical[-LIMIT:]]))


def lm_eval_cli(model_args: str, tasks_dir: str, tasks: list[str], out: str) -> dict:
    """lm-eval's own command line on the task YAMLs the stage wrote; its results by task."""
    subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args, "--include_path",
                    tasks_dir, "--tasks", ",".join(tasks), "--limit", str(LIMIT), "--device", "cpu", "--batch_size",
                    "8", "--seed", "1234", "--output_path", out],
                   check=True, capture_output=True, text=True, timeout=600,
                   env={**os.environ, "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    [results] = glob.glob(os.path.join(out, "**", "results_*.json"), recursive=True)
    return json.load(open(results))["results"]


def test_evaluate_scores_models_as_lm_eval_cli_does_and_resumes(ray_local, tiny_llama, soft_prompt_adapter,
                                                                user_task, held_out_text, tmp_path):
    section = {"models": [{"model": tiny_llama, "name": "base"},
                          {"model": tiny_llama, "adapter": soft_prompt_adapter, "name": "soft-prompt"}],
               "tasks": ["pubmedqa"], "task_files": [user_task], "perplexity_text": [held_out_text],
               "limit": LIMIT, "cpus_per_model": 1}
    recipe = build_recipe({"run_dir": str(tmp_path / "run"), "evaluate": section}, "test", "/")
    first_run: list[str] = []
    report = run_recipe(recipe, echo=first_run.append)["evaluate"]
    stage = tmp_path / "run" / "evaluate"
    results = json.load(open(stage / "results.json"))
    tasks = ["pubmedqa", "claims", "perplexity"]
    assert report["models"] == ["base", "soft-prompt"] and report["tasks"] == tasks
    assert report["rows_in"] == report["rows_out"] == 2 * 3 * LIMIT  # every item of every task, for each model
    assert sorted(os.listdir(stage / "tasks")) == sorted(f"{t}.yaml" for t in tasks)
    # Progress counts what lm-eval scored: a log-likelihood per choice (6 x 3 + 6 x 2) and one per document.
    for name in ("base", "soft-prompt"):
        assert f"[evaluate] {name}: done, lm-eval requests scored: 36 " in "\n".join(first_run), first_run

    ours = {(r["model"], r["task"], r["metric"]): r for r in results["rows"]}
    for name, adapter in (("base", None), ("soft-prompt", soft_prompt_adapter)):
        model_args = f"pretrained={tiny_llama},dtype=float32" + (f",peft={adapter}" if adapter else "")
        theirs = lm_eval_cli(model_args, str(stage / "tasks"), tasks, str(tmp_path / f"cli-{name}"))
        compared = 0
        for task in tasks:
            for metric, value in theirs[task].items():
                if "," not in metric or "_stderr" in metric:
                    continue
                row = ours[(name, task, metric)]
                assert row["value"] == pytest.approx(value, rel=1e-6), (name, task, metric)
                if isinstance(theirs[task].get(metric.replace(",", "_stderr,", 1)), float):
                    assert row["stderr"] == pytest.approx(theirs[task][metric.replace(",", "_stderr,", 1)], rel=1e-6)
                compared += 1
        assert compared >= 6  # acc and acc_norm of pubmedqa, acc of claims, three perplexities

    # The soft prompt is really put before the text: every document's likelihood moves.
    bits = {m: ours[(m, "perplexity", "bits_per_byte,none")]["value"] for m in ("base", "soft-prompt")}
    assert bits["base"] != pytest.approx(bits["soft-prompt"], rel=1e-4)
    assert ours[("soft-prompt", "perplexity", "bits_per_byte,none")]["delta"] == pytest.approx(
        bits["soft-prompt"] - bits["base"])
    assert results["chance_accuracy"] == {"pubmedqa": pytest.approx(1 / 3), "claims": 0.5, "perplexity": None}
    assert (stage / "results.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (stage / "report.md").read_text()
    assert "| pubmedqa | acc,none ↑ |" in markdown and "| perplexity | bits_per_byte,none ↓ |" in markdown

    # Interrupted after both models were scored (the stage's completion marker and results gone): the rerun reads
    # the kept results and scores nothing again.
    os.remove(stage / "_COMPLETE.json")
    os.remove(stage / "results.json")
    lines = []
    run_recipe(recipe, echo=lines.append)
    assert sum("scored before, kept" in line for line in lines) == 2, lines
    assert json.load(open(stage / "results.json"))["rows"] == results["rows"]


@pytest.mark.parametrize("problem, yaml_text, named", [
    ("no choices for a multiple-choice task",
     "task: t\ndataset_path: json\ndataset_kwargs: {data_files: {test: items.jsonl}}\noutput_type: multiple_choice\n"
     "test_split: test\ndoc_to_text: '{{question}}'\ndoc_to_target: 0\n", "doc_to_choice"),
    ("a data file that is not there",
     "task: t\ndataset_path: json\ndataset_kwargs: {data_files: {test: missing.jsonl}}\noutput_type: generate_until\n"
     "test_split: test\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n", "data_files.test"),
    ("a template naming a field the items lack",
     "task: t\ndataset_path: json\ndataset_kwargs: {data_files: {test: items.jsonl}}\noutput_type: generate_until\n"
     "test_split: test\ndoc_to_text: '{{prompt.upper()}}'\ndoc_to_target: '{{answer}}'\n", "doc_to_text"),
    ("an output type lm-eval does not have",
     "task: t\ndataset_path: json\ndataset_kwargs: {data_files: {test: items.jsonl}}\noutput_type: classify\n"
     "test_split: test\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n", "output_type"),
    ("a !function tag", "task: t\ndataset_path: json\ndoc_to_text: !function utils.text\ndoc_to_target: a\n",
     "!function"),
])
def test_a_malformed_task_file_fails_before_work_naming_the_field(tmp_path, capsys, tiny_llama, problem, yaml_text,
                                                                   named):
    write_jsonl(tmp_path / "items.jsonl", [{"question": "2 + 2?", "answer": "4"}])
    (tmp_path / "task.yaml").write_text(yaml_text)
    code = main(["evaluate", "--model", tiny_llama, "--task", str(tmp_path / "task.yaml"),
                 "--out", str(tmp_path / "run")])
    error = capsys.readouterr().err
    assert code == 2, problem
    assert str(tmp_path / "task.yaml") in error and named in error, error
    assert not (tmp_path / "run").exists()  # nothing started


def test_without_models_the_recipe_s_own_models_are_scored_base_first(tmp_path, tiny_llama):
    data = str(write_jsonl(tmp_path / "docs.jsonl", [{"text": "a document"}]))
    recipe = build_recipe({"run_dir": str(tmp_path / "run"),
                           "pretrain": {"model": tiny_llama, "general": data,
                                        "stages": [{"name": "knowledge", "data": data},
                                                   {"name": "tasks", "data": data}]},
                           "finetune": {"data": data, "merge": True},
                           "preference": {"pairs": data},
                           "evaluate": {"tasks": ["pubmedqa"]}}, "test", "/")
    from domainsynth.pipelines.evaluation.evaluate import models_of

    run = str(tmp_path / "run")
    models = [(m.name, m.model, m.adapter) for m in models_of(recipe.evaluate, recipe)]
    assert models == [
        ("base", tiny_llama, None),
        ("pretrain/knowledge", f"{run}/pretrain/knowledge/model", None),
        ("pretrain/tasks", f"{run}/pretrain/tasks/model", None),
        ("finetune", f"{run}/pretrain/tasks/model", f"{run}/finetune/adapter"),  # tuned on pretrain's last model
        ("preference", f"{run}/finetune/model", f"{run}/preference/adapter"),  # aligned on finetune's merged one
    ]


def test_code_problems_are_scored_as_pass_at_k_beside_the_other_tasks(ray_local, tiny_llama, held_out_text,
                                                                      tmp_path):
    """The code task in the same table: each model writes 2 programs for each of 2 LeetCodeDataset problems, each
    runs against the problem's tests in the sandbox; the tiny model writes no working program, so pass@k is 0 — what
    is checked is that every program was run and counted, and the numbers sit beside lm-eval's."""
    section = {"models": [{"model": tiny_llama, "name": "base"}], "perplexity_text": [held_out_text], "limit": 2,
               "cpus_per_model": 1, "code": {"samples": 2, "k": [1, 2], "sampling": {"max_tokens": 16},
                                             "wall_seconds": 10}}
    lines: list[str] = []
    report = run_recipe(build_recipe({"run_dir": str(tmp_path / "run"), "evaluate": section}, "test", "/"),
                        echo=lines.append)["evaluate"]
    assert report["tasks"] == ["perplexity", "leetcode"]
    results = json.load(open(tmp_path / "run/evaluate/results.json"))
    code_rows = {r["metric"]: r for r in results["rows"] if r["task"] == "leetcode"}
    assert set(code_rows) == {"pass@1,none", "pass@2,none"}
    assert all(r["value"] == 0.0 and r["items"] == 2 and r["higher_is_better"] for r in code_rows.values())
    # 2 perplexity documents + 4 programs; each program ended in one of the sandbox's outcomes
    assert "[evaluate] base: done, lm-eval requests scored: 6 " in "\n".join(lines), lines
    [kept] = glob.glob(str(tmp_path / "run/evaluate/models/*.json"))
    code = json.load(open(kept))["code"]
    assert sum(code["statuses"].values()) == code["samples"] == 4
    assert code["statuses"]["passed"] == 0
    markdown = (tmp_path / "run/evaluate/report.md").read_text()
    assert "| leetcode | pass@1,none ↑ |" in markdown and "programs in the sandbox" in markdown


def test_a_code_k_above_the_samples_fails_before_work(tmp_path, tiny_llama, capsys):
    from domainsynth.pipelines.recipe import RecipeError

    with pytest.raises(RecipeError, match="evaluate.code.*k: each must be 1..samples"):
        build_recipe({"run_dir": str(tmp_path), "evaluate": {"models": [{"model": tiny_llama}],
                                                              "code": {"samples": 2, "k": [1, 5]}}}, "test", "/")
