"""The embed stage (CRAFT step 1) on a real local Ray with the bundled all-MiniLM-L6-v2: every usable row gets one
normalised float16 vector equal to what SentenceTransformer.encode gives in this process; malformed rows are
quarantined, not embedded."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.dataset as pads

from domainsynth.actors.embedding import arrow_to_vectors, encode, load_sentence_model
from domainsynth.pipelines.recipe import build_recipe
from domainsynth.pipelines.runner import run_recipe

from conftest import write_jsonl


def test_embed_writes_one_normalised_vector_per_usable_row(ray_local, general_pool, tmp_path):
    rows = [{"id": f"d{i}", "text": r["text"]} for i, r in enumerate(general_pool[:120])]
    write_jsonl(tmp_path / "corpus" / "a.jsonl", rows[:60])
    bad = tmp_path / "corpus" / "b.jsonl"
    bad.write_text("\n".join([json.dumps(r) for r in rows[60:]] + ['{"id": "x", "text": ""}', "{oops"]) + "\n")

    recipe = build_recipe({"run_dir": str(tmp_path / "run"), "embed": {
        "corpus": str(tmp_path / "corpus"), "batch_size": 16, "max_seq_length": 128}}, "test", "/")
    report = run_recipe(recipe, echo=lambda _: None)["embed"]

    assert (report["rows_in"], report["rows_out"], report["rows_quarantined"]) == (122, 120, 2)
    quarantine = [json.loads(l) for l in (tmp_path / "run" / "embed" / "quarantine.jsonl").read_text().splitlines()]
    assert [(q["file"], q["line"]) for q in quarantine] == [("b.jsonl", 61), ("b.jsonl", 62)]
    table = pads.dataset(str(tmp_path / "run" / "embed" / "data")).to_table()
    assert table.schema.field("embedding").type.value_type.bit_width == 16
    assert sorted(table.column("id").to_pylist()) == sorted(r["id"] for r in rows)

    vectors = arrow_to_vectors(table.column("embedding"))
    assert vectors.shape == (120, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)
    model = load_sentence_model("all-MiniLM-L6-v2", max_seq_length=128)
    by_id = {r["id"]: r["text"] for r in rows}
    expected = encode(model, [by_id[i] for i in table.column("id").to_pylist()], 16).astype(np.float32)
    np.testing.assert_allclose(vectors, expected, atol=2e-3)
