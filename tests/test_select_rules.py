"""The select stage's keep rules: exact dedup on normalised text, the hf:MODEL quality scorer (with a tiny Llama
classifier built here, no download), and resource checks that fail before any work."""

from __future__ import annotations


import numpy as np
import pyarrow.dataset as pads
import pytest

from domainsynth.actors.quality import HFQualityScorer
from domainsynth.actors.tiny_models import make_tiny_llama
from domainsynth.pipelines.recipe import build_recipe
from domainsynth.pipelines.runner import run_recipe
from domainsynth.pipelines.curation.select import SelectError, scorer_pool_size

from conftest import write_jsonl


def _run_select(run_dir, corpus, classifier, **select):
    recipe = build_recipe({"run_dir": str(run_dir), "select": {
        "in_domain": str(corpus), "corpus": str(corpus), "classifier": str(classifier), "threshold": 0.0,
        "quality": {"scorer": "none"}, **select}}, "test", "/")
    return run_recipe(recipe, echo=lambda _: None)["select"]


def _kept(run_dir):
    return pads.dataset(str(run_dir / "select" / "data")).to_table()


def test_exact_duplicates_after_normalisation_are_dropped_keeping_the_first(classifier, general_pool, tmp_path):
    originals = [{"id": f"orig-{i}", "text": r["text"]} for i, r in enumerate(general_pool[:40])]
    # Copies that differ only in case, spacing and the spacing of punctuation; one sits in a later file.
    variants = [
        {"id": "dup-upper", "text": originals[3]["text"].upper()},
        {"id": "dup-spaces", "text": "  " + originals[7]["text"].replace(" ", "   \n ") + "\t"},
        {"id": "dup-exact", "text": originals[11]["text"]},
        {"id": "dup-punct", "text": originals[12]["text"].replace(".", " .").replace(",", " , ")},
    ]
    near_but_different = {"id": "not-a-dup", "text": originals[5]["text"] + " One more sentence."}
    write_jsonl(tmp_path / "corpus" / "a.jsonl", originals[:20] + variants[:2] + [near_but_different])
    write_jsonl(tmp_path / "corpus" / "b.jsonl", originals[20:] + variants[2:])

    report = _run_select(tmp_path / "run", tmp_path / "corpus", classifier)

    assert report["rows_filtered"]["duplicate"] == len(variants)
    assert report["rows_in"] == report["rows_out"] + sum(report["rows_filtered"].values())
    ids = set(_kept(tmp_path / "run").column("id").to_pylist())
    assert ids == {r["id"] for r in originals} | {"not-a-dup"}

    report_off = _run_select(tmp_path / "run-off", tmp_path / "corpus", classifier, dedup=False)
    assert report_off["rows_filtered"]["duplicate"] == 0 and report_off["rows_out"] == len(originals) + 5


@pytest.fixture(scope="module")
def tiny_quality_model(tmp_path_factory):
    """A tiny Llama with a regression head, standing in for e.g. HuggingFaceFW/fineweb-edu-classifier."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-edu"), task="sequence-classification", num_labels=1)


def test_hf_quality_scorer_runs_in_the_stage_and_matches_the_model(classifier, general_pool, tiny_quality_model,
                                                                    tmp_path):
    rows = [{"id": f"d{i}", "text": r["text"]} for i, r in enumerate(general_pool[100:160])]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", rows)
    scorer = HFQualityScorer(str(tiny_quality_model), "text", max_length=128, max_score=0.05)
    expected = dict(zip([r["id"] for r in rows], scorer.score_texts([r["text"] for r in rows]).tolist()))
    min_score = float(np.median(list(expected.values())))

    report = _run_select(tmp_path / "run", corpus, classifier, dedup=False, quality={
        "scorer": f"hf:{tiny_quality_model}", "min_score": min_score, "max_length": 128, "max_score": 0.05,
        "batch_size": 8})

    # The scores are the model's (same rows, same order), in [0, 1], and the cut applies to them.
    below = sum(v < min_score for v in expected.values())
    assert 0 < below < len(rows)
    assert report["rows_filtered"]["low_quality"] == below and report["rows_out"] == len(rows) - below
    kept = _kept(tmp_path / "run").to_pylist()
    assert all(0.0 <= r["quality_score"] <= 1.0 for r in kept)
    assert all(r["quality_score"] == pytest.approx(expected[r["id"]], abs=1e-5) for r in kept)


def test_more_scoring_actors_than_fit_fail_before_work(tmp_path):
    recipe = build_recipe({"run_dir": str(tmp_path), "select": {
        "in_domain": "x.jsonl", "corpus": "y.jsonl", "scorer_concurrency": 3}}, "test", "/")
    with pytest.raises(SelectError, match=r"select.scorer_concurrency: 3 scoring actors need 2.5 CPUs"):
        scorer_pool_size(recipe.select, cluster_cpus=2)
    assert scorer_pool_size(recipe.select.model_copy(update={"scorer_concurrency": None}), cluster_cpus=2) == 2
    assert scorer_pool_size(recipe.select.model_copy(update={"scorer_concurrency": None}), cluster_cpus=1) == 1
