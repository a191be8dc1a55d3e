"""QC on a real local Ray with real texts (the bundled web corpus, CRAFT's BioQA few-shots as references, medical
abstracts as an evaluation set), with planted exact and near-duplicates, an evaluation leak, copies of references and
malformed rows: each planted row must be dropped for its reason, nothing else dropped, every row counted. Also the
MinHash/LSH building blocks, short evaluation items against the bundled data, and the diversity measures."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest

from domainsynth.actors import minhash
from domainsynth.pipelines.synthesis.diversity import distinct_n, measure_diversity
import pyarrow as pa
import ray

from domainsynth.pipelines import corpus
from domainsynth.pipelines.synthesis.qc import (EVAL_ITEM, EVAL_WORDS, REASONS, SHORT_ITEM_MIN_WORDS, HashRows, QcError,
                                      QcInputs, _shared_tables, candidate_pairs, check_qc, load_eval_grams,
                                      near_duplicate_clusters, run_qc)
from domainsynth.pipelines.synthesis.diversity import DiversityConfig
from domainsynth.pipelines.synthesis.qc import DecontaminateConfig, QcConfig
from domainsynth.pipelines.synthesis.references import References
from domainsynth.pipelines.rundir import StageDir

from conftest import DATA, read_jsonl_gz, write_jsonl

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
FEW_SHOTS = EXAMPLES / "craft_bioqa_fewshot.jsonl"
EVAL_BIOQA = EXAMPLES / "eval_bioqa.jsonl"  # the quickstart's evaluation set (MMLU college biology)


def eval_bioqa() -> list[dict]:
    return [json.loads(line) for line in EVAL_BIOQA.read_text().splitlines() if line.strip()]


def corpus_texts() -> list[dict]:
    rows = []
    for path in sorted((EXAMPLES / "corpus").glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows += [json.loads(line) for line in f]
    return rows


def shingle_jaccard(a: str, b: str, width: int = 3) -> float:
    def shingles(text: str) -> set[int]:
        return set(minhash.window_hashes(*minhash.word_hashes(minhash.normalised_words([text])), width)[0].tolist())
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def replace_words(text: str, positions: list[int], new: str = "zebra") -> str:
    words = text.split()
    for i in positions:
        words[i] = f"{new}{i}"
    return " ".join(words)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """120 distinct web documents plus planted rows (ids say what each is) and two malformed lines."""
    root = tmp_path_factory.mktemp("qc")
    rng = random.Random(7)
    web = [r for r in corpus_texts() if 60 <= len(r["text"].split()) <= 400 and not r["id"].startswith("medabs")]
    first_copies = np.unique(minhash.text_hashes([r["text"] for r in web]), return_index=True)[1]
    web = [web[i] for i in sorted(first_copies)]
    base = [{"id": f"s-{i:03d}", "text": r["text"], "source": r["id"]} for i, r in enumerate(rng.sample(web, 120))]
    few_shots = [json.loads(line) for line in FEW_SHOTS.read_text().splitlines() if line.strip()]
    abstracts = [json.loads(line) for line in (EXAMPLES / "medical_in_domain.jsonl").read_text().splitlines()]
    evals = [{"question": a["text"], "answer": "yes"} for a in abstracts[:3]]
    # two MMLU rows: line 4 has the 4-word choice "increase the mortality rate", line 5 an 8-word question
    mmlu = eval_bioqa()
    evals += [mmlu[0], mmlu[35]]
    short_question = mmlu[35]["question"]
    assert len(minhash.normalise([short_question])[0].split()) == 8
    assert "increase the mortality rate" in mmlu[0]["choices"]
    write_jsonl(root / "eval.jsonl", evals)
    # a real abstract that contains that common 4-word choice (and nothing else of the evaluation set): kept
    common = next(r for r in read_jsonl_gz(DATA / "medical_abstracts.jsonl.gz") if r["id"] == "medabs-1203")
    assert "increase the mortality rate" in minhash.normalise([common["text"]])[0]
    base.append({"id": f"s-{len(base):03d}", "text": common["text"], "source": common["id"]})

    long_doc = next(r for r in base if len(r["text"].split()) >= 150)
    n_words = len(long_doc["text"].split())
    near_text = replace_words(long_doc["text"], [n_words // 3, 2 * n_words // 3])
    leak_words = evals[1]["question"].split()[10:30]
    reference, other_reference = few_shots[4]["Text"], few_shots[9]["Text"]
    ref_words = other_reference.split()
    plants = {
        "exact-copy": ("exact_duplicate", base[10]["text"].upper().replace(",", " ,").replace(".", "!"),
                       f"duplicate of id {base[10]['id']}"),
        "near-copy": ("near_duplicate", near_text, f"near-duplicate of id {long_doc['id']}"),
        "eval-leak": ("contaminated", "Notes from the reading group. " + " ".join(leak_words) +
                      " We will come back to this next week.", "13-gram shared with eval eval.jsonl line 2"),
        # a short benchmark question inside other text: all its words, in a row (punctuation and case aside)
        "short-eval-leak": ("contaminated", "Revision notes for the plant biology exam. Fill in the gap: "
                            + short_question.upper() + "... dominant sporophyte. Answers next week.",
                            "8-word eval item shared with eval eval.jsonl line 5"),
        # an item under SHORT_ITEM_MIN_WORDS words counts only as a whole text
        "tiny-eval-copy": ("contaminated", "Increase the mortality rate!",
                           "whole text is the 4-word eval item of eval.jsonl line 4"),
        "reference-copy": ("duplicate_of_reference", reference.lower(), "duplicate of reference 4"),
        "reference-near-copy": ("duplicate_of_reference", replace_words(other_reference, [len(ref_words) // 2]),
                                "near-duplicate of reference 9"),
        # the first 45% of a reference: few shingles in common (not a near-duplicate), yet nearly the same meaning
        "reference-paraphrase": ("similar_to_reference", " ".join(ref_words[:int(len(ref_words) * 0.45)]),
                                 "to reference 9"),
    }
    rows = base + [{"id": pid, "text": text, "source": "planted"} for pid, (_, text, _) in plants.items()]
    path = root / "samples.jsonl"
    lines = [json.dumps(r) for r in rows]
    lines.insert(57, '{"id": "broken", "text": "no closing brace"')  # line 58
    lines.insert(120, json.dumps({"id": "empty", "text": "   "}))  # line 121
    path.write_text("\n".join(lines) + "\n")
    assert shingle_jaccard(near_text, long_doc["text"]) >= 0.85  # a near-duplicate by the definition used
    assert shingle_jaccard(plants["reference-paraphrase"][1], other_reference) < 0.6
    return {"root": root, "samples": path, "eval": root / "eval.jsonl", "base": base, "plants": plants,
            "near_original": long_doc["id"], "lines": len(lines)}


def qc_config(planted: dict, **changes) -> QcConfig:
    raw = {"input": [str(planted["samples"])], "references": [str(FEW_SHOTS)],
           "decontaminate": {"eval_files": [str(planted["eval"])]}, "max_reference_similarity": 0.9,
           "batch_size": 32, "diversity": {"sample": 60}}
    return QcConfig.model_validate({**raw, **changes})


@pytest.fixture(scope="module")
def qc_run(ray_local, planted) -> dict:
    stage = StageDir(str(planted["root"] / "run" / "qc"))
    report = run_qc(qc_config(planted), stage)
    root = Path(stage.uri)
    return {"report": report, "root": root,
            "kept": pads.dataset(str(root / "data")).to_table().to_pylist(),
            "dropped": {r["id"]: r for r in pads.dataset(str(root / "dropped")).to_table().to_pylist()},
            "quarantine": [json.loads(line) for line in (root / "quarantine.jsonl").read_text().splitlines()]}


def test_each_planted_row_is_dropped_for_its_reason_and_nothing_else(qc_run, planted):
    dropped = qc_run["dropped"]
    assert set(dropped) == set(planted["plants"])  # no real document dropped by mistake
    for pid, (reason, text, detail) in planted["plants"].items():
        assert dropped[pid]["qc_reason"] == reason, (pid, dropped[pid]["qc_detail"])
        assert detail in dropped[pid]["qc_detail"], (pid, dropped[pid]["qc_detail"])
        assert dropped[pid]["text"] == text and dropped[pid]["source"] == "planted"  # every input field kept


def test_originals_are_kept_with_their_fields(qc_run, planted):
    kept = {r["id"]: r for r in qc_run["kept"]}
    assert set(kept) == {r["id"] for r in planted["base"]}
    assert {"s-010", planted["near_original"]} <= set(kept)
    assert kept[planted["base"][-1]["id"]]["source"] == "medabs-1203"  # holds only a 4-word eval choice: kept
    row = kept["s-010"]
    assert row["text"] == planted["base"][10]["text"] and row["source"] == planted["base"][10]["source"]
    assert "_order" not in row and "qc_reason" not in row and row["_source_file"] == "samples.jsonl"


def test_every_row_is_counted(qc_run, planted):
    report = qc_run["report"]
    assert set(report["rows_filtered"]) == set(REASONS)
    assert report["rows_filtered"] == {"duplicate_of_reference": 2, "contaminated": 3, "similar_to_reference": 1,
                                       "exact_duplicate": 1, "near_duplicate": 1}
    assert report["rows_in"] == planted["lines"] == len(planted["base"]) + len(planted["plants"]) + 2
    assert report["rows_in"] == report["rows_out"] + sum(report["rows_filtered"].values()) + report["rows_quarantined"]
    assert report["rows_out"] == len(qc_run["kept"]) and report["rows_quarantined"] == 2
    near = report["near_dedup"]
    assert (near["bands"], near["rows"]) == minhash.lsh_params(0.85, 128) and near["clusters"] == 1
    decontaminate = report["decontaminate"]
    assert decontaminate["short_items_min_words"] == SHORT_ITEM_MIN_WORDS == 5
    assert decontaminate["short_items"] == 1 + 5  # the 8-word question and five choices of 5 to 12 words
    saved = json.loads((qc_run["root"] / "report.json").read_text())
    assert saved["rows_filtered"] == report["rows_filtered"]
    markdown = (qc_run["root"] / "report.md").read_text()
    assert "dropped: contaminated" in markdown and "Diversity" in markdown and "nearest_reference.png" in markdown
    assert (qc_run["root"] / "nearest_reference.png").read_bytes()[:4] == b"\x89PNG"
    diversity = report["diversity"]
    assert diversity["sample"] == 60 and 0 < diversity["distinct_1"] < diversity["distinct_2"] <= 1
    assert diversity["nearest_reference"]["references"] == 32 and len(diversity["nearest_reference"]["values"]) == 60


def test_quarantine_names_file_line_and_reason(qc_run):
    by_line = {r["line"]: r for r in qc_run["quarantine"]}
    assert set(by_line) == {58, 121}
    assert by_line[58]["file"] == "samples.jsonl" and "invalid JSON" in by_line[58]["reason"]
    assert "empty text" in by_line[121]["reason"]


def test_bad_configuration_fails_before_any_work(ray_local, planted, tmp_path):
    stage = StageDir(str(tmp_path / "qc"))
    with pytest.raises(QcError, match=r"qc\.decontaminate\.eval_files: .*missing\.jsonl"):
        run_qc(qc_config(planted, decontaminate={"eval_files": [str(tmp_path / "missing.jsonl")]}), stage)
    with pytest.raises(QcError, match=r"qc\.decontaminate\.eval_fields: eval\.jsonl, line 1: field 'query' is missing"):
        run_qc(qc_config(planted, decontaminate={"eval_files": [str(planted["eval"])], "eval_fields": ["query"]}),
               stage)
    assert not (tmp_path / "qc").exists()  # nothing was read or written
    with pytest.raises(QcError, match=r"qc\.references: .*field 'Question'"):
        check_qc(qc_config(planted, references=None), References([str(FEW_SHOTS)], ["Question"]))


# ------------------------------------------------------------------------------------------ the building blocks
def test_normalisation_and_ngrams():
    assert minhash.normalise(["Hello, WORLD!  ﬁne", "hello world fine", "", "?!"]) == [
        "hello world fine", "hello world fine", "", ""]
    keys = minhash.text_hashes(["Hello, WORLD! ﬁne", "hello world fine", "world hello fine"])
    assert keys[0] == keys[1] != keys[2]
    text = " ".join(f"w{i}" for i in range(20))
    grams, offsets = minhash.ngram_hashes([text, "only five words in here", ""], 13)
    assert np.diff(offsets).tolist() == [8, 1, 0]  # 20 - 13 + 1 windows; a short text is one gram; empty: none
    inside, _ = minhash.ngram_hashes(["prefix words " + " ".join(text.split()[3:16]) + " suffix"], 13)
    assert np.isin(inside, grams[:8]).sum() == 1  # the same 13 words elsewhere give the same gram


def test_run_hashes_equal_the_windows_of_that_width():
    texts = [" ".join(f"w{i}" for i in range(20)), "x y w3 w4 w5 w6", "", "w3 w4 w5"]
    hashes, offsets = minhash.word_hashes(minhash.normalised_words(texts))
    counts = np.diff(offsets)
    for width, starts, runs in minhash.run_hashes(hashes, offsets, np.arange(len(hashes)), [8, 3, 5, 3], salt=1):
        windows, window_offsets = minhash.window_hashes(hashes, offsets, width, salt=1)
        expected = np.concatenate([windows[window_offsets[t]:window_offsets[t + 1]]
                                   for t in range(len(texts)) if counts[t] >= width])
        assert runs.tolist() == expected.tolist() and len(starts) == len(runs)
    three = dict((w, r) for w, _, r in minhash.run_hashes(hashes, offsets, np.arange(len(hashes)), [3], salt=1))[3]
    assert (three == three[3]).sum() == 3  # "w3 w4 w5" in all three texts that have it


def hash_rows(texts: list[str], eval_files: list[str]) -> tuple[np.ndarray, np.ndarray, list]:
    """Pass 1's evaluation columns for ``texts`` (the item each row matched, -1 if none, and how many words)."""
    cfg = QcConfig.model_validate({"decontaminate": {"eval_files": eval_files}, "near_dedup": {"enabled": False}})
    grams = load_eval_grams(DecontaminateConfig(eval_files=eval_files))
    hasher = HashRows(cfg, 0, 0, ray.put(_shared_tables(cfg, QcInputs([], None, grams))))
    items, words = [], []
    for lo in range(0, len(texts), 1024):
        chunk = texts[lo:lo + 1024]
        facts = hasher(pa.table({corpus.ORDER: pa.array(np.arange(len(chunk))), "text": pa.array(chunk)}))
        items.append(facts.column(EVAL_ITEM).to_numpy())
        words.append(facts.column(EVAL_WORDS).to_numpy())
    return np.concatenate(items), np.concatenate(words), grams.sources


def test_short_eval_items_are_found_in_text_without_flagging_clean_texts(ray_local):
    """The quickstart's 144 MMLU rows against 12,478 bundled texts that share none of them (web pool, medical
    abstracts), and every one of its 5-12-word items (33 questions, 192 choices) planted into a web text."""
    clean = [r["text"] for r in read_jsonl_gz(DATA / "general_pool.jsonl.gz")]
    clean += [r["text"] for r in read_jsonl_gz(DATA / "medical_abstracts.jsonl.gz")]
    item, _, _ = hash_rows(clean, [str(EVAL_BIOQA)])
    assert (item >= 0).sum() == 0

    rng = random.Random(5)
    hosts = [t for t in clean[:9590] if len(t.split(". ")) >= 3]
    planted, expected = [], []
    for line, row in enumerate(eval_bioqa(), 1):
        for text in [row["question"], *row["choices"]]:
            n = len(minhash.normalise([text])[0].split())
            if SHORT_ITEM_MIN_WORDS <= n < 13:
                sentences = rng.choice(hosts).split(". ")
                k = rng.randrange(1, len(sentences))
                planted.append(". ".join(sentences[:k]) + ". " + text + " " + ". ".join(sentences[k:]))
                expected.append((line, n))
    assert len(planted) == 225
    item, words, sources = hash_rows(planted, [str(EVAL_BIOQA)])
    assert (item >= 0).all()
    # the row matched is the planted one, by all its words
    assert all(sources[i][1] == line and w == n for i, w, (line, n) in zip(item.tolist(), words.tolist(), expected))


def test_minhash_estimates_the_shingle_jaccard():
    rng = random.Random(3)
    docs = [r["text"] for r in corpus_texts() if len(r["text"].split()) >= 200][:20]
    errors = []
    for i, doc in enumerate(docs):
        words = len(doc.split())
        edited = replace_words(doc, rng.sample(range(words), k=rng.randint(1, words // 8)))
        true = shingle_jaccard(doc, edited)
        sig = minhash.minhash_texts([doc, edited], num_perm=256, shingle_words=3, seed=i)
        errors.append(float(minhash.estimated_jaccard(sig[0], sig[1])) - true)
    errors = np.abs(errors)
    assert errors.mean() < 0.03 and errors.max() < 0.12, errors
    sig = minhash.minhash_texts([docs[0], docs[0].upper(), docs[1]], 128, 3, 1)
    assert (sig[0] == sig[1]).all() and minhash.estimated_jaccard(sig[0], sig[2]) < 0.2


def test_lsh_parameters_match_datasketch():
    from datasketch.lsh import _optimal_param

    for threshold in (0.5, 0.7, 0.85, 0.95):
        for num_perm in (64, 128, 256):
            bands, rows = minhash.lsh_params(threshold, num_perm)
            assert (bands, rows) == _optimal_param(threshold, num_perm, 0.5, 0.5)
            assert minhash.lsh_params(threshold, num_perm, 0.1, 0.9) == _optimal_param(threshold, num_perm, 0.1, 0.9)
            assert bands * rows <= num_perm
            # the S-curve: pairs above the threshold are mostly candidates, those well below it rarely
            p = lambda s: 1 - (1 - s ** rows) ** bands  # noqa: E731
            assert p(min(1.0, threshold + 0.1)) > 0.75 and p(threshold - 0.2) < 0.15


def test_candidate_pairs_and_verified_clusters():
    keys = np.array([[1, 10], [1, 11], [2, 11], [3, 12], [4, 13]], np.uint64)
    assert candidate_pairs(keys).tolist() == [[0, 1], [1, 2]]
    big = np.zeros((40, 1), np.uint64)  # one bucket of 40: a star from row 0 and a chain, not 780 pairs
    pairs = candidate_pairs(big)
    assert len(pairs) == 39 + 38 and {tuple(p) for p in pairs} >= {(0, 39), (38, 39)}
    # verified pairs only: (1, 2) fails verification, so 2 stays on its own
    dropped, keeper, clusters = near_duplicate_clusters(np.array([[0, 1], [1, 2], [3, 4]]),
                                                        np.array([0.9, 0.5, 0.95]), 0.85, 5)
    assert dropped.tolist() == [1, 4] and keeper.tolist() == [0, 3] and clusters == 2


def test_distinct_n_on_a_known_input():
    words = minhash.normalised_words(["The cat sat on the mat.", "The cat ran."]).to_pylist()
    assert distinct_n(words, 1) == round(6 / 9, 4)  # the, cat, sat, on, mat, ran
    assert distinct_n(words, 2) == round(6 / 7, 4)  # "the cat" twice
    assert distinct_n(words, 3) == 1.0
    assert distinct_n([["one"]], 2) is None


def test_pairwise_distance_of_identical_and_varied_texts(ray_local):
    cfg = DiversityConfig(sample=50)
    same = measure_diversity(["Proteins fold into three-dimensional shapes."] * 6, None, cfg)
    assert same["mean_pairwise_distance"] < 1e-3 and same["nearest_reference"] is None
    texts = [r["text"] for r in corpus_texts()[:20]]
    varied = measure_diversity(texts, texts[:3], cfg)
    assert varied["mean_pairwise_distance"] > 0.5
    assert varied["nearest_reference"]["max"] > 0.99  # the references are among the texts
    assert measure_diversity(texts, None, DiversityConfig(sample=0)) is None and measure_diversity([], None, cfg) is None
