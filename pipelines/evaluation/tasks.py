"""The evaluation tasks, as lm-eval task configs (the dicts its YAML files hold): the built-in ones on the bundled data,
a user's own task YAML, and held-out perplexity on a user's text.

Every config that leaves this module names its data files by absolute path, so the same config runs in a Ray worker
and, written out as YAML (``<run>/evaluate/tasks/``), in lm-eval's own CLI (``lm_eval --include_path``).
A task is checked before any work: its fields, its data files, and lm-eval building it and rendering its first test
item (a template naming a missing field fails there, with the file and the field named).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

import yaml

TASKS_DIR = Path(__file__).parent / "tasks"
OUTPUT_TYPES = ("multiple_choice", "generate_until", "loglikelihood", "loglikelihood_rolling")
_ACC = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]


def _multiple_choice(text: str, choice: Any, target: str, description: str = "") -> dict:
    return {"output_type": "multiple_choice", "doc_to_text": text, "doc_to_choice": choice, "doc_to_target": target,
            "metric_list": _ACC, **({"description": description} if description else {})}


def _mmlu(subject: str) -> dict:
    title = subject.replace("_", " ")
    return _multiple_choice("{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                            "D. {{choices[3]}}\nAnswer:", ["A", "B", "C", "D"], "answer",
                            f"The following are multiple choice questions (with answers) about {title}.\n\n")


# name -> the task's config without its data (lm-eval's own configs for these tasks, on local files).
BUILTIN: dict[str, dict] = {
    "pubmedqa": _multiple_choice("Abstract: {{context}}\nQuestion: {{question}}\nAnswer:", ["yes", "no", "maybe"],
                                 "{{['yes', 'no', 'maybe'].index(final_decision)}}"),
    **{f"mmlu_{s}": _mmlu(s) for s in ("anatomy", "medical_genetics", "college_biology", "high_school_biology")},
    "commonsenseqa": _multiple_choice("Question: {{question}}\nAnswer:", "choices", "answer"),
    "financial_phrasebank": _multiple_choice(
        "Sentence: {{text}}\nQuestion: Is the sentiment of this financial news positive, negative or neutral?\n"
        "Answer:", ["negative", "neutral", "positive"], "{{['negative', 'neutral', 'positive'].index(label)}}"),
    "gsm8k": {
        "output_type": "generate_until", "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "ignore_case": True, "ignore_punctuation": False,
                         "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"]}],
        "generation_kwargs": {"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False,
                              "temperature": 0.0, "max_gen_toks": 256},
        "filter_list": [{"name": "strict-match", "filter": [
                             {"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
                             {"function": "take_first"}]},
                        {"name": "flexible-extract", "filter": [
                            {"function": "regex", "group_select": -1,
                             "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                            {"function": "take_first"}]}]},
}


def builtin_config(name: str) -> dict:
    """A built-in task's config, its data files (``tasks/NAME.test.jsonl``, few-shot examples in ``NAME.train.jsonl``
    where the dataset has them) named by absolute path."""
    files = {"test": str(TASKS_DIR / f"{name}.test.jsonl")}
    if (TASKS_DIR / f"{name}.train.jsonl").is_file():
        files["train"] = str(TASKS_DIR / f"{name}.train.jsonl")
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": files}, "test_split": "test",
            **({"fewshot_split": "train"} if "train" in files else {}), **BUILTIN[name],
            "metadata": {"version": 1.0}}


def perplexity_config(name: str, files: list[str], field: str) -> dict:
    """Held-out perplexity on the documents of ``files`` (JSONL or Parquet, ``field`` holding each text): lm-eval's
    rolling log-likelihood over each whole document, reported as word and byte perplexity and bits per byte."""
    kind = "parquet" if all(f.endswith(".parquet") for f in files) else "json"
    return {"task": name, "dataset_path": kind, "dataset_kwargs": {"data_files": {"test": list(files)}},
            "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "",
            "doc_to_target": f"{{{{{field}}}}}",
            "metric_list": [{"metric": metric, "aggregation": aggregation, "higher_is_better": False}
                            for metric, aggregation in (("word_perplexity", "weighted_perplexity"),
                                                        ("byte_perplexity", "weighted_perplexity"),
                                                        ("bits_per_byte", "bits_per_byte"))],
            "metadata": {"version": 1.0}}


class TaskFileError(ValueError):
    """A task file that cannot run, naming the file and the field."""


def user_task_config(path: str) -> dict:
    """The lm-eval task YAML at ``path`` as a config whose local data files (relative to the YAML's folder, as its
    author sees them) are absolute; TaskFileError naming the file and field when a required field is missing or
    wrong. Plain YAML only: a ``!function`` needs Python beside the file, which a Ray worker does not have."""
    where = f"task file {path}"
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except yaml.constructor.ConstructorError as e:
        raise TaskFileError(f"{where}: {e.problem} (tags such as !function are not supported: write the field as a "
                            f"Jinja template over the item's fields)") from None
    except (OSError, yaml.YAMLError) as e:
        raise TaskFileError(f"{where}: not readable as YAML: {e}") from None
    if not isinstance(config, dict):
        raise TaskFileError(f"{where}: expected a mapping of lm-eval task fields, got {type(config).__name__}")
    for field in ("task", "dataset_path", "doc_to_text", "doc_to_target"):
        if field not in config:
            raise TaskFileError(f"{where}: {field}: required")
    if not isinstance(config["task"], str) or not config["task"].strip():
        raise TaskFileError(f"{where}: task: expected the task's name, got {config['task']!r}")
    output_type = config.get("output_type", "generate_until")
    if output_type not in OUTPUT_TYPES:
        raise TaskFileError(f"{where}: output_type: expected one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    if output_type == "multiple_choice" and "doc_to_choice" not in config:
        raise TaskFileError(f"{where}: doc_to_choice: required for output_type multiple_choice")
    if not any(config.get(s) for s in ("test_split", "validation_split")):
        raise TaskFileError(f"{where}: test_split: required (the split evaluated)")
    config["dataset_kwargs"] = _absolute_data_files(config.get("dataset_kwargs"), os.path.dirname(path), where)
    return config


def _absolute_data_files(kwargs: Optional[dict], folder: str, where: str) -> Optional[dict]:
    if not kwargs or "data_files" not in kwargs:
        return kwargs
    files = kwargs["data_files"]
    by_split = files if isinstance(files, dict) else {"train": files}

    def resolve(value: str, split: str) -> str:
        if "://" in value:
            return value
        resolved = value if os.path.isabs(value) else os.path.normpath(os.path.join(folder, value))
        if not os.path.isfile(resolved):
            raise TaskFileError(f"{where}: dataset_kwargs.data_files.{split}: no file at {value!r} "
                                f"(relative paths are read from the task file's folder)")
        return resolved

    resolved = {split: ([resolve(v, split) for v in value] if isinstance(value, list) else resolve(value, split))
                for split, value in by_split.items()}
    return {**kwargs, "data_files": resolved if isinstance(files, dict) else resolved["train"]}


def check_task(config: dict, where: str) -> int:
    """lm-eval builds the task and renders its first item (text, target, choices): a template naming a field the
    items lack fails here, before any model loads. Returns the number of items evaluated."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    datasets.disable_progress_bars()  # a check, not work to watch
    try:
        task = ConfigurableTask(config=dict(config))
        docs = task.eval_docs
        if len(docs) == 0:
            raise TaskFileError(f"{where}: {config.get('test_split', 'test_split')}: the split holds no items")
        first = docs[0]
        for field, render in (("doc_to_text", task.doc_to_text), ("doc_to_target", task.doc_to_target)):
            _render(where, field, render, first)
        if config.get("output_type") == "multiple_choice":
            choices = _render(where, "doc_to_choice", task.doc_to_choice, first)
            if not isinstance(choices, list) or len(choices) < 2:
                raise TaskFileError(f"{where}: doc_to_choice: expected a list of at least two choices, got "
                                    f"{choices!r}")
        return len(docs)
    except TaskFileError:
        raise
    except Exception as e:  # lm-eval's own complaint (it renders an item while building the task), file named
        field = _template_naming(config, str(e))
        raise TaskFileError(f"{where}: {field + ': ' if field else ''}lm-eval cannot build the task: "
                            f"{type(e).__name__}: {e}") from None


def _template_naming(config: dict, error: str) -> Optional[str]:
    """The template field that uses the name an error says is undefined (Jinja's "'x' is undefined")."""
    match = re.search(r"'([^']+)' is undefined", error)
    if match is None:
        return None
    name = re.compile(rf"\b{re.escape(match.group(1))}\b")
    return next((f for f in ("doc_to_text", "doc_to_target", "doc_to_choice")
                 if isinstance(config.get(f), str) and name.search(config[f])), None)


def _render(where: str, field: str, render, doc):
    try:
        return render(doc)
    except Exception as e:
        raise TaskFileError(f"{where}: {field}: cannot render on the first item: {type(e).__name__}: {e}") from None


def chance_accuracy(config: dict, limit: Optional[int]) -> Optional[float]:
    """A multiple-choice task's accuracy by guessing: the mean of 1 / choices over the items evaluated (the first
    ``limit``); None for other output types."""
    if config.get("output_type") != "multiple_choice":
        return None
    import datasets
    from lm_eval.api.task import ConfigurableTask

    datasets.disable_progress_bars()
    task = ConfigurableTask(config=dict(config))
    docs = task.eval_docs
    count = len(docs) if limit is None else min(limit, len(docs))
    return sum(1 / len(task.doc_to_choice(docs[i])) for i in range(count)) / count if count else None

