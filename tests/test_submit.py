"""`domainsynth submit` and `domainsynth jobs` against real Ray heads started here (`ray start --head` on free
loopback ports, a temp dir of their own, killed afterwards): one with token authentication, one without. The job
runs the real pipeline; nothing is mocked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from domainsynth.cluster import staging as staging_api
from domainsynth.pipelines.recipe import build_recipe, load_recipe

from conftest import free_port, free_ports

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TOKEN = "domainsynth-test-token-0123456789"


class RayHead:
    """A Ray head in its own process group and temp dir, so that stopping it touches nothing else on the machine
    (`ray stop` would stop every Ray here, the test session's own included)."""

    def __init__(self, auth_mode: str):
        # Short: Ray's unix sockets live under it and their paths have a length limit.
        self.temp_dir = tempfile.mkdtemp(prefix="dsr-", dir="/tmp")
        names = ["port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
                 "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port", "node-manager-port",
                 "object-manager-port"]
        ports = dict(zip(names, free_ports(len(names))))
        self.dashboard_port = ports["dashboard-port"]
        # The job's driver runs with the head's environment: PATH finds this environment's `domainsynth`.
        env = {**os.environ, "RAY_AUTH_MODE": auth_mode, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        env.pop("RAY_ADDRESS", None)
        if auth_mode == "token":
            env["RAY_AUTH_TOKEN"] = TOKEN
        self.log = open(os.path.join(self.temp_dir, "ray-start.log"), "w")
        self.process = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--temp-dir", self.temp_dir,
             "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1", "--include-dashboard", "true",
             *[f"--{name}={port}" for name, port in ports.items()]],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self._wait_until_up()

    def _wait_until_up(self, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, Path(self.log.name).read_text()[-3000:]
            try:
                if requests.get(f"{self.address}/api/gcs_healthz", timeout=2).ok:
                    # The job agent comes up a little after the dashboard.
                    requests.get(f"{self.address}/api/jobs/", timeout=5, headers=_bearer()).raise_for_status()
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise AssertionError(f"the Ray head did not come up in {timeout_s}s:\n"
                             + Path(self.log.name).read_text()[-3000:])

    def stop(self) -> None:
        # `ray start --block` does not always finish on SIGTERM: give it a few seconds, then kill the group, then
        # anything this head started that left the group (its processes, by pid, taken before the signals).
        try:
            started = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            started = []
        for sig, grace in ((signal.SIGTERM, 8), (signal.SIGKILL, 2)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                continue
        for proc in started:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(started, timeout=5)
        self.log.close()
        assert not alive, alive


def _bearer() -> dict:
    return {"Authorization": f"Bearer {TOKEN}"}


def domainsynth(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return subprocess.run([str(BIN / "domainsynth"), *args], cwd=REPO, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def open_head():
    head = RayHead("disabled")
    yield head
    head.stop()


@pytest.fixture(scope="module")
def token_head():
    head = RayHead("token")
    yield head
    head.stop()


@pytest.fixture
def select_recipe(tmp_path) -> Path:
    """A short job: select on the bundled quickstart data."""
    data = REPO / "examples" / "data"
    recipe = {"run_dir": str(tmp_path / "run"), "select": {"in_domain": str(data / "medical_in_domain.jsonl"),
                                                          "corpus": str(data / "corpus"), "keep_fraction": 0.12}}
    path = tmp_path / "select.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_submit_quickstart_follows_the_job_to_success(open_head, tiny_llama_4k, tmp_path):
    run_dir = tmp_path / "quickstart"
    result = domainsynth("submit", "examples/quickstart.yaml", "--address", open_head.address, "--follow",
                         "--set", f"run_dir={run_dir}", "--set", f"synthesize.model={tiny_llama_4k}",
                         "--set", f"judge.model={tiny_llama_4k}", "--set", "synthesize.max_field_chars=40",
                         env={"RAY_AUTH_MODE": "disabled"})
    # The tiny Llama's strings are kept short (random weights never end one) so that its answers parse.
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    job_id = result.stdout.split("Submitted job ")[1].split()[0]
    assert f"Job {job_id} succeeded." in result.stdout
    # --follow streamed the job's own output: the stage lines and the run's summary.
    assert "[select] started" in result.stdout and f"Results are in {run_dir}" in result.stdout
    for stage in ("select", "embed", "index", "retrieve", "synthesize", "qc", "judge"):
        assert (run_dir / stage / "_COMPLETE.json").exists(), stage
    report = json.loads((run_dir / "judge" / "report.json").read_text())
    assert report["rows_in"] > 0
    synthesize = json.loads((run_dir / "synthesize" / "report.json").read_text())
    top_k = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())["retrieve"]["top_k"]
    assert synthesize["rows_in"] == top_k  # every retrieved document reached the LLM on the cluster

    status = domainsynth("jobs", "status", job_id, "--address", open_head.address)
    assert status.returncode == 0 and f"{job_id}: SUCCEEDED" in status.stdout
    listed = domainsynth("jobs", "list", "--address", open_head.address)
    assert job_id in listed.stdout and "domainsynth run recipe.yaml" in listed.stdout
    logs = domainsynth("jobs", "logs", job_id, "--address", open_head.address)
    assert "[judge] started" in logs.stdout


def test_the_job_reads_the_uploaded_copy_of_its_inputs(open_head, tmp_path):
    """The recipe's inputs travel in the job's working_dir: once submitted, the originals can go."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(REPO / "examples" / "data", data)
    # A corpus folder kept out of git (a common .gitignore): staging honours .gitignore files and would refuse to
    # send it empty; Ray's switch sends it (and Ray's packaging must not see a copied .gitignore either).
    (data / "corpus" / ".gitignore").write_text("*\n!.gitignore\n")
    recipe = tmp_path / "select.yaml"
    recipe.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "select": {
        "in_domain": "data/medical_in_domain.jsonl", "corpus": "data/corpus", "keep_fraction": 0.12}}))
    submitted = domainsynth("submit", str(recipe), "--address", open_head.address, "--no-wait",
                            env={"RAY_RUNTIME_ENV_IGNORE_GITIGNORE": "1"})
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    shutil.rmtree(data)
    job_id = submitted.stdout.split("Submitted job ")[1].split()[0]
    followed = domainsynth("jobs", "logs", job_id, "--follow", "--address", open_head.address)
    assert followed.returncode == 0, followed.stdout[-3000:]
    report = json.loads((tmp_path / "run" / "select" / "report.json").read_text())
    assert report["rows_in"] == 3000 and report["rows_quarantined"] == 0


def test_token_auth_the_token_is_read_and_required(token_head, select_recipe, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    home = {"HOME": str(tmp_path)}  # no ~/.ray/auth_token of this machine's user gets in the way
    submitted = domainsynth("submit", str(select_recipe), "--address", token_head.address, "--no-wait",
                            env={**home, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)})
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = submitted.stdout.split("Submitted job ")[1].split()[0]
    followed = domainsynth("jobs", "logs", job_id, "--follow", "--address", token_head.address,
                           env={**home, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN})
    assert followed.returncode == 0 and f"Job {job_id} succeeded." in followed.stdout, followed.stderr
    assert (tmp_path / "run" / "select" / "_COMPLETE.json").exists()

    # Ray's default token file is read when the mode is token; with the mode unset nothing is sent (as Ray's own
    # clients do), and the cluster's refusal is explained.
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(TOKEN)
    listed = domainsynth("jobs", "list", "--address", token_head.address, env={**home, "RAY_AUTH_MODE": "token"})
    assert listed.returncode == 0 and job_id in listed.stdout, listed.stderr
    no_token = domainsynth("jobs", "list", "--address", token_head.address, env=home)
    assert no_token.returncode == 1 and "requires a token and none was sent: set RAY_AUTH_MODE=token" in no_token.stderr
    (tmp_path / ".ray" / "auth_token").unlink()
    wrong = domainsynth("jobs", "list", "--address", token_head.address,
                        env={**home, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "nope"})
    assert wrong.returncode == 1 and "rejected the token" in wrong.stderr
    missing = domainsynth("submit", str(select_recipe), "--address", token_head.address,
                          env={**home, "RAY_AUTH_MODE": "token"})
    assert missing.returncode == 2 and "RAY_AUTH_MODE=token but no token was found" in missing.stderr


def test_jobs_stop_stops_a_running_job(token_head, select_recipe):
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}
    submitted = domainsynth("submit", str(select_recipe), "--address", token_head.address, "--no-wait", env=env)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = submitted.stdout.split("Submitted job ")[1].split()[0]
    stopped = domainsynth("jobs", "stop", job_id, "--address", token_head.address, env=env)
    assert stopped.returncode == 0 and "stop requested" in stopped.stdout
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = domainsynth("jobs", "status", job_id, "--address", token_head.address, env=env).stdout
        if "STOPPED" in status:
            break
        time.sleep(1)
    assert f"{job_id}: STOPPED" in status
    waited = domainsynth("jobs", "logs", job_id, "--follow", "--address", token_head.address, env=env)
    assert waited.returncode == 1 and f"Job {job_id} stopped" in waited.stdout
    for action in (("status",), ("logs", "--follow")):
        unknown = domainsynth("jobs", action[0], "no-such-job", *action[1:], "--address", token_head.address, env=env)
        assert unknown.returncode == 1 and "Job no-such-job does not exist" in unknown.stderr, unknown.stderr


def test_an_unreachable_address_fails_within_seconds(select_recipe):
    started = time.monotonic()
    result = domainsynth("submit", str(select_recipe), "--address", f"http://127.0.0.1:{free_port()}")
    took = time.monotonic() - started
    assert result.returncode == 1 and "cannot reach the Ray dashboard" in result.stderr
    assert "Connection refused" in result.stderr and took < 20, (took, result.stderr)


def test_bad_recipes_and_addresses_fail_before_anything_is_sent(select_recipe, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: x\nselect: {in_domain: nowhere.jsonl, corpus: nowhere/, keep_fraction: 2}\n")
    result = domainsynth("submit", str(bad), "--address", "http://127.0.0.1:1")
    assert result.returncode == 2 and "select.keep_fraction" in result.stderr
    result = domainsynth("submit", str(select_recipe), "--address", "ray://127.0.0.1:10001")
    assert result.returncode == 2 and "ray:// is Ray Client's address" in result.stderr
    result = domainsynth("submit", str(select_recipe))
    assert result.returncode == 2 and "give --address" in result.stderr


def test_staging_copies_local_inputs_and_leaves_uris_and_hub_ids(tmp_path, tiny_llama, monkeypatch):
    data = tmp_path / "data"
    (data / "shards" / "nested").mkdir(parents=True)
    for name in ("a.jsonl", "b.jsonl", "nested/c.jsonl"):
        (data / "shards" / name).write_text('{"text": "x"}\n')
    (data / "fewshots.jsonl").write_text('{"text": "y"}\n')
    # A folder that keeps its files out of git: staging honours .gitignore files unless Ray's switch says not to
    # (tests/test_submit_staging.py), and Ray's packaging would honour a copied one and upload none.
    monkeypatch.setenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "1")
    (data / "corpus").mkdir()
    (data / "corpus" / "part-0.jsonl").write_text('{"text": "z"}\n')
    (data / "corpus" / ".gitignore").write_text("*\n!.gitignore\n")
    recipe = build_recipe({"run_dir": "s3://bucket/run",
                           "embed": {"corpus": ["shards/*.jsonl", "s3://bucket/more/*.jsonl", "corpus"],
                                     "model": "sentence-transformers/all-MiniLM-L6-v2"},
                           "retrieve": {"few_shots": "fewshots.jsonl", "top_k": 3},
                           "synthesize": {"method": "craft", "model": tiny_llama}}, "test", str(data))
    staging = tmp_path / "staging"
    staging.mkdir()
    name = staging_api.stage(recipe, str(staging), echo=lambda _: None)
    staged = load_recipe(str(staging / name))
    corpus = staged.embed.corpus
    assert corpus[1] == "s3://bucket/more/*.jsonl" and staged.embed.model == "sentence-transformers/all-MiniLM-L6-v2"
    assert corpus[0].startswith(str(staging / "inputs")) and corpus[0].endswith("*.jsonl")
    # The glob is expanded as the stages expand it ('*' crosses folders): the nested file travels too.
    staged_files = sorted(str(p.relative_to(Path(corpus[0]).parent)) for p in Path(corpus[0]).parent.rglob("*.jsonl"))
    assert staged_files == ["a.jsonl", "b.jsonl", "nested/c.jsonl"]
    staged_corpus = Path(corpus[2])
    assert (staged_corpus / "part-0.jsonl").is_file() and not (staged_corpus / ".gitignore").exists()
    assert staged.retrieve.few_shots[0].startswith(str(staging)) and Path(staged.retrieve.few_shots[0]).is_file()
    # The same file named twice (craft's few-shots default to retrieve's) is copied once.
    assert staged.synthesize.craft.few_shots == staged.retrieve.few_shots
    assert (Path(staged.synthesize.model) / "config.json").is_file() and staged.run_dir == "s3://bucket/run"


def test_staging_refuses_inputs_beyond_the_upload_limit(tmp_path, monkeypatch):
    (tmp_path / "big.jsonl").write_text('{"text": "' + "x" * 5000 + '"}\n')
    recipe = build_recipe({"run_dir": "s3://b/r", "embed": {"corpus": "big.jsonl"}}, "test", str(tmp_path))
    monkeypatch.setattr(staging_api, "UPLOAD_LIMIT_BYTES", 1000)
    (tmp_path / "staging").mkdir()
    with pytest.raises(staging_api.TooLargeToUpload, match=r"inputs come to 4.9 KiB; the Ray Jobs API uploads at most 1,000 B: .*big\.jsonl 4.9 KiB"):
        staging_api.stage(recipe, str(tmp_path / "staging"), echo=lambda _: None)
