"""Malformed rows never crash a run and never vanish: each kind lands in quarantine.jsonl with file, line, reason."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from domainsynth.pipelines.recipe import build_recipe
from domainsynth.pipelines.runner import run_recipe

from conftest import write_jsonl

GOOD_ROWS = 30


def _good_lines(general_pool) -> list[str]:
    return [json.dumps({"id": f"good-{i}", "text": r["text"]}) for i, r in enumerate(general_pool[:GOOD_ROWS])]


BAD_KINDS = {
    # kind: (bad lines as bytes, expected reason prefix)
    "invalid_json": ([b'{"id": "x", "text": "unterminated', b"{not json at all}"], "invalid JSON"),
    "not_an_object": ([b'["a", "list"]', b"42", b'"just a string"'], "not a JSON object"),
    "missing_text": ([b'{"id": "m1", "body": "text under another name"}', b'{"id": "m2", "text": null}'],
                     "missing text field 'text'"),
    "non_string_text": ([b'{"id": "n1", "text": 12345}', b'{"id": "n2", "text": ["a", "b"]}',
                         b'{"id": "n3", "text": {"nested": true}}'], "text field 'text' is not a string"),
    "empty_text": ([b'{"id": "e1", "text": ""}', b'{"id": "e2", "text": "   \\n\\t "}'], "empty text"),
    "invalid_utf8": ([b'{"id": "u1", "text": "caf\xe9 au lait"}'], "invalid UTF-8"),
}


def _select(run_dir, corpus, classifier):
    recipe = build_recipe({"run_dir": str(run_dir), "select": {
        "in_domain": str(corpus), "corpus": str(corpus), "classifier": str(classifier), "threshold": 0.0,
        "dedup": False, "quality": {"scorer": "none"}}}, "test", "/")
    return run_recipe(recipe, echo=lambda _: None)["select"]


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_each_kind_of_malformed_row_is_quarantined_with_file_line_and_reason(kind, classifier, general_pool, tmp_path):
    bad_lines, reason = BAD_KINDS[kind]
    good = _good_lines(general_pool)
    # Interleave: bad rows at known line numbers between good ones; blank lines are not rows.
    lines, bad_line_numbers = [], []
    for i, line in enumerate(good):
        lines.append(line.encode())
        if i % 7 == 3 and len(bad_line_numbers) < len(bad_lines):
            lines.append(bad_lines[len(bad_line_numbers)])
            bad_line_numbers.append(len(lines))
    lines.append(b"")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b"\n".join(lines) + b"\n")

    report = _select(tmp_path / "run", corpus, classifier)

    quarantine = [json.loads(l) for l in (tmp_path / "run" / "select" / "quarantine.jsonl").read_text().splitlines()]
    corpus_q = [q for q in quarantine if q["input"] == "corpus"]
    assert len(corpus_q) == len(bad_lines) == report["rows_quarantined"]
    assert [q["line"] for q in corpus_q] == bad_line_numbers
    assert all(q["file"] == "corpus.jsonl" and q["reason"].startswith(reason) for q in corpus_q)
    # The in-domain file is the same file here: its bad rows are quarantined too, marked as such.
    assert sum(q["input"] == "in_domain" for q in quarantine) == 0  # classifier reused: in-domain file unread
    assert report["rows_in"] == GOOD_ROWS + len(bad_lines)
    assert report["rows_out"] == GOOD_ROWS  # threshold 0 keeps every good row
    kept = pads.dataset(str(tmp_path / "run" / "select" / "data")).to_table()
    assert sorted(kept.column("id").to_pylist()) == sorted(f"good-{i}" for i in range(GOOD_ROWS))


def test_parquet_gzip_and_glob_inputs_with_derived_ids(classifier, general_pool, tmp_path):
    texts = [r["text"] for r in general_pool[:20]]
    (tmp_path / "in").mkdir()
    # Parquet: row 3 has a null text and is quarantined with its row number as the line.
    pq.write_table(pa.table({"text": texts[:5] + [None], "lang": ["en"] * 6}), tmp_path / "in" / "a.parquet")
    with gzip.open(tmp_path / "in" / "b.jsonl.gz", "wt") as f:
        for t in texts[5:]:
            f.write(json.dumps({"text": t, "meta": {"n": 1}}) + "\n")
    write_jsonl(tmp_path / "in" / "ignored.txt", [{"text": "not matched by the glob"}])

    report = _select(tmp_path / "run", str(tmp_path / "in" / "*.*[qz]*"), classifier)

    assert report["rows_in"] == 21 and report["rows_quarantined"] == 1 and report["rows_out"] == 20
    q = json.loads((tmp_path / "run" / "select" / "quarantine.jsonl").read_text())
    assert (q["file"], q["line"], q["reason"]) == ("a.parquet", 6, "missing text field 'text'")
    # Files from differently shaped inputs keep their own columns: read each file with its own schema.
    rows = [r for f in sorted((tmp_path / "run" / "select" / "data").glob("*.parquet"))
            for r in pq.read_table(f).to_pylist()]
    ids = {r["id"] for r in rows}
    assert {"a.parquet:1", "a.parquet:5", "b.jsonl.gz:1", "b.jsonl.gz:15"} <= ids
    assert all(r["lang"] == "en" for r in rows if r["id"].startswith("a."))
    assert all(r["meta"] == {"n": 1} for r in rows if r["id"].startswith("b."))


def test_bad_in_domain_rows_are_quarantined_not_fatal(ray_local, general_pool, tmp_path):
    in_domain = tmp_path / "in_domain.jsonl"
    rows = [json.dumps({"text": r["text"]}) for r in general_pool[:40]]
    rows.insert(5, '{"text": 7}')
    in_domain.write_text("\n".join(rows) + "\n")
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": r["text"]} for r in general_pool[1000:1300]])
    recipe = build_recipe({"run_dir": str(tmp_path / "run"), "select": {
        "in_domain": str(in_domain), "corpus": str(corpus), "quality": {"scorer": "none"}}}, "test", "/")
    report = run_recipe(recipe, echo=lambda _: None)["select"]
    q = [json.loads(l) for l in (tmp_path / "run" / "select" / "quarantine.jsonl").read_text().splitlines()]
    assert q == [{"input": "in_domain", "file": "in_domain.jsonl", "line": 6,
                  "reason": "text field 'text' is not a string (got int)", "raw": '{"text": 7}'}]
    assert report["in_domain_rows_quarantined"] == 1 and report["rows_quarantined"] == 0
