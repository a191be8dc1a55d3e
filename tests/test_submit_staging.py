"""What `domainsynth submit` stages into a job's working_dir: the inputs' data, never their secrets. The inputs'
.gitignore/.rayignore files are honoured, a built-in list of secret files always applies, a private key under any
name stops the submission, and `--dry-run` lists it all without contacting a cluster. No Ray cluster is needed:
only staging runs here."""

from __future__ import annotations

import base64
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from domainsynth.cluster import staging as staging_api, submit as jobs_api
from domainsynth.cluster.cli import main
from domainsynth.pipelines.recipe import build_recipe, load_recipe

BIN = Path(sys.executable).parent
GIT_TOKEN = "ghp_0123456789abcdefSECRET"


def fake_private_key(kind: str = "OPENSSH") -> str:
    """A throwaway key's text: the PEM lines of a private key around random bytes (no real key is needed to be
    recognised as one)."""
    body = base64.encodebytes(os.urandom(96)).decode()
    return f"-----BEGIN {kind} PRIVATE KEY-----\n{body}-----END {kind} PRIVATE KEY-----\n"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# Every file of the demo folder, and whether staging sends it.
DATA_FILES = {
    "a.jsonl": '{"text": "alpha"}\n',
    "b.jsonl": '{"text": "beta beta"}\n',
    "keep.tmp": "kept: the .gitignore's '!keep.tmp' brings it back\n",
    "cache": "a file named like the folder-only pattern 'cache/'\n",
    "id_map.jsonl": '{"text": "not an ssh key"}\n',
    "sub/c.jsonl": '{"text": "gamma"}\n',
    "sub/top.txt": "the anchored '/top.txt' names only the folder's own\n",
    "sub/notes.log.txt": "not a .log\n",
}
SECRET_FILES = {
    ".env": "OPENAI_API_KEY=sk-live-1\n",
    ".env.production": "DB_PASSWORD=hunter2\n",
    ".git/config": f'[remote "origin"]\n\turl = https://{GIT_TOKEN}@github.com/me/data.git\n',
    ".git/HEAD": "ref: refs/heads/main\n",
    ".ray/auth_token": "ray-token-0123\n",
    "id_rsa": fake_private_key(),
    "id_ed25519.pub": "ssh-ed25519 AAAAC3Nza me@laptop\n",
    "server.pem": fake_private_key("RSA"),
    "tls.key": fake_private_key("EC"),
    "aws/credentials": "[default]\naws_secret_access_key = abc\n",
    ".aws/config": "[default]\nregion = eu-west-1\n",
    "sub/.ssh/known_hosts": "github.com ssh-ed25519 AAAA\n",
    "sub/.config/gcloud/application_default_credentials.json": "{}\n",
    "sub/.docker/config.json": '{"auths": {}}\n',
    ".kube/config": "apiVersion: v1\n",
    ".netrc": "machine x login y password z\n",
    ".pypirc": "[pypi]\npassword = x\n",
    ".npmrc": "//registry.npmjs.org/:_authToken=x\n",
}
IGNORED_FILES = {
    "scratch.tmp": "excluded by '*.tmp'\n",
    "top.txt": "excluded by the anchored '/top.txt'\n",
    "sub/cache/blob.bin": "excluded by the folder-only 'cache/'\n",
    "sub/drafts/deep/idea.md": "excluded by '**/drafts/**'\n",
    "sub/run.log": "excluded by sub/.rayignore\n",
}
GITIGNORE = "*.tmp\n!keep.tmp\n/top.txt\ncache/\n**/drafts/**\n"


@pytest.fixture
def demo_folder(tmp_path) -> Path:
    data = tmp_path / "data"
    for name, text in {**DATA_FILES, **SECRET_FILES, **IGNORED_FILES}.items():
        write(data / name, text)
    write(data / ".gitignore", GITIGNORE)
    write(data / "sub" / ".rayignore", "*.log\n")
    return data


def folder_recipe(tmp_path: Path, *corpus: str) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"run_dir": "s3://bucket/run", "embed": {"corpus": list(corpus) or "data"}}))
    return recipe


def staged_files(staging: Path) -> set[str]:
    return {str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file()}


def test_a_folder_input_goes_without_its_secrets_and_ignored_files(tmp_path, demo_folder):
    staging = tmp_path / "staging"
    staging.mkdir()
    said: list[str] = []
    recipe_name = staging_api.stage(load_recipe(str(folder_recipe(tmp_path))), str(staging), echo=said.append)
    assert said == [f"left out {len(SECRET_FILES) + len(IGNORED_FILES) + 2} files of the inputs (secrets, ignore files "
                    f"and what they exclude): domainsynth submit --dry-run lists them"]
    # Exactly the data files: none missing (the ignore files are applied, not copied), no secret, no ignored file.
    assert staged_files(staging) == {"recipe.yaml"} | {f"inputs/0/data/{name}" for name in DATA_FILES}
    for name, text in DATA_FILES.items():
        assert (staging / "inputs/0/data" / name).read_text() == text
    everything = b"".join(p.read_bytes() for p in staging.rglob("*") if p.is_file())
    assert GIT_TOKEN.encode() not in everything and b"PRIVATE KEY" not in everything
    assert load_recipe(str(staging / recipe_name)).embed.corpus == [str(staging / "inputs/0/data")]


def test_every_secret_pattern_is_left_out_for_its_own_reason(tmp_path, demo_folder):
    plan = staging_api.plan_staging(load_recipe(str(folder_recipe(tmp_path))))
    reasons = {o.target.removeprefix("inputs/0/data/"): o.reason for o in plan.left_out}
    assert reasons == {
        ".git/": "built-in: .git/", ".ray/": "built-in: .ray/", ".aws/": "built-in: .aws/",
        ".kube/": "built-in: .kube/", "sub/.ssh/": "built-in: .ssh/",
        "sub/.config/gcloud/": "built-in: **/.config/gcloud/",
        ".env": "built-in: .env*", ".env.production": "built-in: .env*", "id_rsa": "built-in: id_rsa*",
        "id_ed25519.pub": "built-in: id_ed25519*", "server.pem": "built-in: *.pem", "tls.key": "built-in: *.key",
        "aws/credentials": "built-in: *credentials*", "sub/.docker/config.json": "built-in: **/.docker/config.json",
        ".netrc": "built-in: .netrc", ".pypirc": "built-in: .pypirc", ".npmrc": "built-in: .npmrc",
        ".gitignore": staging_api.IGNORE_FILE_REASON,
        "sub/.rayignore": staging_api.IGNORE_FILE_REASON,
        "scratch.tmp": f".gitignore in {demo_folder}", "top.txt": f".gitignore in {demo_folder}",
        "sub/cache/": f".gitignore in {demo_folder}", "sub/drafts/": f".gitignore in {demo_folder}",
        "sub/run.log": f".rayignore in {demo_folder / 'sub'}",
    }
    assert not plan.refused


def test_a_glob_input_gets_the_same_rules(tmp_path):
    shards = tmp_path / "shards"
    for name in ("a.jsonl", "nested/b.jsonl", "nested/c.tmp", "logs/x.jsonl", "credentials.jsonl", "keys/id_rsa"):
        write(shards / name, '{"text": "x"}\n')
    write(shards / ".gitignore", "*.tmp\n")
    write(shards / ".rayignore", "logs/\n")
    plan = staging_api.plan_staging(load_recipe(str(folder_recipe(tmp_path, "shards/*"))))
    assert [f.target for f in plan.files] == ["inputs/0/a.jsonl", "inputs/0/nested/b.jsonl"]
    assert {o.target: o.reason for o in plan.left_out} == {
        "inputs/0/credentials.jsonl": "built-in: *credentials*", "inputs/0/keys/id_rsa": "built-in: id_rsa*",
        "inputs/0/logs/x.jsonl": f".rayignore in {shards}", "inputs/0/nested/c.tmp": f".gitignore in {shards}"}


def test_a_private_key_under_an_innocuous_name_stops_the_submission(tmp_path, demo_folder, capsys):
    write(demo_folder / "notes" / "notes.txt", "meeting notes\n" + fake_private_key("ENCRYPTED"))
    recipe = folder_recipe(tmp_path)
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(staging_api.StagingRefused, match=r"notes/notes\.txt: it holds a private key"):
        staging_api.stage(load_recipe(str(recipe)), str(staging), echo=lambda _: None)
    assert not list(staging.iterdir())  # nothing copied
    # Through the CLI: exit 2, the file named, before any cluster is contacted (nothing listens on port 1).
    assert main(["submit", str(recipe), "--address", "http://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert f"{demo_folder}/notes/notes.txt: it holds a private key" in err and "cannot reach" not in err
    assert main(["submit", str(recipe), "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert "Refused (submit would stop here):" in captured.out and "notes/notes.txt" in captured.err


@pytest.mark.parametrize("kind", ["RSA", "EC", "DSA", "OPENSSH", "ENCRYPTED", None])
def test_every_pem_private_key_kind_is_recognised(tmp_path, kind):
    key = tmp_path / "k.txt"
    key.write_text(fake_private_key(kind) if kind else fake_private_key("X").replace("X ", ""))
    assert staging_api.holds_private_key(str(key))
    key.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    assert not staging_api.holds_private_key(str(key))


def test_an_input_named_directly_is_refused_when_it_is_a_secret(tmp_path):
    write(tmp_path / "notes.jsonl", fake_private_key())
    write(tmp_path / "aws_credentials.jsonl", '{"text": "x"}\n')
    plan = staging_api.plan_staging(build_recipe({"run_dir": "s3://b/r", "embed": {
        "corpus": ["notes.jsonl", "aws_credentials.jsonl"]}}, "test", str(tmp_path)))
    assert plan.refused == [
        f"{tmp_path}/notes.jsonl: the recipe names it and it holds a private key (a '-----BEGIN ... PRIVATE KEY-----' "
        "line); take it out of the recipe",
        f"{tmp_path}/aws_credentials.jsonl: the recipe names it and it is never staged (built-in: *credentials*)"]
    assert not plan.files


def test_a_folder_kept_wholly_out_of_git_is_refused_unless_rays_switch_says_so(tmp_path, monkeypatch):
    write(tmp_path / "data" / "part-0.jsonl", '{"text": "x"}\n')
    write(tmp_path / "data" / ".gitignore", "*\n!.gitignore\n")
    recipe = load_recipe(str(folder_recipe(tmp_path)))
    with pytest.raises(staging_api.StagingRefused, match=r"data: every file of it is left out \(\.gitignore in .*data\)"
                                                  r".*RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1"):
        staging_api.check_plan(staging_api.plan_staging(recipe))
    monkeypatch.setenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "1")
    write(tmp_path / "data" / ".env", "X=1\n")
    plan = staging_api.plan_staging(recipe)
    assert [f.target for f in plan.files] == ["inputs/0/data/part-0.jsonl"] and not plan.refused
    assert {o.reason for o in plan.left_out} == {"built-in: .env*", staging_api.IGNORE_FILE_REASON}


def expect_dry_run_listing(out: str, demo_folder: Path) -> None:
    assert out.startswith("Dry run: nothing is sent and no cluster is contacted.")
    assert f"inputs/0/data  <-  {demo_folder} (embed.corpus)" in out
    listed = {line.split()[-1]: " ".join(line.split()[:2]) for line in out.split("Left out")[0].splitlines()
              if line.startswith("  ") and " B  " in line}
    assert {k: v for k, v in listed.items() if k != "recipe.yaml"} == {
        f"inputs/0/data/{name}": f"{len(text.encode())} B" for name, text in DATA_FILES.items()}
    total = int(listed.pop("recipe.yaml").split()[0]) + sum(len(text.encode()) for text in DATA_FILES.values())
    assert f"  {len(DATA_FILES) + 1} files, {staging_api._size(total)} (the Ray Jobs API takes at most 100.0 MiB)" in out
    left_out = out.split(f"Left out ({len(SECRET_FILES) + len(IGNORED_FILES) + 2} files):\n")[1]
    reasons = dict(re.fullmatch(r"  (\S+(?: \(\d+ files?\))?) +(.+)", line).groups() for line in left_out.splitlines())
    assert reasons["inputs/0/data/.git/ (2 files)"] == "built-in: .git/"
    assert reasons["inputs/0/data/.env"] == reasons["inputs/0/data/.env.production"] == "built-in: .env*"
    assert reasons["inputs/0/data/id_rsa"] == "built-in: id_rsa*"
    assert reasons["inputs/0/data/scratch.tmp"] == f".gitignore in {demo_folder}"
    assert reasons["inputs/0/data/sub/run.log"] == f".rayignore in {demo_folder / 'sub'}"
    assert len(reasons) == len(SECRET_FILES) + len(IGNORED_FILES) + 2 - 1  # .git's two files on one line
    assert "Refused" not in out


def test_dry_run_lists_files_sizes_and_exclusions_and_contacts_nothing(tmp_path, demo_folder, capsys, monkeypatch):
    def no_cluster(*args, **kwargs):
        raise AssertionError("--dry-run contacted a cluster")

    monkeypatch.setattr(jobs_api, "connect", no_cluster)
    monkeypatch.setattr(jobs_api.requests, "get", no_cluster)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert main(["submit", str(folder_recipe(tmp_path)), "--dry-run"]) == 0
    captured = capsys.readouterr()
    expect_dry_run_listing(captured.out, demo_folder)
    assert captured.err == ""


def test_dry_run_as_a_command_sends_nothing_to_the_address_it_is_given(tmp_path, demo_folder):
    with socket.socket() as listener:  # a "dashboard" that records whether anyone knocked
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        address = f"http://127.0.0.1:{listener.getsockname()[1]}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        result = subprocess.run([str(BIN / "domainsynth"), "submit", str(folder_recipe(tmp_path)), "--dry-run",
                                 "--address", address], env={**env, "RAY_ADDRESS": address}, cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert result.returncode == 0, result.stderr
    expect_dry_run_listing(result.stdout, demo_folder)
