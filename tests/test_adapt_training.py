"""pretrain, finetune and preference on a real local Ray (2 CPUs) with 2 Ray Train workers and the tiny model: each
stage runs and its loss falls, its outputs load with transformers / PEFT and generate through our engine, the replay
share holds to the block in what the workers read, a killed pretraining run resumes and ends at its planned step,
and DPO pairs built from hand-made ratings are the right ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.dataset as pads
import pytest

from domainsynth.actors.engines import SamplingParams, TransformersEngine
from domainsynth.pipelines.corpus import ORDER
from domainsynth.pipelines.recipe import RecipeError, build_recipe
from domainsynth.pipelines.rundir import StageError
from domainsynth.pipelines.runner import run_recipe
from domainsynth.pipelines.training.packing import replay_counts
from domainsynth.pipelines.training.preference import build_pairs

from conftest import DATA, local_progress, read_jsonl_gz, run_killing_rank0, write_jsonl

BLOCK = 64


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, str]:
    """Domain documents (abstracts, and one line that is not JSON), task passages, general web text."""
    folder = tmp_path_factory.mktemp("pretrain-data")
    medical = read_jsonl_gz(DATA / "medical_abstracts.jsonl.gz")
    general = read_jsonl_gz(DATA / "general_pool.jsonl.gz")
    write_jsonl(folder / "domain.jsonl", [{"id": r["id"], "text": r["text"]} for r in medical[:120]])
    with open(folder / "domain.jsonl", "a", encoding="utf-8") as f:
        f.write("{not json\n")
    write_jsonl(folder / "tasks.jsonl", [{"text": "Problem: " + r["text"][:300]} for r in medical[200:260]])
    write_jsonl(folder / "general.jsonl", [{"text": r["text"]} for r in general[:300]])
    return {k: str(folder / f"{k}.jsonl") for k in ("domain", "tasks", "general")}


def pretrain_section(texts: dict, model: str, **training) -> dict:
    return {"model": model, "block_size": BLOCK, "general": texts["general"],
            "stages": [{"name": "knowledge", "data": texts["domain"]}, {"name": "tasks", "data": texts["tasks"]}],
            "eval": {"holdout_blocks": 8},
            "training": {"workers": 2, "max_steps": 16, "checkpoint_every": 8, "eval_every": 8, "log_every": 2,
                         "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, **training}}


def sources_read(run_dir, stage: str) -> dict[str, int]:
    """Blocks of each source in the Parquet files the workers read for ``stage``."""
    [packed] = (run_dir / "pretrain" / "packed").iterdir()
    table = pads.dataset(str(packed / stage), format="parquet").to_table(columns=["source"])
    sources = table.column("source").to_pylist()
    return {s: sources.count(s) for s in set(sources)}


def logged_steps(metrics_file) -> list[int]:
    return [h["step"] for h in map(json.loads, open(metrics_file)) if "loss" in h]


def losses(metrics_file) -> list[float]:
    return [h["loss"] for h in map(json.loads, open(metrics_file)) if "loss" in h]


def test_pretrain_two_stages_with_replay(ray_local, tiny_llama, texts, tmp_path):
    recipe = build_recipe({"run_dir": str(tmp_path / "run"), "pretrain": pretrain_section(texts, tiny_llama)},
                          "test", "/")
    report = run_recipe(recipe, echo=lambda _: None)["pretrain"]
    run = tmp_path / "run"

    # Replay by exact share: stage 1 has general text at 10%; stage 2 general and stage-1 data at 10% each.
    for name, shares in (("knowledge", {"replay:general": 0.1}),
                         ("tasks", {"replay:general": 0.1, "replay:knowledge": 0.1})):
        read = sources_read(run, name)
        total = sum(read.values())
        assert total == report["mixes"][name]["blocks"]
        for source, share in shares.items():
            assert abs(read[source] / total - share) <= 0.01 * share + 0.5 / total, (name, read)
        assert read[name] == report["mixes"][name]["blocks_by_source"][name]

    # Each stage's loss falls; held-out domain perplexity falls over both stages (boundary in the report).
    for name in ("knowledge", "tasks"):
        values = losses(run / "pretrain" / name / "metrics.jsonl")
        assert sum(values[-3:]) / 3 < sum(values[:3]) / 3, (name, values)
        assert logged_steps(run / "pretrain" / name / "metrics.jsonl") == list(range(2, 17, 2))
    domain = [p[1] for p in report["perplexity"]["domain"]]
    assert domain[-1] < domain[0] and len(domain) == 6  # each stage: before its first step, at 8 and at 16
    assert [p[0] for p in report["perplexity"]["general"]] == [0, 8, 16, 16, 24, 32]
    assert (run / "pretrain" / "perplexity.png").stat().st_size > 5000
    assert "tasks starts" not in (run / "pretrain" / "report.md").read_text()  # the label is drawn, not written

    # The malformed line is quarantined with its file and line; accounting adds up.
    [bad] = [json.loads(line) for line in open(run / "pretrain" / "quarantine.jsonl")]
    assert bad["file"].endswith("domain.jsonl") and bad["line"] == 121 and "JSON" in bad["reason"]
    assert report["rows_in"] == 120 + 60 + 300 + 1 and report["rows_quarantined"] == 1

    # Stage 2 started from stage 1's model; its model folder loads and generates through our engine.
    model = run / "pretrain" / "tasks" / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(model))
    assert "training_args.bin" not in os.listdir(model)
    engine = TransformersEngine(str(model))
    [[out]] = engine.generate(["The patient was"], SamplingParams(max_tokens=5, temperature=0.0))
    assert out.completion_tokens > 0


def test_pretrain_killed_worker_resumes_to_the_planned_step(ray_local, tiny_llama, texts, tmp_path):
    """SIGKILL rank 0 at step 12 of 32 (checkpoints every 8): Ray Train restarts the workers, they resume from the
    latest whole checkpoint, and the stage ends at step 32 with each step logged once."""
    section = pretrain_section(texts, tiny_llama, max_steps=32, checkpoint_every=8, eval_every=16)
    section["stages"] = section["stages"][:1]
    recipe = build_recipe({"run_dir": str(tmp_path / "run"), "pretrain": section}, "test", "/")
    read_progress = local_progress(tmp_path / "run" / "pretrain" / "progress.json")
    outcome, said = run_killing_rank0(recipe, read_progress, at_step=12)
    assert outcome["pretrain"]["steps"] == {"knowledge": 32}
    assert logged_steps(tmp_path / "run" / "pretrain" / "knowledge" / "metrics.jsonl") == list(range(2, 33, 2))
    resumed = [line for line in said if "resumed from step" in line]
    assert resumed and int(resumed[0].split("resumed from step ")[1].split()[0]) in (8,), said[-5:]


def test_replay_counts_are_exact_to_the_block():
    assert replay_counts([0.1], 900) == [100]
    assert replay_counts([0.1, 0.1], 107) == [14, 13]  # 26.75 blocks in all, rounded once, split by remainder
    assert replay_counts([], 50) == []


@pytest.fixture(scope="module")
def sft_samples(tmp_path_factory) -> str:
    """CRAFT's 32 biology few-shots as instruction/output samples, one without an output, one line not JSON."""
    rows = [json.loads(line) for line in open(DATA / "craft_bioqa_fewshot.jsonl")]
    path = tmp_path_factory.mktemp("sft") / "samples.jsonl"
    write_jsonl(path, [{"id": f"s{i}", "instruction": r["Instruction"], "output": r["Output"]}
                       for i, r in enumerate(rows)] + [{"id": "no-output", "instruction": "Why?"}])
    with open(path, "a", encoding="utf-8") as f:
        f.write("not json\n")
    return str(path)


def test_finetune_lora_sft(ray_local, tiny_llama, sft_samples, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    section = {"data": sft_samples, "model": tiny_llama, "preset": "craft", "max_length": 256, "merge": True,
               "training": {"workers": 2, "max_steps": 12, "checkpoint_every": 6, "eval_every": 6, "log_every": 1,
                            "batch_size": 2, "lr": 2e-3}}
    report = run_recipe(build_recipe({"run_dir": str(tmp_path / "run"), "finetune": section}, "test", "/"),
                        echo=lambda _: None)["finetune"]
    stage = tmp_path / "run" / "finetune"
    assert report["rows_in"] == 34 and report["rows_out"] == 32 and report["rows_quarantined"] == 2
    assert report["samples"]["train"] + report["samples"]["validation"] == 32 and report["samples"]["validation"]
    reasons = [json.loads(line)["reason"] for line in open(stage / "quarantine.jsonl")]
    assert any("'output' missing" in r for r in reasons) and any("JSON" in r for r in reasons)
    assert report["lora"]["r"] == 64 and report["lora"]["alpha"] == 64  # the craft preset
    values = losses(stage / "metrics.jsonl")
    assert sum(values[-4:]) / 4 < sum(values[:4]) / 4, values
    assert report["validation_loss"] is not None

    adapter_config = json.loads((stage / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 64
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(stage / "adapter"))
    assert any("lora_A" in name for name, _ in with_adapter.named_parameters())
    [[out]] = TransformersEngine(str(stage / "model")).generate(["What is a cell?"],
                                                               SamplingParams(max_tokens=4, temperature=0.0))
    assert out.completion_tokens > 0


def test_pairs_from_hand_made_ratings():
    rows = [  # prompt, response, score, file order
        {"p": "A", "r": "a-good", "s": 5, ORDER: 0}, {"p": "A", "r": "a-mid", "s": 3, ORDER: 1},
        {"p": "A", "r": "a-bad", "s": 1, ORDER: 2},
        {"p": "B", "r": "b-only", "s": 4, ORDER: 3},                          # one response: no pair
        {"p": "C", "r": "c-1", "s": 3, ORDER: 4}, {"p": "C", "r": "c-2", "s": 3, ORDER: 5},  # a tie: no pair
        {"p": "D", "r": "d-unrated", "s": None, ORDER: 6}, {"p": "D", "r": "d-4", "s": 4, ORDER: 7},
        {"p": "D", "r": "d-2", "s": 2, ORDER: 8},
    ]
    pairs, filtered, used = build_pairs(rows, "p", "r", "s", "best_vs_worst", 1.0)
    assert [(p["prompt"], p["chosen"], p["rejected"], p["margin"]) for p in pairs] == [
        ("A", "a-good", "a-bad", 4.0), ("D", "d-4", "d-2", 2.0)]
    assert filtered == {"unrated": 1, "no_contrast": 1 + 1 + 2} and used == 4
    assert used + sum(filtered.values()) == len(rows)

    pairs, filtered, used = build_pairs(rows, "p", "r", "s", "all", 2.0)
    assert sorted((p["chosen"], p["rejected"]) for p in pairs) == [("a-good", "a-bad"), ("a-good", "a-mid"),
                                                                   ("a-mid", "a-bad"), ("d-4", "d-2")]
    pairs, _, _ = build_pairs(rows, "p", "r", "s", "all", 3.0)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a-good", "a-bad")]


def test_preference_dpo_from_ratings(ray_local, tiny_llama, tmp_path):
    """Three rated responses for each of 16 prompts: a pair per prompt (best over worst), DPO's loss falls."""
    ratings = [{"id": f"p{p}-{k}", "prompt": f"Name organelle number {p} of a cell.", "completion": text,
                "judge_score": score}
               for p in range(16) for k, (text, score) in enumerate(
                   [("The mitochondrion makes ATP.", 5), ("A ribosome, maybe.", 3), ("Trains are fast.", 1)])]
    write_jsonl(tmp_path / "ratings.jsonl", ratings)
    section = {"model": tiny_llama, "ratings": str(tmp_path / "ratings.jsonl"), "max_length": 64,
               "training": {"workers": 2, "max_steps": 10, "checkpoint_every": 5, "eval_every": 5, "log_every": 1,
                            "batch_size": 2, "lr": 5e-3}}
    report = run_recipe(build_recipe({"run_dir": str(tmp_path / "run"), "preference": section}, "test", "/"),
                        echo=lambda _: None)["preference"]
    stage = tmp_path / "run" / "preference"
    assert report["pairs"]["train"] + report["pairs"]["validation"] == 16
    assert report["rows_out"] == 32 and report["rows_filtered"] == {"unrated": 0, "no_contrast": 16}
    pairs = pads.dataset(str(stage / "pairs"), format="parquet").to_table().to_pylist()
    assert {p["chosen"][0]["content"] for p in pairs} == {"The mitochondrion makes ATP."}
    assert {p["rejected"][0]["content"] for p in pairs} == {"Trains are fast."}
    values = losses(stage / "metrics.jsonl")
    assert sum(values[-3:]) / 3 < sum(values[:3]) / 3, values
    assert json.loads((stage / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_bad_training_settings_fail_before_work(ray_local, tiny_llama, texts, tmp_path):
    with pytest.raises(RecipeError, match="replay"):
        build_recipe({"run_dir": str(tmp_path), "pretrain": {"model": tiny_llama, "stages": [
            {"name": "a", "data": texts["domain"], "replay": [{"share": 0.5, "stage": "later"}]}]}}, "test", "/")
    with pytest.raises(RecipeError, match="tasks"):  # TRAIT's default stage 2 needs a synthesize section
        build_recipe({"run_dir": str(tmp_path), "pretrain": {"model": tiny_llama}}, "test", "/")
    with pytest.raises(RecipeError, match="pairs"):
        build_recipe({"run_dir": str(tmp_path), "preference": {"model": tiny_llama, "pairs": "a", "ratings": "b"}},
                     "test", "/")
    recipe = build_recipe({"run_dir": str(tmp_path / "run"), "pretrain": pretrain_section(texts, tiny_llama,
                                                                                          workers=3)}, "test", "/")
    with pytest.raises(StageError, match="pretrain.workers: 3 workers"):
        run_recipe(recipe, echo=lambda _: None)
    cli = subprocess.run([sys.executable, "-m", "domainsynth.cluster.cli", "pretrain", "--data", texts["domain"],
                          "--model", tiny_llama, "--out", str(tmp_path / "cli"), "--replay-ratio", "0.2"],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and "--replay" in cli.stderr


def test_recipe_chain_defaults(tiny_llama, tmp_path):
    """In one recipe each training stage reads what the stage before it wrote: TRAIT's knowledge stage the in-domain
    files and select's output, its tasks stage the judged trait passages, replay from select's corpus and stage 1;
    finetune the judge's samples; preference the judge's rated rows, kept and dropped."""
    from domainsynth.pipelines.training.finetune import upstream_samples
    from domainsynth.pipelines.training.preference import ratings_inputs
    from domainsynth.pipelines.training.pretrain import stage_data, stage_replay

    (tmp_path / "in.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "corpus.jsonl").write_text('{"text": "y"}\n')
    (tmp_path / "problems.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    run = str(tmp_path / "run")
    recipe = build_recipe({
        "run_dir": run, "select": {"in_domain": str(tmp_path / "in.jsonl"), "corpus": str(tmp_path / "corpus.jsonl")},
        "synthesize": {"method": "trait", "model": tiny_llama, "trait": {"examples": str(tmp_path / "problems.jsonl")}},
        "judge": {"model": tiny_llama}, "pretrain": {"model": tiny_llama},
        "finetune": {"model": tiny_llama}, "preference": {"model": tiny_llama}}, "test", "/")
    knowledge, tasks = recipe.pretrain.stages
    assert [s.files for s in stage_data(knowledge, recipe)] == [[str(tmp_path / "in.jsonl")], [f"{run}/select/data"]]
    assert [s.files for s in stage_data(tasks, recipe)] == [[f"{run}/judge/data"]]
    replay = stage_replay(recipe.pretrain, 1, recipe)
    assert [(r.files, r.stage, r.share) for r in replay] == [([str(tmp_path / "corpus.jsonl")], None, 0.1),
                                                              (None, "knowledge", 0.1)]
    assert upstream_samples(recipe) == f"{run}/judge/data"
    assert ratings_inputs(recipe.preference, recipe) == [f"{run}/judge/data", f"{run}/judge/dropped"]
