"""What a run prints (cluster/console.py): by default the stage lines, a progress line now and then off a terminal,
and the summary; --quiet only the summary and errors; --verbose Ray's own logs too. The runs are ``domainsynth``
processes of their own, stdout and stderr pipes (not terminals), joining the session's Ray (no cluster of their
own): Ray's console log writes to the process's real stderr, which a test's capture of sys.stderr would not see."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import ray
import yaml
from conftest import write_jsonl
from domainsynth.cluster import console
from domainsynth.cluster.cli import build_parser, main, summarise

# What Ray Data prints when its console log is not cut down: execution plans, its progress dumps, stats.
RAY_DATA_DUMPS = ("Execution plan of Dataset", "Starting execution of Dataset", "logging_progress", "Running Dataset",
                  "execution finished in", "Total Progress", "Data sink")
PROGRESS_SECONDS = 2


def _recipe(tmp_path, name, hidden_corpus, classifier, general_pool, embed=True):
    corpus = write_jsonl(tmp_path / "inputs" / "corpus.jsonl", general_pool[:600])
    raw = {"run_dir": str(tmp_path / name), "select": {
        "in_domain": str(hidden_corpus["in_domain"]), "corpus": str(corpus), "classifier": str(classifier),
        "keep_fraction": 0.2, "quality": {"scorer": "none"}}}
    if embed:
        raw["embed"] = {"batch_size": 32, "max_seq_length": 128}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, tmp_path / name


def _summary(run, stages) -> list[str]:
    """The summary the CLI prints for this run (whatever its wording), from the stages' reports."""
    reports = {s: json.loads((run / s / "report.json").read_text()) for s in stages}
    return summarise(reports, str(run), str(run / "index.html")).splitlines()


def _domainsynth(*args: str) -> tuple[list[str], str]:
    """``domainsynth ARGS --address <the session's Ray>``: exit code 0, stdout's lines and stderr."""
    env = {**os.environ, console.PROGRESS_ENV: str(PROGRESS_SECONDS)}
    done = subprocess.run([sys.executable, "-m", "domainsynth.cluster.cli", *args,
                           "--address", ray.get_runtime_context().gcs_address],
                          capture_output=True, text=True, timeout=600, env=env, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.splitlines(), done.stderr


def test_default_output_is_the_stage_lines_progress_and_the_summary(ray_local, hidden_corpus, classifier,
                                                                     general_pool, tmp_path):
    recipe, run = _recipe(tmp_path, "run", hidden_corpus, classifier, general_pool)
    lines, err = _domainsynth("run", str(recipe))

    summary = _summary(run, ["select", "embed"])
    assert lines[-len(summary) - 1:-1] == summary and lines[-1].startswith("Done in")
    before = lines[:-len(summary) - 1]
    progress = [line for line in before if re.fullmatch(r"\[(select|embed|report)\] \d+ s(: .+)?", line)]
    stage_lines = [line for line in before if line not in progress]
    for stage in ("select", "embed", "report"):  # the runner's own lines (and the report page's), whatever they say
        assert any(line.startswith(f"[{stage}] ") for line in stage_lines), lines
    assert all(re.match(r"\[(select|embed|report)\] ", line) for line in stage_lines), stage_lines
    assert len(stage_lines) <= 3 * 2 + 1
    # Progress off a terminal: a line every PROGRESS_SECONDS at most, with Ray Data's counts while it runs.
    assert progress, lines
    assert any("rows in" in line for line in progress), progress
    seconds = float(lines[-1].split()[2].rstrip("s."))
    assert len(progress) <= 2 + seconds / PROGRESS_SECONDS
    for dump in RAY_DATA_DUMPS:
        assert dump not in "\n".join(lines) + err, dump
    assert " pid=" not in err  # no worker output forwarded: "(MapWorker(...) pid=123) ..."
    assert not [line for line in err.splitlines() if " INFO " in line], err


def test_quiet_prints_only_the_summary_and_verbose_prints_rays_logs(ray_local, hidden_corpus, classifier,
                                                                     general_pool, tmp_path):
    recipe, run = _recipe(tmp_path, "quiet", hidden_corpus, classifier, general_pool, embed=False)
    quiet, err = _domainsynth("run", str(recipe), "--quiet")
    assert quiet[:-1] == _summary(run, ["select"]) and quiet[-1].startswith("Done in")
    assert not [line for line in err.splitlines() if "WARNING" in line or " INFO " in line], err

    recipe, run = _recipe(tmp_path, "verbose", hidden_corpus, classifier, general_pool, embed=False)
    verbose, err = _domainsynth("-v", "run", str(recipe))
    assert "Execution plan of Dataset" in err  # Ray Data's own log, back on the console
    assert verbose[-len(quiet):-1] == _summary(run, ["select"])
    assert len(verbose) + len(err.splitlines()) > len(quiet) + 5


def test_errors_show_in_quiet_mode(classifier, tmp_path, capsys):
    in_domain = write_jsonl(tmp_path / "in.jsonl", [{"text": f"in-domain text number {i}"} for i in range(20)])
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n\n")
    code = main(["select", "-q", "--in-domain", str(in_domain), "--corpus", str(blank), "--out", str(tmp_path / "r")])
    out, err = capsys.readouterr()
    assert code == 1 and out == "" and "domainsynth: error: select.corpus: the corpus is empty" in err


@pytest.mark.parametrize("argv, mode", [
    (["demo"], "normal"), (["demo", "-q"], "quiet"), (["-q", "demo"], "quiet"), (["--verbose", "demo"], "verbose"),
    (["demo", "--verbose"], "verbose"), (["run", "r.yaml", "--quiet"], "quiet"),
    (["select", "--in-domain", "a", "--corpus", "b", "--out", "c", "-v"], "verbose"),
    (["qc", "--input", "a", "--out", "c", "-q"], "quiet"), (["k8s", "validate", "f.yaml"], "normal"),
])
def test_the_output_flags_go_before_or_after_the_command(argv, mode):
    assert build_parser().parse_args(argv).output == mode


def test_quiet_and_verbose_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "-q", "-v"])
    assert "not allowed with argument" in capsys.readouterr().err


def _op(name, rows_out=0, rows_in=0, pending=0, inputs=True):
    metrics = SimpleNamespace(rows_task_outputs_generated=rows_out, num_row_inputs_received=rows_in,
                              num_pending_actors=pending)
    return SimpleNamespace(name=name, metrics=metrics, input_dependencies=["x"] if inputs else [])


def test_a_progress_line_says_rows_in_rows_done_and_actors_starting():
    topology = [_op("Input", inputs=False), _op("ReadCorpus", 1234), _op("MapBatches(Embedder)", 1200, 1200, 2),
                _op("Write", 0, 512)]
    assert console.describe_execution(topology) == "1,234 rows in, 512 done; 2 actors starting"
    assert console.describe_execution([_op("Input", inputs=False), _op("ReadCorpus->Write", 10)]) == "10 rows in"
    assert console.describe_execution([_op("Input", inputs=False), _op("Read"), _op("Map", pending=1)]) == \
        "1 actor starting"
    assert console.describe_execution([_op("Input", inputs=False), _op("Read"), _op("Write")]) is None
    assert console.describe_execution([_op("Input", inputs=False)]) is None


def test_a_driver_in_a_ray_job_leaves_the_jobs_own_variables_to_it(monkeypatch):
    from domainsynth.cluster import ray_runtime

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"working_dir": "gcs://x.zip", "env_vars": {"TOKENIZERS_PARALLELISM": "true"}}}))
    env = ray_runtime._runtime_env(console.Console(), ray_runtime._job_env_vars())["env_vars"]
    assert "TOKENIZERS_PARALLELISM" not in env and env["TQDM_DISABLE"] == "1"
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert ray_runtime._job_env_vars() == {}


def test_workers_get_quiet_libraries_and_the_users_settings_win(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "0")
    env = console.Console("normal").worker_env()
    assert env["TQDM_DISABLE"] == "0" and env["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert env["TRANSFORMERS_VERBOSITY"] == "error"
    assert "TRANSFORMERS_VERBOSITY" not in console.Console("verbose").worker_env()
    assert console.Console("quiet").forward_worker_logs is False
    assert console.Console("verbose").forward_worker_logs is True
