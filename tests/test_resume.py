"""Interrupted work resumes without losing or duplicating rows; finished stages are skipped on rerun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow.dataset as pads
import pytest

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


def _interrupt_point_reached(stage_dir, phase: str) -> bool:
    if phase == "scoring":  # the classifier is saved just before the scoring pass starts
        return (stage_dir / "classifier.bin").exists()
    data = stage_dir / "data"  # "writing": part of the output is on disk
    return data.exists() and any(data.iterdir())


@pytest.mark.parametrize("phase", ["scoring", "writing"])
def test_kill_in_the_middle_then_rerun_gives_exactly_the_right_rows(phase, ray_local, classifier, general_pool,
                                                                    tmp_path):
    corpus, n_rows = _big_corpus(tmp_path, general_pool)
    killed_run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "domainsynth.cluster.cli", *_select_args(corpus, classifier, killed_run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if _interrupt_point_reached(killed_run / "select", phase):
            if phase == "scoring":
                time.sleep(1.0)  # into the scoring pass, well before it ends
            break
        time.sleep(0.1)
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
    assert "running" in messages[-1]
    assert changed["rows_out"] < first["rows_out"]
    assert len(_ids(tmp_path / "run")) == changed["rows_out"]
