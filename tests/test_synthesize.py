"""Synthesis and judging on a real local Ray with the tiny Llama (random weights: what it writes is gibberish, but it
goes through the same prompts, engines, structured outputs and checks as a real model's): each method end to end
with its accounting (rows in = kept + dropped by reason + quarantined), structured outputs that parse into the
task's format, the judge's ratings on every row, and bad templates / few-shot files refused before any generation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from domainsynth.cluster.cli import main
from domainsynth.pipelines.synthesis import trait
from domainsynth.pipelines.recipe import build_recipe
from domainsynth.pipelines.rundir import StageError
from domainsynth.pipelines.runner import run_recipe

from conftest import DATA, read_jsonl_gz, write_jsonl

BIOQA = str(DATA / "craft_bioqa_fewshot.jsonl")
CSQA = str(DATA / "craft_csqa_fewshot.jsonl")
MATH = str(DATA / "math_problems.jsonl")
RATINGS = ("very poor", "poor", "average", "good", "excellent")  # DOMINO's five levels, worst first (the contract)


@pytest.fixture(scope="session")
def documents(tmp_path_factory) -> str:
    """Eight real biomedical abstracts (the documents CRAFT rewrites) and one row without text."""
    rows = [{"id": r["id"], "text": r["text"], "label": r["label"]}
            for r in read_jsonl_gz(DATA / "medical_abstracts.jsonl.gz")[:8]]
    path = write_jsonl(tmp_path_factory.mktemp("docs") / "documents.jsonl", rows)
    with open(path, "a") as f:
        f.write(json.dumps({"id": "no-text", "label": "x"}) + "\n")
    return str(path)


def rows(folder: Path) -> list[dict]:
    if not folder.exists():
        return []
    return pads.dataset(str(folder), format="parquet").to_table().to_pylist()


def accounted(report: dict) -> bool:
    return report["rows_in"] == report["rows_out"] + sum(report["rows_filtered"].values()) + report["rows_quarantined"]


def craft_recipe(run_dir, model, documents, **overrides) -> dict:
    craft = {"documents": documents, "few_shots": BIOQA, "max_document_chars": 300, "shots_per_prompt": 2,
             "min_question_chars": 15, **overrides.pop("craft", {})}
    return {"run_dir": str(run_dir),
            "synthesize": {"method": "craft", "model": model, "craft": craft, "max_field_chars": 24,
                           "sampling": {"max_tokens": 200, "seed": 0}, "batch_size": 4, **overrides}}


def test_craft_samples_parse_into_the_few_shots_format(ray_local, tmp_path, tiny_llama_4k, documents):
    report = run_recipe(build_recipe(craft_recipe(tmp_path / "run", tiny_llama_4k, documents), "test", "."))[
        "synthesize"]
    assert accounted(report) and report["rows_in"] == 9
    assert report["rows_quarantined"] == 1  # the row without text, with its file and line
    quarantine = [json.loads(line) for line in open(tmp_path / "run/synthesize/quarantine.jsonl")]
    assert quarantine[0]["line"] == 9 and "text" in quarantine[0]["reason"]
    kept, dropped = rows(tmp_path / "run/synthesize/data"), rows(tmp_path / "run/synthesize/dropped")
    assert len(kept) == report["rows_out"] and len(dropped) == sum(report["rows_filtered"].values())
    assert kept, "structured output should give at least one valid multiple-choice sample"
    for sample in kept:  # the few-shots' own format: a question, options A-D, "X."
        lines = sample["instruction"].split("\n")
        assert [line[:3] for line in lines[1:]] == ["A. ", "B. ", "C. ", "D. "]
        assert len(lines[0]) >= 15 and re.fullmatch(r"[ABCD]\.", sample["output"])
        assert sample["text"] == f"{sample['instruction']}\n{sample['output']}"
        assert sample["source_id"].startswith("medabs-") and sample["label"]  # the document's fields are kept
        assert json.loads(sample["completion"])["answer"] + "." == sample["output"]
    for row in dropped:
        assert row["drop_reason"] in {"duplicate_options", "empty_option", "placeholder", "unparseable", "too_short"}
        assert row["drop_detail"]
    assert (tmp_path / "run/synthesize/report.md").read_text().count("acceptance rate") == 1


def test_craft_answers_cut_short_are_dropped_as_unparseable(ray_local, tmp_path, tiny_llama_4k, documents):
    recipe = craft_recipe(tmp_path / "run", tiny_llama_4k, documents, sampling={"max_tokens": 6})
    report = run_recipe(build_recipe(recipe, "test", "."))["synthesize"]
    assert report["rows_out"] == 0 and report["rows_filtered"] == {"unparseable": 8} and accounted(report)
    assert all("cut off at max_tokens" in r["drop_detail"] for r in rows(tmp_path / "run/synthesize/dropped"))
    # A stage after it stops before reading the empty output, saying which stage emptied it and why.
    recipe["qc"] = {}
    with pytest.raises(StageError) as stopped:
        run_recipe(build_recipe(recipe, "test", "."), echo=lambda line: None)
    message = str(stopped.value)
    assert message.startswith("qc.input: synthesize kept no rows, so qc has nothing to read")
    assert "dropped 8 unparseable" in message and str(tmp_path / "run" / "synthesize") in message
    assert not (tmp_path / "run" / "qc").exists()


def test_craft_validation_as_in_the_paper():
    from domainsynth.pipelines.synthesis import craft
    from domainsynth.pipelines.synthesis.craft import CraftConfig

    mcq = CraftConfig(few_shots=[BIOQA])
    good = {"question": "Which organelle makes ATP?", "options": ["Nucleus", "Mitochondrion", "Ribosome", "Golgi"],
            "answer": "B"}
    assert craft.validate(good, mcq) is None
    assert craft.validate({**good, "options": good["options"][:3]}, mcq)[0] == "wrong_option_count"
    assert craft.validate({**good, "answer": "E"}, mcq)[0] == "bad_answer"
    assert craft.validate({**good, "question": "Why?"}, mcq)[0] == "too_short"
    duplicated = ["Nucleus", "nucleus ", "Ribosome", "Golgi"]
    assert craft.validate({**good, "options": duplicated}, mcq)[0] == "duplicate_options"
    assert craft.validate({**good, "options": ["a", " ", "b", "c"]}, mcq)[0] == "empty_option"
    assert craft.validate({"question": "x"}, mcq)[0] == "wrong_format"
    summary = CraftConfig(few_shots=[BIOQA], task="summarization")
    source = "Mitochondria make most of the cell's ATP through oxidative phosphorylation. " * 4
    assert craft.validate({"source": source, "summary": "Mitochondria are where most ATP is made."}, summary) is None
    assert craft.validate({"source": source, "summary": "ATP."}, summary)[0] == "too_short"
    assert craft.validate({"source": "Too short a source.", "summary": "x" * 50}, summary)[0] == "too_short"
    # A small model shown the answer form copies it: its placeholders are no sample.
    copied = {**good, "options": ["<option A>", "Mitochondrion", "Ribosome", "Golgi"]}
    assert craft.validate(copied, mcq)[0] == "placeholder"
    assert craft.validate({**good, "question": "<Question> about ATP synthesis?"}, mcq)[0] == "placeholder"
    assert craft.validate({**good, "question": "Is <i>E. coli</i> a bacterium, or a yeast?"}, mcq) is None
    assert craft.validate({**good, "options": ["A", "B", "C", "D"]}, mcq)[0] == "placeholder"
    assert craft.validate({**good, "options": ["A.", "Mitochondrion", "Ribosome", "Golgi"]}, mcq)[0] == "placeholder"
    assert craft.validate({**good, "options": ["A cell wall", "Mitochondrion", "Ribosome", "Golgi"]}, mcq) is None


@pytest.mark.parametrize("task", ["multiple_choice", "qa", "summarization"])
def test_a_few_shot_shown_as_json_parses_back_into_the_same_few_shot(task, tmp_path):
    """The prompt shows each few-shot as the JSON answer that would have written it: that JSON, validated and
    written in the few-shots' format, is the few-shot again (so the example the model sees is a valid sample)."""
    from domainsynth.pipelines.synthesis import craft
    from domainsynth.pipelines.synthesis.craft import CraftConfig

    if task == "multiple_choice":
        shots_file = BIOQA
    else:
        source = "Mitochondria make most of the cell's ATP through oxidative phosphorylation. " * 4
        shot = ({"Text": source, "Instruction": "Where is most ATP made?", "Output": "In the mitochondria."}
                if task == "qa" else
                {"Text": source, "Instruction": f"Write a TLDR for the following text.\n\n{source}",
                 "Output": "Mitochondria make most of the cell's ATP, by oxidative phosphorylation."})
        shots_file = tmp_path / "shots.jsonl"
        shots_file.write_text(json.dumps(shot) + "\n")
    cfg = CraftConfig(few_shots=[str(shots_file)], task=task)
    shots = craft.load_few_shots(cfg)
    for shot in shots:
        sample = json.loads(craft.as_json(shot, cfg))
        assert craft.validate(sample, cfg) is None
        again = craft.in_few_shot_format(sample, cfg)
        assert again["output"] == shot["output"].strip()
        assert again["instruction"].splitlines() == [line.strip() for line in shot["instruction"].strip().splitlines()]


def test_trait_passages_group_problems_of_different_tasks(ray_local, tmp_path, tiny_llama_4k):
    recipe = {"run_dir": str(tmp_path / "run"),
              "synthesize": {"method": "trait", "model": tiny_llama_4k, "max_field_chars": 40, "batch_size": 4,
                             "sampling": {"max_tokens": 160, "seed": 0},
                             "trait": {"examples": MATH, "grouping": "knowledge", "group_size": 3,
                                       "min_similarity": 0.0, "min_solution_chars": 5,
                                       "min_enlightenment_chars": 10}}}
    report = run_recipe(build_recipe(recipe, "test", "."))["synthesize"]
    assert accounted(report) and report["rows_in"] == report["groups"]
    assert report["problems_grouped"] + sum(report["problems_ungrouped"].values()) == 24
    kept = rows(tmp_path / "run/synthesize/data")
    assert kept, "structured output should give at least one passage"
    for passage in kept:
        problems = passage["problems"]
        assert passage["text"].count("Solution: ") == len(problems) and "\n\nEnlightenment: " in passage["text"]
        assert problems[0]["problem"][:40] in passage["text"]  # the problems are quoted, not rewritten
    groups = kept + rows(tmp_path / "run/synthesize/dropped")
    assert all(2 <= len(g["problems"]) <= 3 for g in groups)
    # Problems of a task not yet in the group come first: most groups mix GSM8K and MMLU.
    assert sum(len({p["task"] for p in g["problems"]}) == 2 for g in groups) >= len(groups) * 0.6
    ids = [i for g in groups for i in g["problem_ids"]]
    assert len(ids) == len(set(ids))  # a problem is in one group only


def test_trait_entity_grouping_keeps_an_entity_together():
    from domainsynth.pipelines.synthesis.trait import TraitConfig

    cfg = TraitConfig(examples=[MATH], grouping="entity", entity_field="company", group_size=3)
    problems = [trait.Problem(id=str(i), problem=f"p{i}", answer=None, task="t1" if i % 2 else "t2",
                              entity=["ACME", "acme ", "Globex", None][i % 4], file="f", line=i) for i in range(12)]
    grouping = trait.group_by_entity(problems, cfg)
    for group in grouping.groups:
        assert len({problems[i].entity.strip().lower() for i in group}) == 1
        assert 2 <= len(group) <= 3
    assert grouping.ungrouped == {"no_entity": 3}
    assert sum(len(g) for g in grouping.groups) == 9


def test_domino_samples_from_the_soft_prompt_and_answers_them(ray_local, tmp_path, tiny_llama, soft_prompt_file):
    recipe = {"run_dir": str(tmp_path / "run"),
              "synthesize": {"method": "domino", "model": tiny_llama, "batch_size": 4,
                             "sampling": {"max_tokens": 24, "seed": 3, "stop": ["e"]},
                             "domino": {"soft_prompt": soft_prompt_file, "num_samples": 12, "min_input_chars": 2,
                                        "respond": True,
                                        "response_sampling": {"max_tokens": 12, "stop": ["e"], "temperature": 1.0,
                                                              "seed": 1}}}}
    report = run_recipe(build_recipe(recipe, "test", "."))["synthesize"]
    assert report["rows_in"] == 12 and accounted(report)
    kept, dropped = rows(tmp_path / "run/synthesize/data"), rows(tmp_path / "run/synthesize/dropped")
    assert kept and all(r["output"] is not None and r["text"] == f"{r['input']}\n\n{r['output']}" for r in kept)
    assert {r["drop_reason"] for r in dropped} <= {"too_short", "truncated", "empty_response", "response_truncated"}
    inputs = [r["input"] for r in kept + dropped if r["input"]]
    assert len(set(inputs)) > len(inputs) // 2  # batches are seeded apart: they do not repeat each other


def test_judge_rates_every_row_and_keeps_those_at_the_threshold(ray_local, tmp_path, tiny_llama):
    samples = write_jsonl(tmp_path / "samples.jsonl", [
        {"id": f"s{i}", "text": t} for i, t in enumerate(json.loads(line)["Instruction"]
                                                          for line in open(BIOQA).readlines()[:10])])
    with open(samples, "a") as f:
        f.write("{not json\n")
    judged = {}
    for threshold in ("very poor", "excellent"):
        out = tmp_path / threshold.replace(" ", "-")
        assert main(["judge", "--input", str(samples), "--model", tiny_llama, "--out", str(out), "--threshold",
                     threshold]) == 0
        report = json.loads((out / "judge/report.json").read_text())
        assert accounted(report) and report["rows_in"] == 11 and report["rows_quarantined"] == 1
        kept, dropped = rows(out / "judge/data"), rows(out / "judge/dropped")
        judged[threshold] = {r["id"]: r for r in kept + dropped}
        assert len(judged[threshold]) == 10 and all(r["judge_rating"] in RATINGS + (None,)
                                                    for r in judged[threshold].values())
        # The judge must actually rate: a judge whose every answer is unreadable (all rows "unrated") fails here.
        rated = [r for r in judged[threshold].values() if r["judge_rating"] in RATINGS]
        assert rated, f"the judge rated none of the 10 samples: {report['ratings']}"
        # Structured output holds the answer to the enum: most answers parse (all 10 do, measured).
        assert len(rated) > 5, report["ratings"]
        assert report["rows_filtered"]["unrated"] == 10 - len(rated) < 10
        distribution = {k: n for k, n in report["ratings"].items() if k in RATINGS}
        assert sum(distribution.values()) == len(rated) > 0
        assert distribution == {k: sum(r["judge_rating"] == k for r in rated) for k in RATINGS}
        assert report["ratings"].get("unrated", 0) == 10 - len(rated)
        for r in rated:
            assert r["judge_score"] == RATINGS.index(r["judge_rating"]) + 1
        for r in dropped:
            expected = "unrated" if r["judge_rating"] is None else "below_threshold"
            assert r["drop_reason"] == expected and r["drop_detail"]
        for r in kept:
            assert RATINGS.index(r["judge_rating"]) >= RATINGS.index(threshold)
        # Rated rows at or above the threshold are exactly what is kept.
        assert report["rows_out"] == len(kept) == sum(RATINGS.index(r["judge_rating"]) >= RATINGS.index(threshold)
                                                      for r in rated)
    # "very poor" is the lowest level: every rated sample is kept.
    assert len(rows(tmp_path / "very-poor/judge/data")) == \
        sum(r["judge_rating"] in RATINGS for r in judged["very poor"].values()) > 0
    # Temperature 0: the same samples get the same ratings, whatever the threshold.
    assert {k: r["judge_rating"] for k, r in judged["very poor"].items()} == \
        {k: r["judge_rating"] for k, r in judged["excellent"].items()}
    excellent = sum(r["judge_rating"] == "excellent" for r in judged["excellent"].values())
    assert len(rows(tmp_path / "excellent/judge/data")) == excellent


def test_bad_template_and_few_shots_fail_before_any_generation(tmp_path, tiny_llama_4k, documents, capsys):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{{ document }} {{ examples }} {{ fewshots }}")
    code = main(["synthesize", "--method", "craft", "--model", tiny_llama_4k, "--out", str(tmp_path / "run"),
                 "--documents", documents, "--few-shots", BIOQA, "--template", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and "synthesize.template" in err and "fewshots" in err and "available:" in err
    broken = tmp_path / "broken.jinja"
    broken.write_text("{{ document }} {% for e in examples %}")
    assert main(["synthesize", "--method", "craft", "--model", tiny_llama_4k, "--out", str(tmp_path / "run"),
                 "--documents", documents, "--few-shots", BIOQA, "--template", str(broken)]) == 2
    assert "not a valid Jinja2 template" in capsys.readouterr().err
    # CommonsenseQA's few-shots have two options: the wrong shape for a four-option task.
    assert main(["synthesize", "--method", "craft", "--model", tiny_llama_4k, "--out", str(tmp_path / "run"),
                 "--documents", documents, "--few-shots", CSQA]) == 2
    err = capsys.readouterr().err
    assert "craft_csqa_fewshot.jsonl, line 1" in err and "A., B., C., D." in err
    missing = write_jsonl(tmp_path / "shots.jsonl", [{"Text": "a document", "Instruction": "a question"}])
    assert main(["synthesize", "--method", "craft", "--model", tiny_llama_4k, "--out", str(tmp_path / "run"),
                 "--documents", documents, "--few-shots", str(missing)]) == 2
    assert "'Output'" in capsys.readouterr().err
    judge_template = tmp_path / "judge.jinja"
    judge_template.write_text("Rate this: {{ row.text }}")  # never shows the sample itself
    assert main(["judge", "--input", documents, "--model", tiny_llama_4k, "--out", str(tmp_path / "run"),
                 "--template", str(judge_template)]) == 2
    assert "never uses sample" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing started
