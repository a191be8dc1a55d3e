"""The whole loop, as a user runs it: ``domainsynth adapt examples/adapt.yaml`` — select, embed, index, retrieve,
softprompt, synthesize (CRAFT), qc, judge, pretrain (two stages), finetune, preference (sampled and judged), evaluate —
then the report page and the endpoint on the last model, answering through its OpenAI API. The bundled recipe and
data as they ship; only the model is the tiny Llama (every "smollm2" in the recipe) and the sizes are cut, so it runs in
minutes on 2 CPUs. Every stage's rows must be those its upstream stage wrote, and each model must start from the one
before it. One change of source: a tiny random judge rates every answer alike (greedy, "very poor"), which makes no
preference pair, so DPO takes pairs of CRAFT's few-shots instead (the right answer chosen over a wrong one); sampling
and judging answers is tested in test_adapt_training.py."""

from __future__ import annotations

import json
import socket
from html.parser import HTMLParser
from pathlib import Path

import pytest

from domainsynth.cluster.cli import main

ADAPT = str(Path(__file__).resolve().parents[1] / "examples" / "adapt.yaml")
STAGES = ["select", "embed", "index", "retrieve", "softprompt", "synthesize", "qc", "judge", "pretrain", "finetune",
          "preference", "evaluate"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def report(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "report.json").read_text())


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.hrefs += [v for k, v in attrs if k in ("href", "src") and v]


@pytest.mark.timeout(1500)
def few_shot_pairs(path: Path) -> Path:
    """Preference pairs from CRAFT's BioQA few-shots: the question, its answer letter chosen over another letter."""
    rows = [json.loads(line) for line in open(Path(ADAPT).parent / "data" / "craft_bioqa_fewshot.jsonl")][:8]
    with open(path, "w") as f:
        for row in rows:
            right = row["Output"].strip()
            wrong = next(letter + "." for letter in "ABCD" if not right.startswith(letter))
            f.write(json.dumps({"prompt": row["Instruction"], "chosen": right, "rejected": wrong}) + "\n")
    return path


def test_adapt_runs_the_whole_loop_and_serves_the_last_model(ray_local, tiny_llama_4k, tmp_path, capsys):
    run = tmp_path / "adapt"
    pairs = few_shot_pairs(tmp_path / "pairs.jsonl")
    tiny = [f"{section}.model={tiny_llama_4k}" for section in ("softprompt", "synthesize", "judge", "pretrain")]
    small = ["retrieve.top_k=6", "synthesize.max_field_chars=24", "synthesize.batch_size=4",
             "pretrain.block_size=128", "pretrain.stages=[{name: knowledge, max_steps: 2}, {name: tasks, max_steps: 2}]",
             "finetune.training.max_steps=2", "preference.sample=null", f"preference.pairs={pairs}",
             "preference.training.max_steps=1", "softprompt.max_steps=2", "evaluate.limit=3",
             "evaluate.cpus_per_model=1", f"serve.port={free_port()}", "serve.default_max_tokens=8"]
    sets = [arg for item in tiny + small for arg in ("--set", item)]
    code = main(["adapt", ADAPT, "--out", str(run), *sets])
    out, err = capsys.readouterr()
    assert code == 0, out + err

    reports = {stage: report(run, stage) for stage in STAGES}
    # The rows flow: each stage reads what the one before it kept.
    assert reports["embed"]["rows_in"] == reports["select"]["rows_out"]
    assert reports["retrieve"]["rows_out"] == 6
    assert reports["synthesize"]["rows_in"] == reports["retrieve"]["rows_out"]
    assert reports["qc"]["rows_in"] == reports["synthesize"]["rows_out"]
    assert reports["judge"]["rows_in"] == reports["qc"]["rows_out"]
    assert reports["finetune"]["rows_in"] == reports["judge"]["rows_out"]
    assert reports["softprompt"]["rows_in"] == 32  # CRAFT's BioQA few-shots, all read
    # The models chain: base -> pretrain/knowledge -> pretrain/tasks -> finetune (merged) -> preference (merged).
    assert reports["pretrain"]["model"] == tiny_llama_4k
    assert reports["finetune"]["model"] == str(run / "pretrain" / "tasks" / "model")
    assert reports["preference"]["model"] == str(run / "finetune" / "model")
    assert (run / "preference" / "model" / "config.json").exists()
    evaluated = json.loads((run / "evaluate" / "results.json").read_text())
    assert [m["name"] for m in evaluated["models"]] == ["base", "pretrain/knowledge", "pretrain/tasks", "finetune",
                                                         "preference", "softprompt"]
    scored = {(r["model"], r["task"]) for r in evaluated["rows"]}
    assert len(scored) == 6 * 2  # every model on pubmedqa and the held-out perplexity

    # Decontamination: what each model was trained on, against the items it was scored on. The base model's data is
    # not known; each model down the chain has seen all its predecessor saw, so it overlaps at least as many items;
    # every overlap names the training file, the line and the words shared.
    contamination = {(r["model"], r["task"]): r for r in evaluated["contamination"]["rows"]}
    assert len(contamination) == 6 * 2
    assert all(r["overlapping"] is None for (model, _), r in contamination.items() if model == "base")
    assert all(r["overlapping"] is not None and r["training_rows"] > 0
               for (model, _), r in contamination.items() if model != "base")
    chain = ["pretrain/knowledge", "pretrain/tasks", "finetune", "preference"]
    for task in ("pubmedqa", "perplexity"):
        counts = [contamination[(model, task)]["overlapping"] for model in chain]
        assert counts == sorted(counts), (task, counts)
        rows = [contamination[(model, task)]["training_rows"] for model in chain]
        assert rows == sorted(rows) and rows[0] < rows[-1], (task, rows)
    for r in contamination.values():
        assert all(e["file"] and e["shared"] for e in r["examples"])

    # The report page links every stage, and everything it links is there.
    page = run / "index.html"
    links = Links()
    links.feed(page.read_text())
    local = [h for h in links.hrefs if not h.startswith(("http:", "https:", "#", "data:"))]
    assert local and all((run / h.split("#")[0]).exists() for h in local), [h for h in local
                                                                            if not (run / h.split("#")[0]).exists()]
    for stage in STAGES:
        assert any(h.startswith(f"{stage}/") or f"reports/{stage}." in h for h in local), stage

    # The endpoint served the last model and answered through the OpenAI chat route.
    assert f"Endpoint check: {run / 'preference' / 'model'} answered in" in out, out
