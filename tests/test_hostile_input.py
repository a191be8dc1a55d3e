"""Hostile and careless input: no row hangs or crashes a stage, nothing vanishes, ids stay unique, a failed stage
leaves nothing behind. Every fixture is made here (no committed binaries)."""

from __future__ import annotations

import gzip
import io
import json
import zlib
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest

from domainsynth.pipelines import corpus
from domainsynth.pipelines.corpus import MAX_JSON_DEPTH, MAX_LINE_BYTES, GunzipStream, _FileBlocks
from domainsynth.pipelines.recipe import build_recipe
from domainsynth.pipelines.runner import run_recipe

from conftest import write_jsonl

DEEP = b'{"id": "deep", "text": "t", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # crashed Arrow's reader
SURROGATE = b'{"id": "surrogate", "text": "half a pair: \\ud800 here"}'


# --------------------------------------------------------------------------------------------- the reader itself
def _read(data: bytes) -> list[dict]:
    blocks = _FileBlocks(0, "f.jsonl", "text", "id").jsonl(io.BytesIO(data))
    return [r for b in blocks for r in b.select(["id", corpus.SOURCE_LINE, corpus.QUARANTINE_REASON]).to_pylist()]


def test_each_hostile_line_is_quarantined_with_its_line_and_the_rest_is_read():
    nested = lambda depth: b'{"id": "n%d", "text": "t", "x": ' % depth + b"[" * depth + b"]" * depth + b"}"
    lines = [b'{"id": "a", "text": "first"}', DEEP, SURROGATE,
             b'{"id": "pair", "text": "a real pair \\ud83d\\ude00 is fine"}',
             nested(MAX_JSON_DEPTH - 1), nested(MAX_JSON_DEPTH),  # the object itself is one level
             b'{"id": "brackets", "text": "' + b"[{" * 500 + b'"}',  # brackets inside a string are text
             b'{"id": "obj", "text": "t", "x": ' + b'{"a": ' * 1000 + b"1" + b"}" * 1000 + b"}",
             b'{"id": "long", "text": "' + b"a" * (MAX_LINE_BYTES + 10) + b'"}',
             b"not json", b'{"id": "z", "text": "last"}']
    rows = _read(b"\n".join(lines) + b"\n")
    reasons = {r["_source_line"]: r["_quarantine_reason"] for r in rows}
    assert len(rows) == len(lines)
    assert reasons[2].startswith("JSON nested 100001 levels deep")
    assert reasons[3].startswith("lone UTF-16 surrogate")
    assert reasons[4] is None and reasons[5] is None  # a valid pair; depth exactly at the limit
    assert reasons[6].startswith(f"JSON nested {MAX_JSON_DEPTH + 1} levels")
    assert reasons[7] is None
    assert reasons[8].startswith("JSON nested 1001 levels")
    assert reasons[9].startswith("line longer than")
    assert reasons[10].startswith("invalid JSON")
    assert {r["id"] for r in rows if r["_quarantine_reason"] is None} == {"a", "pair", f"n{MAX_JSON_DEPTH - 1}",
                                                                          "brackets", "z"}


def test_a_file_without_newlines_is_never_held_whole():
    data = b'{"id": "x", "text": "' + b"b" * (3 * MAX_LINE_BYTES) + b'"}\n{"id": "y", "text": "after"}'
    rows = _read(data)
    assert [(r["_source_line"], r["_quarantine_reason"] is None) for r in rows] == [(1, False), (2, True)]


def _gz_rows(n: int, prefix: str) -> bytes:
    return gzip.compress("".join(json.dumps({"id": f"{prefix}{i}", "text": f"row {i} " * 20}) + "\n"
                                 for i in range(n)).encode())


def _complete_lines(compressed: bytes) -> int:
    """What any gzip reader can get out of a truncated file: the complete lines of its decodable prefix."""
    return zlib.decompressobj(wbits=31).decompress(compressed).count(b"\n")


def test_truncated_and_corrupt_gzip_keep_every_row_before_the_break(tmp_path):
    whole = _gz_rows(3000, "r")
    truncated = whole[: len(whole) // 2]
    (tmp_path / "t.jsonl.gz").write_bytes(truncated)
    (tmp_path / "c.jsonl.gz").write_bytes(whole[:40] + bytes(200) + whole[240:])
    (tmp_path / "m.jsonl.gz").write_bytes(_gz_rows(5, "a") + _gz_rows(7, "b"))  # two members, as bgzip writes
    fs = pafs.LocalFileSystem()

    def read(name):
        with GunzipStream(fs.open_input_stream(str(tmp_path / name), compression=None)) as f:
            return _read_stream(f)

    rows = read("t.jsonl.gz")
    good = [r for r in rows if r["_quarantine_reason"] is None]
    assert len(good) == _complete_lines(truncated) > 0
    assert rows[-1]["_quarantine_reason"].startswith("the file breaks off here (truncated gzip")
    assert rows[-1]["_source_line"] == len(good) + 1
    assert read("c.jsonl.gz")[-1]["_quarantine_reason"].startswith("the file breaks off here (corrupt gzip")
    assert [r["id"] for r in read("m.jsonl.gz")] == [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(7)]


def _read_stream(f) -> list[dict]:
    blocks = _FileBlocks(0, "f.jsonl.gz", "text", "id").jsonl(f)
    return [r for b in blocks for r in b.select(["id", corpus.SOURCE_LINE, corpus.QUARANTINE_REASON]).to_pylist()]


# ------------------------------------------------------------------------------------------- through the stages
@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory, general_pool, medical_abstracts) -> dict:
    """A corpus folder as a careless user has one: good files, a truncated download, a file of bad rows, an id used
    twice, and files that are not inputs."""
    root = tmp_path_factory.mktemp("hostile") / "corpus"
    good = [{"id": f"g{i}", "text": r["text"]} for i, r in enumerate(general_pool[:150])]
    good += [{"id": f"m{i}", "text": r["text"]} for i, r in enumerate(medical_abstracts[:50])]
    write_jsonl(root / "good.jsonl.gz", good)
    whole = gzip.compress("".join(json.dumps({"id": f"t{i}", "text": r["text"]}) + "\n"
                                  for i, r in enumerate(general_pool[150:450])).encode())
    truncated = whole[: len(whole) // 2]
    (root / "truncated.jsonl.gz").write_bytes(truncated)
    bad = [json.dumps({"id": "b1", "text": medical_abstracts[60]["text"]}).encode(), DEEP, SURROGATE,
           b"{not json", json.dumps({"id": "g0", "text": medical_abstracts[61]["text"]}).encode(),  # g0 again
           json.dumps({"id": "b2", "text": medical_abstracts[62]["text"]}).encode()]
    (root / "bad_rows.jsonl").write_bytes(b"\n".join(bad) + b"\n")
    (root / "notes.txt").write_text("not an input")
    write_jsonl(root / ".hidden.jsonl", [{"id": "h", "text": "hidden"}])
    return {"root": root, "good_rows": len(good) + 3, "truncated_rows": _complete_lines(truncated),
            "bad": {("bad_rows.jsonl", 2): "JSON nested", ("bad_rows.jsonl", 3): "lone UTF-16 surrogate",
                    ("bad_rows.jsonl", 4): "invalid JSON",
                    ("truncated.jsonl.gz", _complete_lines(truncated) + 1): "the file breaks off here"}}


def _quarantine(stage_dir: Path) -> dict:
    rows = [json.loads(line) for line in (stage_dir / "quarantine.jsonl").read_text().splitlines()]
    return {(q["file"], q["line"]): q["reason"] for q in rows}


def _assert_quarantined_as_expected(stage_dir: Path, folder: dict) -> None:
    found = _quarantine(stage_dir)
    assert set(found) == set(folder["bad"])
    assert all(found[where].startswith(reason) for where, reason in folder["bad"].items())


def _ids(uri: Path) -> list[str]:
    return pads.dataset(str(uri), format="parquet").to_table(columns=["id"]).column("id").to_pylist()


@pytest.mark.timeout(300)
def test_select_quarantines_bad_rows_reads_the_rest_and_makes_ids_unique(classifier, hostile_folder, tmp_path):
    recipe = build_recipe({"run_dir": str(tmp_path), "select": {
        "in_domain": str(hostile_folder["root"] / "good.jsonl.gz"), "corpus": str(hostile_folder["root"]),
        "classifier": str(classifier), "threshold": 0.0, "dedup": False, "quality": {"scorer": "none"}}}, "test", "/")
    report = run_recipe(recipe, echo=lambda _: None)["select"]

    _assert_quarantined_as_expected(tmp_path / "select", hostile_folder)
    readable = hostile_folder["good_rows"] + hostile_folder["truncated_rows"]
    assert report["rows_in"] == readable + len(hostile_folder["bad"])
    assert report["rows_out"] == readable  # threshold 0: every readable row
    ids = _ids(tmp_path / "select" / "data")
    assert len(ids) == len(set(ids)) == readable
    # The rule: "bad_rows.jsonl" sorts before "good.jsonl.gz", so its g0 keeps the id and the other becomes g0#2.
    assert report["ids_made_unique"] == 1 and "g0" in ids and "g0#2" in ids
    rows = pads.dataset(str(tmp_path / "select" / "data")).to_table(columns=["id", "_source_file"]).to_pylist()
    assert {r["id"]: r["_source_file"] for r in rows}["g0#2"] == "good.jsonl.gz"
    skipped = {Path(f["path"]).name: f["reason"] for f in report["skipped_files"]["select.corpus"]}
    assert set(skipped) == {"notes.txt", ".hidden.jsonl"}
    assert skipped[".hidden.jsonl"].startswith("hidden") and skipped["notes.txt"].startswith("not .jsonl")
    assert "notes.txt" in (tmp_path / "select" / "report.md").read_text()


@pytest.mark.timeout(300)
def test_embed_and_qc_take_the_same_folder_without_crashing(ray_local, hostile_folder, tmp_path):
    recipe = build_recipe({"run_dir": str(tmp_path), "embed": {"corpus": str(hostile_folder["root"])},
                           "qc": {"input": str(hostile_folder["root"]), "diversity": {"sample": 0}}}, "test", "/")
    reports = run_recipe(recipe, echo=lambda _: None)
    readable = hostile_folder["good_rows"] + hostile_folder["truncated_rows"]
    for stage in ("embed", "qc"):
        _assert_quarantined_as_expected(tmp_path / stage, hostile_folder)
        assert reports[stage]["rows_in"] == readable + len(hostile_folder["bad"])
        assert reports[stage]["ids_made_unique"] == 1
    assert reports["embed"]["rows_out"] == readable
    ids = _ids(tmp_path / "embed" / "data")
    assert len(ids) == len(set(ids)) == readable
    qc_ids = _ids(tmp_path / "qc" / "data") + _ids(tmp_path / "qc" / "dropped")
    assert len(qc_ids) == len(set(qc_ids)) == readable


@pytest.mark.timeout(300)
def test_generate_quarantines_unusable_prompts_and_answers_the_others(ray_local, tiny_llama, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b"\n".join([b'{"id": "p1", "prompt": "What is a gene?"}',
                                    b'{"id": "p2", "prompt": "half \\udc00 a pair"}', DEEP.replace(b'"text"', b'"prompt"'),
                                    b'{"id": "p1", "prompt": "Same id, another prompt"}']) + b"\n")
    recipe = build_recipe({"run_dir": str(tmp_path / "run"), "generate": {
        "prompts": str(prompts), "model": tiny_llama, "sampling": {"max_tokens": 4, "n": 2, "seed": 0}}},
        "test", "/")
    report = run_recipe(recipe, echo=lambda _: None)["generate"]
    found = _quarantine(tmp_path / "run" / "generate")
    assert set(found) == {("prompts.jsonl", 2), ("prompts.jsonl", 3)}
    assert report["rows_in"] == 4 and report["rows_out"] == 2 and report["completions"] == 4
    rows = pads.dataset(str(tmp_path / "run" / "generate" / "data")).to_table(columns=["id", "choice"]).to_pylist()
    # two completions per prompt share their prompt's id; the second prompt with id p1 became p1#2
    assert sorted((r["id"], r["choice"]) for r in rows) == [("p1", 0), ("p1", 1), ("p1#2", 0), ("p1#2", 1)]
    assert report["ids_made_unique"] == 2


@pytest.mark.timeout(300)
def test_a_stage_that_fails_leaves_nothing_behind(ray_local, general_pool, tmp_path):
    corpus_file = write_jsonl(tmp_path / "c.jsonl", [{"id": str(i), "text": r["text"]}
                                                      for i, r in enumerate(general_pool[:50])])
    not_a_model = tmp_path / "classifier.bin"
    not_a_model.write_bytes(b"this is not a fastText model")
    recipe = build_recipe({"run_dir": str(tmp_path / "run"), "select": {
        "in_domain": str(corpus_file), "corpus": str(corpus_file), "classifier": str(not_a_model),
        "quality": {"scorer": "none"}}}, "test", "/")
    with pytest.raises(Exception):
        run_recipe(recipe, echo=lambda _: None)
    assert not (tmp_path / "run" / "select").exists()


@pytest.mark.timeout(300)
def test_a_read_task_that_keeps_dying_fails_the_read_after_bounded_retries(ray_local, tmp_path):
    """A row that crashes a parser kills the read task's process, not just the task; Ray Data's default is to retry
    that forever. Here the read task's worker is killed on every attempt (found among the children of this test's
    own raylet, by the title Ray gives a process running a task), and the read must give up after
    READ_TASK_RETRIES retries."""
    import threading
    import time

    import psutil
    import ray

    slow = tmp_path / "slow.jsonl.gz"  # ~1 GB of blank lines: seconds to read, so an attempt can be caught
    packer = zlib.compressobj(1, wbits=31)
    with open(slow, "wb") as f:
        block = (b" " * 1023 + b"\n") * 1024
        for _ in range(1024):
            f.write(packer.compress(block))
        f.write(packer.flush())
    outcome: dict = {}

    def read() -> None:
        try:
            corpus.read_corpus(corpus.CorpusSpec([str(slow)])).materialize()
            outcome["error"] = None
        except Exception as e:  # noqa: BLE001 - what the read raises is the result under test
            outcome["error"] = e

    raylet = psutil.Process(ray._private.worker._global_node.all_processes["raylet"][0].process.pid)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    killed: set[int] = set()
    deadline = time.monotonic() + 240
    while reader.is_alive() and time.monotonic() < deadline:
        for child in raylet.children():
            try:
                running_a_read = child.cmdline()[:1] and child.cmdline()[0].startswith("ray::ReadCorpus")
            except psutil.Error:
                continue
            if running_a_read and child.pid not in killed:
                killed.add(child.pid)
                child.kill()
        time.sleep(0.05)
    reader.join(timeout=30)
    assert not reader.is_alive(), f"the read was still retrying after {len(killed)} killed attempts"
    assert outcome["error"] is not None
    assert len(killed) == corpus.READ_TASK_RETRIES + 1


# ------------------------------------------------------------------------------------------------- the CLI's edges
def _exit_and_message(argv, capsys) -> tuple[int, str]:
    from domainsynth.cluster.cli import main

    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_bad_arguments_and_recipes_end_with_exit_2_naming_the_file_or_field(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "a document"}])
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    (tmp_path / "a_folder").mkdir()
    not_utf8 = tmp_path / "latin1.yaml"
    not_utf8.write_bytes("run_dir: caf\xe9\n".encode("latin-1"))
    no_model = tmp_path / "no_model"
    no_model.mkdir()
    select = ["select", "--in-domain", str(good), "--corpus", str(good), "--out", str(tmp_path / "run")]
    cases = [
        (select + ["--set", "select.keep_fraction=[1"], "--set 'select.keep_fraction=[1': the value is not valid YAML"),
        (["run", str(tmp_path / "a_folder")], "a_folder: is a directory; expected a recipe file"),
        (["run", str(not_utf8)], "latin1.yaml: not UTF-8 text"),
        (select + ["--num-cpus", "0"], "--num-cpus: expected a whole number > 0, got '0'"),
        (select + ["--num-cpus", "-1"], "--num-cpus: expected a whole number > 0, got '-1'"),
        (["select", "--in-domain", str(good), "--corpus", str(empty), "--out", str(tmp_path / "run")],
         "select.corpus: the input is empty"),
        (["generate", "--prompts", str(good), "--model", str(no_model), "--out", str(tmp_path / "run")],
         "generate.model: '" + str(no_model) + "' holds no model"),
    ]
    for argv, expected in cases:
        code, err = _exit_and_message(argv, capsys)
        assert (code, expected in err) == (2, True), (argv, err)
    # An address nothing listens on: a process of its own (in this one, the session's Ray is up and used as it is).
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "domainsynth.cluster.cli", *select, "--address", "127.0.0.1:1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--address 127.0.0.1:1: no Ray cluster answers there" in done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(300)
def test_a_corpus_without_usable_rows_says_so(classifier, tmp_path, capsys):
    in_domain = write_jsonl(tmp_path / "in.jsonl", [{"text": f"in-domain text number {i}"} for i in range(20)])
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n\n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": 1}\n{oops\n')
    for corpus_file, expected in ((blank, "select.corpus: the corpus is empty: no rows"),
                                  (broken, "select.corpus: no usable rows in " + str(broken) + ": all 2 rows are "
                                           "malformed (first: broken.jsonl, line 1: text field 'text' is not a "
                                           "string")):
        code, err = _exit_and_message(["select", "--in-domain", str(in_domain), "--corpus", str(corpus_file),
                                       "--out", str(tmp_path / "run")], capsys)
        assert code == 1 and expected in err, err
        assert not (tmp_path / "run" / "select").exists()
