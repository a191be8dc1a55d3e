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
    """On DeepSpeed ZeRO-2 (the default on CPU workers is DDP; GPUs take DeepSpeed)."""
    recipe = build_recipe({"run_dir": str(tmp_path / "run"),
                           "pretrain": pretrain_section(texts, tiny_llama, strategy="deepspeed",
                                                                      log_every=3)}, "test", "/")
    report = run_recipe(recipe, echo=lambda _: None)["pretrain"]
    run = tmp_path / "run"
    assert report["strategy"] == "deepspeed"

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
        # Every log_every steps, and the last step always.
        assert logged_steps(run / "pretrain" / name / "metrics.jsonl") == [3, 6, 9, 12, 15, 16]
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
    assert outcome["pretrain"]["strategy"] == "ddp"  # auto, on CPU workers
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
    """On DeepSpeed ZeRO-3 (a deepspeed section given: strategy auto takes it), the adapter saved whole."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    section = {"data": sft_samples, "model": tiny_llama, "preset": "craft", "max_length": 256, "merge": True,
               "training": {"workers": 2, "max_steps": 12, "checkpoint_every": 6, "eval_every": 6, "log_every": 1,
                            "batch_size": 2, "lr": 2e-3, "deepspeed": {"zero_stage": 3}}}
    report = run_recipe(build_recipe({"run_dir": str(tmp_path / "run"), "finetune": section}, "test", "/"),
                        echo=lambda _: None)["finetune"]
    stage = tmp_path / "run" / "finetune"
    assert report["rows_in"] == 34 and report["rows_out"] == 32 and report["rows_quarantined"] == 2
    assert report["samples"]["train"] + report["samples"]["validation"] == 32 and report["samples"]["validation"]
    reasons = [json.loads(line)["reason"] for line in open(stage / "quarantine.jsonl")]
    assert any("'output' missing" in r for r in reasons) and any("JSON" in r for r in reasons)
    assert report["lora"]["r"] == 64 and report["lora"]["alpha"] == 64  # the craft preset
    assert report["strategy"] == "deepspeed"
    values = losses(stage / "metrics.jsonl")
    assert sum(values[-4:]) / 4 < sum(values[:4]) / 4, values
    assert report["validation_loss"] is not None

    adapter_config = json.loads((stage / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 64
    from safetensors.torch import load_file

    saved = load_file(str(stage / "adapter" / "adapter_model.safetensors"))  # whole, not one rank's ZeRO-3 partition
    assert saved and all(t.shape[0] == 64 for name, t in saved.items() if "lora_A" in name)
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(stage / "adapter"))
    assert any("lora_A" in name for name, _ in with_adapter.named_parameters())
    [[out]] = TransformersEngine(str(stage / "model")).generate(["What is a cell?"],
                                                               SamplingParams(max_tokens=4, temperature=0.0))
    assert out.completion_tokens > 0


def test_finetune_reads_conversations(ray_local, tmp_path):
    """A file of chat conversations (a messages list ending with the assistant's turn) is read as such without being
    told: the turns before the last are the prompt, the last is the completion learnt; a conversation that does not
    end with an answer, or whose turns are not turns, is quarantined with its line and why."""
    from domainsynth.pipelines.rundir import StageDir
    from domainsynth.pipelines.training.finetune import FinetuneConfig, write_samples

    conversations = [
        {"id": "one", "messages": [{"role": "user", "content": "What does the heart pump?"},
                                   {"role": "assistant", "content": "Blood."}]},
        {"id": "two", "messages": [{"role": "system", "content": "Answer briefly."},
                                   {"role": "user", "content": "Name a lung disease."},
                                   {"role": "assistant", "content": "Asthma."},
                                   {"role": "user", "content": "Another?"},
                                   {"role": "assistant", "content": "Emphysema."}]},
        {"id": "unanswered", "messages": [{"role": "user", "content": "Hello?"}]},
        {"id": "not-turns", "messages": ["user: hi", "assistant: hello"]},
        {"id": "no-messages", "instruction": "Why?", "output": "Because."},
    ]
    write_jsonl(tmp_path / "chats.jsonl", conversations)
    cfg = FinetuneConfig(model="unused", system_prompt="You are a physician.", validation_fraction=0.0)
    stage = StageDir(str(tmp_path / "finetune"))
    counts, quarantined, kind = write_samples(cfg, [str(tmp_path / "chats.jsonl")], "instruction", stage)

    assert kind == "messages" and counts == {"train": 2, "validation": 0}
    assert sorted((q["line"], q["reason"].split(":")[0]) for q in quarantined) == [
        (3, "messages"), (4, "messages[0]"), (5, "missing messages field 'messages'")]
    assert "assistant" in quarantined[0]["reason"]
    rows = {r["id"]: r for r in pads.dataset(str(tmp_path / "finetune" / "samples" / "train"),
                                             format="parquet").to_table().to_pylist()}
    assert rows["one"]["prompt"] == [{"role": "system", "content": "You are a physician."},
                                     {"role": "user", "content": "What does the heart pump?"}]
    assert rows["one"]["completion"] == [{"role": "assistant", "content": "Blood."}]
    # The conversation's own system turn stays (system_prompt is not added twice); the earlier answer is context.
    assert [t["role"] for t in rows["two"]["prompt"]] == ["system", "user", "assistant", "user"]
    assert rows["two"]["prompt"][0]["content"] == "Answer briefly."
    assert rows["two"]["completion"] == [{"role": "assistant", "content": "Emphysema."}]


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


QUESTIONS = ["What does the heart pump around the body?", "Which organ filters blood to make urine?",
             "What do red blood cells carry?", "Name the largest bone in the human body.",
             "What is the function of insulin?", "Which vitamin does sunlight help the skin make?"]


def test_preference_samples_and_rates_answers(ray_local, tiny_llama, tmp_path):
    """preference.sample: four answers per prompt sampled by SmolLM2 and rated by it against the prompt (a judge
    needs real text to tell answers apart; a random tiny model rates everything alike); every pair's chosen answer is
    its prompt's best-rated and the rejected its worst; DPO trains the tiny model on them, and the adapter generates
    through our engine. A rerun with the same settings reuses the rated answers."""
    write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"q{i}", "instruction": q} for i, q in enumerate(QUESTIONS)]
                + [{"id": "blank", "instruction": " "}])
    section = {"model": tiny_llama, "max_length": 128,
               "sample": {"prompts": str(tmp_path / "prompts.jsonl"), "responses": 4, "model": "smollm2",
                          "sampling": {"temperature": 1.0, "top_p": 0.95, "max_tokens": 40, "seed": 7}},
               "training": {"workers": 2, "max_steps": 4, "checkpoint_every": 4, "eval_every": 4, "log_every": 1,
                            "batch_size": 1, "lr": 5e-3}}
    recipe = build_recipe({"run_dir": str(tmp_path / "run"), "preference": section}, "test", "/")
    report = run_recipe(recipe, echo=lambda _: None)["preference"]
    stage = tmp_path / "run" / "preference"

    [sampled] = (stage / "sampled").iterdir()
    rated = pads.dataset(str(sampled / "rated"), format="parquet").to_table().to_pylist()
    assert {r["id"] for r in rated} == {f"q{i}#{c}" for i in range(len(QUESTIONS)) for c in range(4)}
    assert all(r["judge_score"] in (1, 2, 3, 4, 5) for r in rated) and all(r["response"] for r in rated)
    # Accounting in answers: used in pairs + filtered (ties) = all rated; the blank prompt is quarantined.
    assert report["rows_out"] + sum(report["rows_filtered"].values()) == len(rated)
    assert report["rows_quarantined"] == 1
    scores: dict[str, list] = {}
    for r in rated:
        scores.setdefault(r["instruction"], []).append((r["judge_score"], r["response"]))
    pairs = pads.dataset(str(stage / "pairs"), format="parquet").to_table().to_pylist()
    assert pairs and len(pairs) == report["pairs"]["train"] + report["pairs"]["validation"]
    for pair in pairs:
        answers = scores[pair["prompt"][-1]["content"]]
        best, worst = max(s for s, _ in answers), min(s for s, _ in answers)
        assert best > worst
        assert (best, pair["chosen"][0]["content"]) in answers and (worst, pair["rejected"][0]["content"]) in answers
    assert report["sampled"]["responses_per_prompt"] == 4 and report["sampled"]["judge"] == "smollm2"
    values = losses(stage / "metrics.jsonl")
    assert len(values) == 4 and all(v == v for v in values)  # every step logged, no NaN

    adapter = stage / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    [[out]] = TransformersEngine(str(adapter)).generate(["Name an organelle."],
                                                        SamplingParams(max_tokens=4, temperature=0.0))
    assert out.completion_tokens > 0

    # As if interrupted after sampling (no completion marker): the rerun samples and rates nothing again.
    (stage / "_COMPLETE.json").unlink()
    said = []
    again = run_recipe(recipe, echo=said.append)["preference"]
    assert any("rated answers of an earlier attempt reused" in line for line in said), said
    assert again["pairs"] == report["pairs"]


def test_bad_training_settings_fail_before_work(ray_local, tiny_llama, texts, tmp_path):
    with pytest.raises(RecipeError, match="replay"):
        build_recipe({"run_dir": str(tmp_path), "pretrain": {"model": tiny_llama, "stages": [
            {"name": "a", "data": texts["domain"], "replay": [{"share": 0.5, "stage": "later"}]}]}}, "test", "/")
    with pytest.raises(RecipeError, match="tasks"):  # TRAIT's default stage 2 needs a synthesize section
        build_recipe({"run_dir": str(tmp_path), "pretrain": {"model": tiny_llama}}, "test", "/")
    with pytest.raises(RecipeError, match="pairs"):
        build_recipe({"run_dir": str(tmp_path), "preference": {"model": tiny_llama, "pairs": "a", "ratings": "b"}},
                     "test", "/")
    with pytest.raises(RecipeError, match="ratings and sample"):
        build_recipe({"run_dir": str(tmp_path), "preference": {"model": tiny_llama, "ratings": "b",
                                                                "sample": {"prompts": "p"}}}, "test", "/")
    with pytest.raises(RecipeError, match="preference.sample.responses"):  # a pair needs two answers at least
        build_recipe({"run_dir": str(tmp_path), "preference": {"model": tiny_llama,
                                                                "sample": {"prompts": "p", "responses": 1}}},
                     "test", "/")
    with pytest.raises(RecipeError, match="preference.sample.prompts"):  # nothing to sample from
        build_recipe({"run_dir": str(tmp_path), "preference": {"model": tiny_llama, "sample": {}}}, "test", "/")
    with pytest.raises(RecipeError, match="finetune.format"):
        build_recipe({"run_dir": str(tmp_path), "finetune": {"model": tiny_llama, "data": "d", "format": "xml"}},
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

    # Models chain too: finetune tunes what pretrain's last stage wrote, preference aligns finetune's merged model
    # (without a merge there is no model to align: the field is named before any work).
    from domainsynth.pipelines.training.finetune import base_model
    from domainsynth.pipelines.training.preference import policy_model

    sections = {"run_dir": run, "pretrain": {"model": tiny_llama, "stages": [{"name": "knowledge", "data": str(
        tmp_path / "in.jsonl")}]}, "finetune": {"data": str(tmp_path / "problems.jsonl"), "merge": True},
        "preference": {"ratings": str(tmp_path / "problems.jsonl")}}
    chained = build_recipe(sections, "test", "/")
    assert base_model(chained.finetune, chained) == f"{run}/pretrain/knowledge/model"
    assert policy_model(chained.preference, chained) == f"{run}/finetune/model"
    with pytest.raises(RecipeError, match="preference.model"):
        build_recipe({**sections, "finetune": {"data": str(tmp_path / "problems.jsonl")}}, "test", "/")
    with pytest.raises(RecipeError, match="finetune.model"):
        build_recipe({"run_dir": run, "finetune": {"data": str(tmp_path / "problems.jsonl")}}, "test", "/")
