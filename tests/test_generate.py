"""Batch generation on a real local Ray Data pipeline with the tiny Llama: every prompt answered n times, bad rows
quarantined with file, line and reason while the rest goes on, a soft prompt applied exactly as the engine applies
it, and an engine actor killed mid-run whose rows are retried, not lost or doubled."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time

import pyarrow.parquet as pq
import pytest
import ray

from domainsynth.actors.engines import SamplingParams, TransformersEngine
from domainsynth.actors.soft_prompt import load_soft_prompt
from domainsynth.cluster.cli import main
from domainsynth.pipelines.recipe import build_recipe
from domainsynth.pipelines.runner import StageFailed, run_recipe
from domainsynth.pipelines.synthesis.generate import ENGINE_RESTARTS

from conftest import write_jsonl

QUESTIONS = ["What does the liver do?", "How do vaccines train the immune system?", "Why do cells divide?",
             "What is a gene?", "How does insulin lower blood sugar?", "What causes a fever?"]


def prompts_file(path, count: int, extra_lines: list[str] = ()) -> str:
    rows = [{"id": f"q{i}", "prompt": QUESTIONS[i % len(QUESTIONS)] + f" ({i})", "topic": "biology"}
            for i in range(count)]
    write_jsonl(path, rows)
    with open(path, "a", encoding="utf-8") as f:
        for line in extra_lines:
            f.write(line + "\n")
    return str(path)


def generate(run_dir, **section) -> dict:
    recipe = build_recipe({"run_dir": str(run_dir), "generate": section}, "test", "/")
    return run_recipe(recipe, echo=lambda _: None)["generate"]


def test_bad_rows_are_quarantined_and_the_rest_answered_with_the_soft_prompt(ray_local, tiny_llama,
                                                                             soft_prompt_file, tmp_path):
    bad = [json.dumps({"id": "empty", "prompt": ""}), "{not json",
           json.dumps({"id": "long", "prompt": "word " * 1200})]
    path = prompts_file(tmp_path / "prompts.jsonl", 20, bad)
    report = generate(tmp_path / "run", prompts=path, model=tiny_llama, soft_prompt=soft_prompt_file,
                      sampling={"max_tokens": 12, "temperature": 0}, batch_size=4, num_cpus=0.25,
                      concurrency=[1, 2])
    assert (report["rows_in"], report["rows_out"], report["rows_quarantined"]) == (23, 20, 3)
    quarantine = [json.loads(l) for l in (tmp_path / "run/generate/quarantine.jsonl").read_text().splitlines()]
    reasons = {q["line"]: q["reason"] for q in quarantine}
    assert all(q["file"] == "prompts.jsonl" for q in quarantine)
    assert "empty text" in reasons[21] and "invalid JSON" in reasons[22] and "prompt too long" in reasons[23]

    rows = pq.read_table(tmp_path / "run/generate/data").to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(f"q{i}" for i in range(20))
    assert all(r["topic"] == "biology" and r["choice"] == 0 and r["completion_tokens"] > 0 for r in rows)
    assert all(r["_source_file"] == "prompts.jsonl" for r in rows)  # provenance kept for the stages after
    # The same text the engine writes with the same soft prompt in this process.
    engine = TransformersEngine(tiny_llama)
    by_id = {r["id"]: r for r in rows}
    direct = engine.generate([by_id[i]["prompt"] for i in ("q0", "q7")], SamplingParams(max_tokens=12, temperature=0),
                             prefix=load_soft_prompt(soft_prompt_file))
    assert [by_id["q0"]["completion"], by_id["q7"]["completion"]] == [direct[0][0].text, direct[1][0].text]
    assert (tmp_path / "run/generate/completion_tokens.png").stat().st_size > 1000


def engine_actors() -> dict[str, dict]:
    """This cluster's GenerateBatch actors (alive or dead) from Ray's actor table, by actor id."""
    return {actor_id: actor for actor_id, actor in ray._private.state.actors().items()
            if "GenerateBatch" in actor["ActorClassName"]}


def test_rows_of_a_killed_engine_actor_are_retried_not_lost(ray_local, tiny_llama, tmp_path):
    """SIGKILL one engine actor's process mid-run (as an OOM kill or a lost node would): Ray Data restarts it and
    runs its batches again; every prompt still has exactly n completions. The actor is found in this cluster's own
    actor table (Ray's GCS state), never by matching processes across the host."""
    path = prompts_file(tmp_path / "prompts.jsonl", 96)
    result: dict = {}

    def run():
        try:
            result["report"] = generate(tmp_path / "run", prompts=path, model=tiny_llama, batch_size=4,
                                        sampling={"max_tokens": 48, "temperature": 1.0, "n": 2, "seed": 0},
                                        num_cpus=0.25, concurrency=2)
        except BaseException as e:
            result["error"] = e

    stage = threading.Thread(target=run)
    stage.start()
    killed, deadline = None, time.monotonic() + 120
    while killed is None and stage.is_alive() and time.monotonic() < deadline:
        for actor_id, actor in engine_actors().items():
            # Kill once the actor has been working a while: ALIVE means its model is loaded (StartTime is when its
            # constructor returned, in ms); half a second later batches are in flight.
            if actor["State"] == "ALIVE" and actor["Pid"] and time.time() - actor["StartTime"] / 1000 > 0.5:
                os.kill(actor["Pid"], signal.SIGKILL)
                killed = actor_id
                break
        time.sleep(0.2)
    stage.join(timeout=600)
    assert killed is not None, "the stage ended before an engine actor could be killed: make it longer"
    assert "error" not in result, result.get("error")
    assert engine_actors()[killed]["NumRestarts"] >= 1, "Ray did not restart the killed engine actor"
    report = result["report"]
    rows = pq.read_table(tmp_path / "run/generate/data", columns=["id", "choice"]).to_pylist()
    pairs = sorted((r["id"], r["choice"]) for r in rows)
    assert pairs == sorted((f"q{i}", c) for i in range(96) for c in (0, 1))  # none lost, none doubled
    assert (report["rows_out"], report["rows_quarantined"], report["completions"]) == (96, 0, 192)


def test_an_engine_actor_that_keeps_dying_fails_the_stage_once_restarts_run_out(ray_local, tiny_llama, tmp_path):
    """Every engine actor killed as soon as it is up (as a process that runs out of memory each time would be): Ray
    restarts it ENGINE_RESTARTS times, then the stage fails, naming itself and the actor's death, instead of
    restarting forever."""
    path = prompts_file(tmp_path / "prompts.jsonl", 200)
    result: dict = {}

    def run():
        try:
            result["report"] = generate(tmp_path / "run", prompts=path, model=tiny_llama, batch_size=4,
                                        concurrency=1, sampling={"max_tokens": 48})
        except BaseException as e:
            result["error"] = e

    stage = threading.Thread(target=run)
    stage.start()
    killed: set[int] = set()
    deadline = time.monotonic() + 240
    while stage.is_alive() and time.monotonic() < deadline:
        for actor in engine_actors().values():
            if actor["State"] == "ALIVE" and actor["Pid"] and actor["Pid"] not in killed:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(actor["Pid"], signal.SIGKILL)
                killed.add(actor["Pid"])
        time.sleep(0.2)
    stage.join(timeout=60)
    assert not stage.is_alive(), "the stage went on restarting a dying engine"
    assert isinstance(result.get("error"), StageFailed), result
    assert str(result["error"]).startswith("stage generate failed: a worker actor died and Ray's restarts ran out")
    assert len(killed) == ENGINE_RESTARTS + 1
    assert not (tmp_path / "run" / "generate").exists()


def test_a_broken_engine_fails_the_stage_instead_of_quarantining_every_row(ray_local, tiny_llama, tmp_path):
    """An engine that cannot run at all (here: weights on PyTorch's meta device, which hold no data) fails every
    row for a reason that is not the rows': the stage fails, naming itself and the cause, and leaves no output."""
    path = prompts_file(tmp_path / "prompts.jsonl", 8)
    with pytest.raises(StageFailed) as failure:
        generate(tmp_path / "run", prompts=path, model=tiny_llama, batch_size=4, concurrency=1,
                 engine_options={"device": "meta"}, sampling={"max_tokens": 4})
    message = str(failure.value)
    assert message.startswith("stage generate failed: EngineBroken: ") and "meta tensors" in message
    assert len(message) < 700  # the cause, not Ray's nested tracebacks
    assert not (tmp_path / "run" / "generate").exists()


def test_generate_command_line(ray_local, tiny_llama, tmp_path, capsys):
    path = prompts_file(tmp_path / "prompts.jsonl", 6)
    code = main(["generate", "--prompts", path, "--model", tiny_llama, "--out", str(tmp_path / "run"), "--chat",
                 "--max-tokens", "6", "--n", "2", "--seed", "1", "--set", "generate.num_cpus=0.25"])
    assert code == 0
    out = capsys.readouterr().out
    assert "generate: 12 completions for 6 of 6 prompts" in out
    rows = pq.read_table(tmp_path / "run/generate/data").to_pylist()
    assert len(rows) == 12 and {r["choice"] for r in rows} == {0, 1}


@pytest.mark.parametrize("args, message", [
    (["--temperature", "9"], "generate.sampling.temperature"),
    (["--set", "generate.concurrency=[3,1]"], "generate.concurrency"),
    (["--soft-prompt", "/no/such/prompt.safetensors"], "generate.soft_prompt"),
])
def test_bad_generate_arguments_fail_before_work(tiny_llama, tmp_path, capsys, args, message):
    path = prompts_file(tmp_path / "prompts.jsonl", 2)
    code = main(["generate", "--prompts", path, "--model", tiny_llama, "--out", str(tmp_path / "run"), *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
