"""Builds the built-in evaluation tasks' data (``pipelines/evaluation/tasks/NAME.SPLIT.jsonl``) from the public
datasets in a ``shared/data`` folder, so a clone evaluates offline. Run once when a task is added; the output is
committed:

    python -m domainsynth.pipelines.evaluation.bundle_tasks ../shared/data

Each task has a test file and, where the dataset has one, a file of few-shot examples. Origins and
licences are in ``tasks/SOURCE.md``.
"""

from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path

TASKS_DIR = Path(__file__).parent / "tasks"
# CRAFT's out-of-distribution biomedical subjects (its Table 6).
MMLU_SUBJECTS = ("anatomy", "medical_genetics", "college_biology", "high_school_biology")
FEWSHOT = 20  # few-shot examples kept where a dataset has a training split


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]


def _write(name: str, rows: list[dict]) -> None:
    """One file per split (``NAME.test.jsonl``, ``NAME.train.jsonl``): lm-eval reads a split from its own file."""
    for split in sorted({r["split"] for r in rows}):
        part = [{k: v for k, v in r.items() if k != "split"} for r in rows if r["split"] == split]
        path = TASKS_DIR / f"{name}.{split}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
        print(f"{path}: {len(part):,} rows")


def pubmedqa(shared: Path) -> list[dict]:
    rows = _jsonl(shared / "pubmedqa" / "pqal_1k.jsonl")
    test = [r for r in rows if str(r["in_official_test_split"]) == "True"]
    train = [r for r in rows if str(r["in_official_test_split"]) != "True"][:FEWSHOT]
    keep = ("pmid", "question", "context", "final_decision")
    return ([{**{k: r[k] for k in keep}, "split": "test"} for r in test] +
            [{**{k: r[k] for k in keep}, "split": "train"} for r in train])


def mmlu(shared: Path, subject: str) -> list[dict]:
    def read(split: str, folder: str) -> list[dict]:
        with open(shared / "mmlu" / folder / f"{subject}_{folder}.csv", newline="", encoding="utf-8") as f:
            return [{"question": q, "choices": [a, b, c, d], "answer": "ABCD".index(ans.strip()), "split": split}
                    for q, a, b, c, d, ans in csv.reader(f)]
    return read("test", "test") + read("train", "dev")


def commonsenseqa(shared: Path) -> list[dict]:
    return [{"id": r["id"], "question": r["question"], "choices": r["choices"]["text"],
             "answer": r["choices"]["label"].index(r["answerKey"]), "split": "test"}
            for r in _jsonl(shared / "commonsenseqa" / "dev_rand_split.jsonl")]


def financial_phrasebank(shared: Path) -> list[dict]:
    rows = [{"id": r["id"], "text": r["text"], "label": r["label"], "split": "test"}
            for r in _jsonl(shared / "financial_phrasebank" / "financial_phrasebank_50agree.jsonl")]
    # The source lists sentences grouped by label (its first 100 are 78% positive): shuffled once, with a fixed seed,
    # so that a task's first N items (evaluate.limit) are a fair sample.
    random.Random(0).shuffle(rows)
    return rows


def gsm8k(shared: Path) -> list[dict]:
    return ([{**r, "split": "test"} for r in _jsonl(shared / "gsm8k" / "test.jsonl")] +
            [{**r, "split": "train"} for r in _jsonl(shared / "gsm8k" / "train.jsonl")[:FEWSHOT]])


# What the code tasks need of a LeetCodeDataset problem (pipelines/evaluation/code_tasks.py): the statement and
# starter code for the prompt, the date for the contamination cutoff, the imports, tests and entry point to run a
# solution, and the reference solution (tests check that it passes in the sandbox).
LEETCODE_FIELDS = ("task_id", "question_id", "difficulty", "estimated_date", "problem_description", "starter_code",
                   "prompt", "entry_point", "test", "completion")


def leetcode(shared: Path) -> list[dict]:
    """LeetCodeDataset v0.3.1's test split: 228 problems released 2024-08 to 2025-03, each with executable tests."""
    return [{**{k: r[k] for k in LEETCODE_FIELDS}, "split": "test"}
            for r in _jsonl(shared / "leetcodedataset" / "LeetCodeDataset-v0.3.1-test.jsonl")]


def main(argv: list[str] | None = None) -> None:
    shared = Path((argv or sys.argv[1:] or ["../shared/data"])[0])
    _write("pubmedqa", pubmedqa(shared))
    for subject in MMLU_SUBJECTS:
        _write(f"mmlu_{subject}", mmlu(shared, subject))
    _write("commonsenseqa", commonsenseqa(shared))
    _write("financial_phrasebank", financial_phrasebank(shared))
    _write("gsm8k", gsm8k(shared))
    _write("leetcode", leetcode(shared))


if __name__ == "__main__":
    main()
