"""Interrupted work resumes without losing or duplicating rows; finished stages are skipped on rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.dataset as pads
import pytest
import yaml

from domainsynth.cluster.cli import main
from domainsynth.pipelines import input_identity
from domainsynth.pipelines.recipe import build_recipe
from domainsynth.pipelines.runner import run_recipe

from conftest import write_jsonl


def _big_corpus(root, general_pool, copies=5, shards=10):
    rows = [{"id": f"{c}-{r['id']}", "text": r["text"] + f"\n(copy {c})", "source": r["source"]}
            for c in range(copies) for r in general_pool]
    for s in range(shards):
        write_jsonl(root / "corpus" / f"part-{s:02d}.jsonl", rows[s::shards])
    return root / "corpus", len(rows)


def _select_args(corpus, classifier, out):
    return ["select", "--in-domain", str(corpus), "--corpus", str(corpus), "--classifier", str(classifier),
            "--out", str(out), "--keep-fraction", "0.2", "--quality", "heuristic", "--num-cpus", "2"]


def _ids(run_dir):
    return pads.dataset(str(run_dir / "select" / "data")).to_table(columns=["id"]).column("id").to_pylist()


def _interrupt_point_reached(stage_dir, phase: str, session: int) -> bool:
    if phase == "scoring":  # the classifier is saved just before the scoring pass, then a scoring actor is at work
        return (stage_dir / "classifier.bin").exists() and _scoring_batch_in_progress(session)
    data = stage_dir / "data"  # "writing": part of the output is on disk
    return data.exists() and any(data.iterdir())


def _scoring_batch_in_progress(session: int) -> bool:
    """Whether a Ray worker of the killed run (its processes share the driver's session) is running a scoring actor's
    task: Ray titles such a process ``ray::MapWorker(MapBatches(SelectionScorer)).submit`` while it scores a block."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                in_session = int(f.read().rsplit(")", 1)[1].split()[3]) == session
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        if in_session and title.startswith("ray::") and "SelectionScorer" in title and ".submit" in title:
            return True
    return False


@pytest.mark.parametrize("phase", ["scoring", "writing"])
def test_kill_in_the_middle_then_rerun_gives_exactly_the_right_rows(phase, ray_local, classifier, general_pool,
                                                                    tmp_path):
    corpus, n_rows = _big_corpus(tmp_path, general_pool)
    killed_run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "domainsynth.cluster.cli", *_select_args(corpus, classifier, killed_run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if _interrupt_point_reached(killed_run / "select", phase, proc.pid):
            break
        time.sleep(0.1)  # poll interval; the wait ends on the observable condition above, or at the deadline
    assert time.monotonic() < deadline, f"the {phase} phase was not seen within 240 s"
    assert proc.poll() is None, "the stage finished before it could be interrupted; make the corpus larger"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started, all at once
    proc.wait(timeout=30)
    assert not (killed_run / "select" / "_COMPLETE.json").exists()

    # Rerun the same command into the same run directory, and a clean run for reference.
    recipe = build_recipe({"run_dir": str(killed_run), "select": {
        "in_domain": str(corpus), "corpus": str(corpus), "classifier": str(classifier), "keep_fraction": 0.2}},
        "test", "/")
    resumed = run_recipe(recipe, echo=lambda _: None)["select"]
    clean = run_recipe(recipe.model_copy(update={"run_dir": str(tmp_path / "clean")}), echo=lambda _: None)["select"]

    resumed_ids, clean_ids = _ids(killed_run), _ids(tmp_path / "clean")
    assert len(resumed_ids) == len(set(resumed_ids)), "duplicated rows after resume"
    assert sorted(resumed_ids) == sorted(clean_ids)
    assert resumed["rows_in"] == clean["rows_in"] == n_rows
    assert resumed["rows_out"] == clean["rows_out"] == len(clean_ids)
    assert resumed["rows_filtered"] == clean["rows_filtered"]


def test_finished_stage_is_skipped_unless_the_recipe_changes(ray_local, classifier, hidden_corpus, tmp_path):
    corpus = hidden_corpus["corpus"] / "part-1.jsonl.gz"
    raw = {"run_dir": str(tmp_path / "run"), "select": {
        "in_domain": str(corpus), "corpus": str(corpus), "classifier": str(classifier), "keep_fraction": 0.3}}
    messages: list[str] = []
    first = run_recipe(build_recipe(dict(raw), "t", "/"), echo=messages.append)["select"]
    marker_mtime = (tmp_path / "run" / "select" / "_COMPLETE.json").stat().st_mtime_ns
    again = run_recipe(build_recipe(dict(raw), "t", "/"), echo=messages.append)["select"]
    assert "skipped" in messages[-1] and again == first
    assert (tmp_path / "run" / "select" / "_COMPLETE.json").stat().st_mtime_ns == marker_mtime

    raw["select"] = {**raw["select"], "keep_fraction": 0.1}
    changed = run_recipe(build_recipe(raw, "t", "/"), echo=messages.append)["select"]
    assert "[select] started" in messages[-2] and "[select] finished" in messages[-1]
    assert changed["rows_out"] < first["rows_out"]
    assert len(_ids(tmp_path / "run")) == changed["rows_out"]


def _stage_lines(output: str) -> dict[str, str]:
    """``{stage: "running" | "skipped"}`` from the stage lines ``domainsynth run`` prints."""
    said = {}
    for line in output.splitlines():
        if line.startswith("[") and "] " in line and line.split("] ", 1)[0][1:] in ("select", "embed"):
            name, rest = line[1:].split("] ", 1)
            if rest.startswith("started") or rest.endswith(": skipped"):
                said[name] = "running" if rest.startswith("started") else "skipped"
    return said


def test_an_edited_input_reruns_its_stage_and_those_after_it_a_touch_does_not(ray_local, classifier, hidden_corpus,
                                                                                general_pool, tmp_path, capsys):
    """select, then embed of select's output (embed.corpus unset: inside the run directory, covered by select's
    fingerprint, so embed's own inputs stay put while select rewrites its output); ``domainsynth run`` each time."""
    corpus = write_jsonl(tmp_path / "inputs" / "corpus.jsonl", general_pool[:600])
    assert corpus.stat().st_size <= input_identity.SMALL_FILE_BYTES  # a small file: identified by its content
    run = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"run_dir": str(run), "select": {
        "in_domain": str(hidden_corpus["in_domain"]), "corpus": str(corpus), "classifier": str(classifier),
        "keep_fraction": 0.05, "quality": {"scorer": "none"}},
        "embed": {"batch_size": 32, "max_seq_length": 128}}))

    def domainsynth_run() -> dict[str, str]:
        assert main(["run", str(recipe)]) == 0
        return _stage_lines(capsys.readouterr().out)

    assert domainsynth_run() == {"select": "running", "embed": "running"}
    first_embed = json.loads((run / "embed" / "report.json").read_text())
    assert domainsynth_run() == {"select": "skipped", "embed": "skipped"}  # recipe and inputs unchanged

    before = corpus.stat()
    os.utime(corpus, ns=(before.st_atime_ns, before.st_mtime_ns + 60 * 10**9))  # touched, not changed
    assert domainsynth_run() == {"select": "skipped", "embed": "skipped"}

    # The same size, another content, and the old modification time back: only the content tells.
    touched = corpus.stat()
    data = corpus.read_bytes()
    at = data.index(b" the ") + 1
    corpus.write_bytes(data[:at] + b"teh" + data[at + 3:])
    os.utime(corpus, ns=(touched.st_atime_ns, touched.st_mtime_ns))
    assert corpus.stat().st_size == touched.st_size and corpus.stat().st_mtime_ns == touched.st_mtime_ns
    assert domainsynth_run() == {"select": "running", "embed": "running"}
    assert json.loads((run / "embed" / "report.json").read_text())["rows_in"] == first_embed["rows_in"]
    assert domainsynth_run() == {"select": "skipped", "embed": "skipped"}


def test_fingerprint_inputs_rules(tmp_path, monkeypatch):
    """No Ray: what the fingerprint looks at. A large file counts by size and modification time (a touch reruns, its
    content is not read); another stage's output in the run directory does not count at all; a local model folder
    counts by its files' sizes and times."""
    run = tmp_path / "run"
    big = tmp_path / "eval.jsonl"
    big.write_bytes(b'{"text": "x"}\n' * 1000)
    monkeypatch.setattr(input_identity, "SMALL_FILE_BYTES", 1000)  # so that a 14 kB file is "large"
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    raw = {"run_dir": str(run), "qc": {"input": str(run / "synthesize" / "data"), "decontaminate": {
        "eval_files": [str(big)]}, "diversity": {"model": str(model)}}}
    recipe = build_recipe(raw, "t", "/")
    inputs = input_identity.stage_inputs(recipe, "qc")
    assert [i["field"] for i in inputs] == ["qc.decontaminate.eval_files", "qc.diversity.model"]
    assert inputs[0]["files"][0][2].startswith("mtime_ns:")
    fingerprint = recipe.stage_fingerprint("qc")

    (run / "synthesize" / "data").mkdir(parents=True)  # the upstream stage's output appears: no change
    (run / "synthesize" / "data" / "part-0.parquet").write_bytes(b"x")
    assert recipe.stage_fingerprint("qc") == fingerprint
    st = big.stat()
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a large file is not read: a touch reruns
    assert recipe.stage_fingerprint("qc") != fingerprint
    fingerprint = recipe.stage_fingerprint("qc")
    (model / "config.json").write_text('{"hidden_size": 8}')
    assert recipe.stage_fingerprint("qc") != fingerprint
