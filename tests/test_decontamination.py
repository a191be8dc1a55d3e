"""The decontamination report of evaluate on a real local Ray, real lm-eval task building (the bundled PubMedQA and
MMLU medical genetics, a small task YAML of short questions) and real files: training data in which three PubMedQA
items are copied verbatim, one paraphrased, MMLU's shared choice list planted, a short question inside a finetune
conversation, malformed rows. Each model must be flagged for exactly what it saw, cumulatively along the recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from domainsynth.actors import minhash
from domainsynth.pipelines.evaluation.decontamination import (EvalItem, TrainingSource, contamination_json,
                                                             eval_items, markdown, overlap_report, training_sources)
from domainsynth.pipelines.evaluation.tasks import TASKS_DIR, builtin_config, perplexity_config, user_task_config
from domainsynth.pipelines.recipe import build_recipe
from domainsynth.pipelines.training.finetune import CONVERSATION_SCHEMA
from domainsynth.pipelines.training.preference import PAIR_SCHEMA

from conftest import write_jsonl

PUBMEDQA = [json.loads(line) for line in (TASKS_DIR / "pubmedqa.test.jsonl").read_text().splitlines() if line]
COPIED, PARAPHRASED, IN_PAIRS = (3, 11, 27), 8, 45
ORGANS = [{"question": "Which organ produces insulin in humans?", "answer": "pancreas"},
          {"question": "Which organ filters blood to make urine?", "answer": "kidney"},
          {"question": "Which organ pumps blood through the body?", "answer": "heart"}]
UNRELATED = ["The river flooded the lower town twice this spring, and the council has voted to raise the levee.",
             "Bake the bread for forty minutes, then let it cool on a rack before slicing it thickly.",
             "Our chess club meets on Tuesdays; beginners are welcome and boards are provided."]


def paraphrase(text: str) -> str:
    """Every fourth word changed: no run of 13 (or 5) of the item's words survives."""
    return " ".join("indeed" if i % 4 == 3 else w for i, w in enumerate(text.split()))


def item_text(k: int) -> str:
    return PUBMEDQA[k]["context"] + "\n" + PUBMEDQA[k]["question"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A recipe whose stages have 'run': its input files and the outputs finetune and preference leave behind,
    and the task YAMLs evaluate writes."""
    root = tmp_path_factory.mktemp("decontamination")
    run_dir = root / "run"
    knowledge = root / "knowledge.jsonl"
    write_jsonl(knowledge, [{"id": f"k{k}", "text": f"From a review of the literature. {item_text(k)}"}
                            for k in COPIED] + [{"id": "p", "text": paraphrase(item_text(PARAPHRASED))}]
                + [{"id": f"u{i}", "text": t} for i, t in enumerate(UNRELATED)])
    with open(knowledge, "a", encoding="utf-8") as f:  # two malformed rows: skipped and counted
        f.write('{"id": "broken", "text": "unterminated\n{"id": "no-text", "body": "a row without its text field"}\n')
    tasks_data = write_jsonl(root / "tasks.jsonl", [
        {"text": "Which inheritance pattern fits? A. autosomal dominant. B. autosomal recessive. C. X-linked dominant. "
                 "D. X-linked recessive. Answer: A"},  # MMLU's choice list shared by several items: not one item
        {"text": paraphrase(item_text(60))}])
    general = write_jsonl(root / "general.jsonl", [{"text": t} for t in UNRELATED])
    references = write_jsonl(root / "references.jsonl", [{"text": t} for t in reversed(UNRELATED)])
    recipe = build_recipe({"run_dir": str(run_dir), "pretrain": {"model": "smollm2", "general": [str(general)],
                                                                 "stages": [
        {"name": "knowledge", "data": [str(knowledge)], "replay": []}, {"name": "tasks", "data": [str(tasks_data)]}]},
        "finetune": {"data": str(root / "sft.jsonl"), "merge": True},
        "preference": {"pairs": str(root / "pairs.jsonl")},
        "softprompt": {"model": "smollm2", "references": [str(references)]},
        "evaluate": {"tasks": ["pubmedqa", "mmlu_medical_genetics"]}}, "test", "/")

    def turns(*pairs):
        return [{"role": r, "content": c} for r, c in pairs]

    samples = run_dir / "finetune" / "samples" / "train"
    samples.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([
        {"id": "s1", "_order": 1, "prompt": turns(("user", "Quick quiz: which organ produces insulin in humans? One "
                                                           "word, please.")),
         "completion": turns(("assistant", "The pancreas."))},
        {"id": "s2", "_order": 2, "prompt": turns(("user", "Name an organ that filters blood.")),
         "completion": turns(("assistant", "The kidney does."))}], schema=CONVERSATION_SCHEMA),
        samples / "part.parquet")
    pairs = run_dir / "preference" / "pairs" / "train"
    pairs.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([
        {"prompt": turns(("user", "Summarise a study on asthma.")), "chosen": turns(("assistant", item_text(IN_PAIRS))),
         "rejected": turns(("assistant", "I cannot.")), "margin": 2.0}], schema=PAIR_SCHEMA), pairs / "pairs.parquet")

    tasks = run_dir / "evaluate" / "tasks"
    tasks.mkdir(parents=True)
    write_jsonl(root / "organs" / "organs.jsonl", ORGANS)
    (root / "organs" / "organs.yaml").write_text(yaml.safe_dump({
        "task": "organs", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "organs.jsonl"}},
        "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{question}}",
        "doc_to_target": "{{answer}}", "generation_kwargs": {"until": ["\n"]}}))
    for config in (builtin_config("pubmedqa"), builtin_config("mmlu_medical_genetics"),
                   user_task_config(str(root / "organs" / "organs.yaml"))):  # as evaluate writes them
        (tasks / f"{config['task']}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return {"root": root, "recipe": recipe, "tasks": tasks, "knowledge": knowledge}


@pytest.fixture(scope="module")
def items(run):
    return eval_items(str(run["tasks"]), limit=None)


def flagged(rows, model, task) -> tuple[list[int], dict]:
    [row] = [r for r in rows if r["model"] == model and r["task"] == task]
    return [e["item"] for e in row["examples"]], row


def test_eval_items_as_lm_eval_renders_them(run, items):
    assert [len(items[t]) for t in ("mmlu_medical_genetics", "organs", "pubmedqa")] == [100, 3, 500]
    first = items["pubmedqa"][0]
    assert first.text == f"Abstract: {PUBMEDQA[0]['context']}\nQuestion: {PUBMEDQA[0]['question']}\nAnswer: yes"
    assert PUBMEDQA[0]["question"] in first.fields and first.prompt.endswith("Answer:")
    assert items["organs"][1].text == "Which organ filters blood to make urine? kidney"
    assert items["mmlu_medical_genetics"][0].text.endswith("\nAnswer: B")  # the correct choice's letter
    limited = eval_items([str(run["tasks"] / "pubmedqa.yaml")], limit=10)
    assert list(limited) == ["pubmedqa"] and limited["pubmedqa"] == items["pubmedqa"][:10]
    # perplexity: each document is an item
    docs = write_jsonl(run["root"] / "heldout.jsonl", [{"text": t} for t in UNRELATED])
    rolling = eval_items([perplexity_config("perplexity", [str(docs)], "text")], limit=2)["perplexity"]
    assert [i.text for i in rolling] == UNRELATED[:2]
    # the configs evaluate holds give the same items as the YAMLs it writes
    assert eval_items([builtin_config("mmlu_medical_genetics")], limit=5)["mmlu_medical_genetics"] == \
        items["mmlu_medical_genetics"][:5]


def test_each_model_flagged_for_what_it_saw(ray_local, run, items):
    recipe = run["recipe"]
    labels = ["base", "pretrain/knowledge", "pretrain/tasks", "finetune", "preference", "softprompt"]
    sources = {label: training_sources(recipe, label) for label in labels}
    assert sources["base"] == [] and training_sources(recipe, "no such model") == []
    assert [s.description for s in sources["pretrain/tasks"]] == [
        "pretrain/knowledge data", "pretrain/tasks data",
        "pretrain/tasks replay (10% of its tokens, sampled from all of it)"]
    description, files, fields = sources["finetune"][-1]
    assert (description, fields) == ("finetune samples (train)", ["prompt", "completion"])
    assert files == [str(run["root"] / "run" / "finetune" / "samples" / "train")]
    assert sources["preference"][:-1] == sources["finetune"]
    assert [s.description for s in sources["softprompt"]] == ["softprompt references"]

    rows = overlap_report(items, sources)
    assert len(rows) == len(labels) * 3

    # exactly the three copied PubMedQA items, not the paraphrased one, with where and what
    found, row = flagged(rows, "pretrain/knowledge", "pubmedqa")
    assert found == list(COPIED) and row["overlapping"] == 3 and row["share"] == pytest.approx(3 / 500)
    for example, k in zip(row["examples"], COPIED):
        assert example["file"] == str(run["knowledge"]) and example["line"] == COPIED.index(k) + 1
        assert len(example["shared"].split()) == 13 and example["shared"] in minhash.normalise([item_text(k)])[0]
        assert example["source"] == "pretrain/knowledge data"
    # malformed rows skipped and counted, never a crash
    assert row["training_rows"] == 9 and row["skipped_rows"] == 2
    assert [e["line"] for e in row["skipped_examples"]] == [8, 9]
    assert row["skipped_examples"][0]["reason"].startswith("invalid JSON")
    assert "missing text field" in row["skipped_examples"][1]["reason"]

    # cumulative: the tasks stage's model saw what knowledge saw; finetune and preference what came before
    assert flagged(rows, "pretrain/tasks", "pubmedqa")[0] == list(COPIED)
    assert flagged(rows, "finetune", "pubmedqa")[0] == list(COPIED)
    found, row = flagged(rows, "preference", "pubmedqa")  # the first three examples of four
    assert row["overlapping"] == 4 and found == list(COPIED)
    # the short question inside a finetune conversation, found whole; a three-word run of another is not enough
    for model in ("finetune", "preference"):
        found, row = flagged(rows, model, "organs")
        assert found == [0] and row["examples"][0]["shared"] == "which organ produces insulin in humans"
        assert row["examples"][0]["source"] == "finetune samples (train)"
    for model in ("pretrain/knowledge", "pretrain/tasks", "softprompt"):
        assert flagged(rows, model, "organs")[1]["overlapping"] == 0
    assert flagged(rows, "softprompt", "pubmedqa")[1]["overlapping"] == 0
    # MMLU's choice list, shared by several items, names none of them
    for model in labels[1:]:
        found, row = flagged(rows, model, "mmlu_medical_genetics")
        assert row["overlapping"] == 0 and row["ignored_shared_ngrams"] > 0
    # the base model's training data is not known: not "clean"
    assert all(r["overlapping"] is None and r["share"] is None for r in rows if r["model"] == "base")

    text = markdown(rows)
    assert "| pubmedqa | n/a | 3 / 500 (0.6%) | 3 / 500 (0.6%) | 3 / 500 (0.6%) | 4 / 500 (0.8%) | 0 / 500 (0.0%) |" \
        in text
    assert f"- pubmedqa item {COPIED[0]} (pretrain/knowledge, pretrain/tasks, finetune, preference): " in text
    assert "2 malformed rows skipped" in text and "- base: training data not known" in text
    assert json.loads(json.dumps(contamination_json(rows)))["rows"] == rows


def test_limit_restricts_items_and_unreadable_sources_are_named(ray_local, run):
    items = eval_items([str(run["tasks"] / "pubmedqa.yaml")], limit=10)
    sources = {"seen": [TrainingSource("knowledge", (str(run["knowledge"]),))],
               "ghost": [TrainingSource("nowhere", (str(run["root"] / "missing.jsonl"),))],
               "plain": [TrainingSource("knowledge", (str(run["knowledge"]),))]}
    rows = overlap_report({**items, "texts": [EvalItem(item_text(27)), "a short text of six words"]}, sources)
    found, row = flagged(rows, "seen", "pubmedqa")
    assert found == [3] and row["items"] == 10 and row["share"] == pytest.approx(0.1)  # 11 and 27 are past the limit
    assert flagged(rows, "seen", "texts")[0] == [0] and flagged(rows, "plain", "texts")[0] == [0]
    _, ghost = flagged(rows, "ghost", "pubmedqa")
    assert ghost["overlapping"] is None and "no input files match" in ghost["unread"]["nowhere"]
    assert "not read: nowhere" in markdown(rows)


def test_row_hits_flag_the_rows_qc_drops():
    """The same rule as qc's: on real web texts with MMLU questions and choices planted (long ones as 13-grams,
    short ones whole), the rows with a hit are the rows qc calls contaminated, and qc's item is among each row's."""
    import numpy as np

    from conftest import DATA, read_jsonl_gz
    from domainsynth.pipelines.evaluation.decontamination import row_hits
    from domainsynth.pipelines.synthesis.qc import (DecontaminateConfig, _first_eval_hit, _short_eval_hits,
                                                    load_eval_grams)

    eval_file = Path(__file__).resolve().parent.parent / "examples" / "data" / "eval_bioqa.jsonl"
    grams = load_eval_grams(DecontaminateConfig(eval_files=[str(eval_file)]))
    rows = [json.loads(line) for line in eval_file.read_text().splitlines() if line.strip()]
    web = [r["text"] for r in read_jsonl_gz(DATA / "general_pool.jsonl.gz")[:400]]
    planted = {}
    for k, r in enumerate(rows[:40]):
        piece = r["question"] if k % 2 else max(r["choices"], key=len)
        web[k * 10] = f"{web[k * 10][:300]} {piece} {web[k * 10][-200:]}"
        if len(minhash.normalise([piece])[0].split()) >= 5:  # shorter ones match only a text that is them whole
            planted[k * 10] = web[k * 10]
    word_hashes, offsets = minhash.word_hashes(minhash.normalised_words(web))
    shared = {"eval_hashes": grams.hashes, "eval_items": grams.items, "eval_words": grams.words,
              "short_hashes": grams.short_hashes, "short_items": grams.short_items, "short_first": grams.short_first,
              "short_widths": grams.short_widths}
    qc_item, qc_words = _first_eval_hit(*minhash.window_hashes(word_hashes, offsets, 13, salt=minhash.NGRAM_SALT),
                                        grams.hashes, grams.items, grams.words)
    _short_eval_hits(word_hashes, offsets, shared, qc_item, qc_words)
    row, item, start, width = row_hits(word_hashes, offsets, {
        "hashes": grams.hashes, "items": grams.items, "short_hashes": grams.short_hashes,
        "short_items": grams.short_items, "short_first": grams.short_first, "short_widths": grams.short_widths,
        "ngram": 13})
    assert len(planted) >= 30
    assert set(np.flatnonzero(qc_item >= 0).tolist()) == set(row.tolist()) >= set(planted)
    for r in np.flatnonzero(qc_item >= 0).tolist():
        assert qc_item[r] in item[row == r]
    assert (width[np.isin(row, list(planted))] >= 5).all()
