"""Benchmark: QC near-duplicate removal (MinHash LSH, hashing on Ray Data) vs datasketch in one process.

The documents are made from real text: the bundled web corpus (examples/data/corpus, 3,000 documents) is cut into
sentences and each document is 3-8 sentences drawn at random, so documents are distinct. Planted into them: near
copies of some documents (one span of 2-6% of the words replaced by other words, plus changes of case and
punctuation, which normalisation undoes) and exact copies (the same text re-cased and re-punctuated). A planted
pair counts as found when either of its two documents is removed.

Both sides use the same shingles (3 normalised words), 128 permutations and threshold 0.85, and both verify a
candidate by its estimated Jaccard before removing a document:

- ours: ``run_qc`` (exact and near deduplication only) on a local Ray with ``--num-cpus`` CPUs: reading the JSONL
  shards, hashing on Ray Data, clustering, and writing kept and dropped rows as Parquet;
- baseline: one process, documents in order: ``MinHash.update_batch`` of the shingles, ``MinHashLSH.query``, a
  document is removed when a candidate's estimated Jaccard is >= 0.85, else it is inserted (the usual datasketch
  recipe; it writes nothing, and its shingles come from our vectorised normaliser, which favours it).

Prints documents per second for both, the ratio, recall on the planted pairs and precision of what was removed.

    python benchmarks/qc.py --docs 200000 --num-cpus 2
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE] + [HERE]  # see benchmarks/select.py

import argparse
import gzip
import json
import random
import re
import shutil
import tempfile
from pathlib import Path

from common import timed

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "examples" / "data" / "corpus"
THRESHOLD, NUM_PERM, SHINGLE_WORDS = 0.85, 128, 3


def build_corpus(out: Path, docs: int, near: int, exact: int, shards: int, seed: int = 0) -> list[dict]:
    """Writes the shards; returns the planted pairs (original id, copy id, kind)."""
    sentences = []
    for path in sorted(CORPUS.glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                sentences += [s for s in re.split(r"(?<=[.!?])\s+", json.loads(line)["text"]) if len(s.split()) >= 5]
    vocabulary = sorted({w for s in sentences for w in s.split() if w.isalpha()})
    rng = random.Random(seed)
    base = docs - near - exact
    rows = [{"id": f"doc-{i}", "text": " ".join(rng.sample(sentences, rng.randint(3, 8)))} for i in range(base)]
    originals = rng.sample(range(base), near + exact)
    pairs = []
    for n, i in enumerate(originals):
        words = rows[i]["text"].split()
        if n < near:
            span = max(1, round(len(words) * rng.uniform(0.02, 0.06)))
            at = rng.randrange(0, len(words) - span + 1)
            words[at:at + span] = rng.choices(vocabulary, k=span)
            text = " ".join(words)
            kind = "near"
        else:
            text = rows[i]["text"].upper()
            kind = "exact"
        text = text.replace(", ", " , ").replace(". ", "! ", 1)  # undone by normalisation
        pairs.append({"original": rows[i]["id"], "copy": f"{kind}-{n}", "kind": kind})
        rows.append({"id": f"{kind}-{n}", "text": text})
    rng.shuffle(rows)
    out.mkdir(parents=True, exist_ok=True)
    files = [open(out / f"part-{s:03d}.jsonl", "w", encoding="utf-8") for s in range(shards)]
    for i, row in enumerate(rows):
        files[i % shards].write(json.dumps(row, ensure_ascii=False) + "\n")
    for f in files:
        f.close()
    return pairs


OURS = """
import json, sys, time, ray
from domainsynth.pipelines.synthesis.qc import run_qc
from domainsynth.pipelines.synthesis.qc import QcConfig
from domainsynth.pipelines.rundir import StageDir
ray.init(num_cpus=int(sys.argv[3]), include_dashboard=False, log_to_driver=False)
cfg = QcConfig.model_validate({"input": [sys.argv[1]], "diversity": {"sample": 0},
                               "near_dedup": {"threshold": %r, "num_perm": %r, "shingle_words": %r,
                                              "false_negative_weight": float(sys.argv[4])}})
started = time.perf_counter()
report = run_qc(cfg, StageDir(sys.argv[2]))
print(json.dumps({"seconds": time.perf_counter() - started, "report": report}))
""" % (THRESHOLD, NUM_PERM, SHINGLE_WORDS)

BASELINE = """
import glob, json, os, sys, time
from datasketch import MinHash, MinHashLSH
from domainsynth.actors.minhash import normalised_words
started = time.perf_counter()
w = float(sys.argv[2])
lsh = MinHashLSH(threshold=%r, num_perm=%r, weights=(1 - w, w))
sketches, removed, n = {}, {}, 0
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.jsonl"))):
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    for row, words in zip(rows, normalised_words([r["text"] for r in rows]).to_pylist()):
        k = %r
        shingles = [" ".join(words[i:i + k]).encode() for i in range(len(words) - k + 1)] or (
            [" ".join(words).encode()] if words else [])
        m = MinHash(num_perm=%r, seed=1)
        m.update_batch(shingles)
        match = next((c for c in lsh.query(m) if m.jaccard(sketches[c]) >= %r), None)
        if match is None:
            lsh.insert(row["id"], m)
            sketches[row["id"]] = m
        else:
            removed[row["id"]] = match
        n += 1
print(json.dumps({"rows": n, "seconds": time.perf_counter() - started, "removed": removed,
                  "bands": lsh.b, "rows_per_band": lsh.r}))
""" % (THRESHOLD, NUM_PERM, SHINGLE_WORDS, NUM_PERM, THRESHOLD)


def shingles(text: str) -> set:
    from domainsynth.actors import minhash

    return set(minhash.window_hashes(*minhash.word_hashes(minhash.normalised_words([text])), SHINGLE_WORDS)[0].tolist())


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / max(1, len(sa | sb))


def scores(removed: dict[str, str], pairs: list[dict], texts: dict[str, str], kind: str) -> tuple[float, float, float]:
    """(recall on the planted pairs of ``kind``, precision: removed documents in a planted pair, precision: removed
    documents whose true Jaccard with the document they were matched to is >= the threshold)."""
    planted = [p for p in pairs if p["kind"] == kind]
    found = sum(p["copy"] in removed or p["original"] in removed for p in planted)
    in_pairs = {d for p in pairs for d in (p["copy"], p["original"])}
    true = sum(jaccard(texts[r], texts[m]) >= THRESHOLD for r, m in removed.items())
    return found / max(1, len(planted)), sum(r in in_pairs for r in removed) / max(1, len(removed)), \
        true / max(1, len(removed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--near", type=int, default=2_000, help="planted near-duplicate copies")
    parser.add_argument("--exact", type=int, default=1_000, help="planted exact copies")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--false-negative-weight", type=float, default=0.5,
                        help="LSH bands and rows for both sides (datasketch's weights=(1 - w, w))")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    import pyarrow.dataset as pads

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-qc-"))
    corpus = work / "corpus"
    pairs = build_corpus(corpus, args.docs, args.near, args.exact, args.shards)
    texts = {}
    for path in sorted(corpus.glob("*.jsonl")):
        texts.update((r["id"], r["text"]) for r in map(json.loads, path.read_text(encoding="utf-8").splitlines()))
    near_j = sorted(jaccard(texts[p["original"]], texts[p["copy"]]) for p in pairs if p["kind"] == "near")
    above = sum(j >= THRESHOLD for j in near_j) / max(1, len(near_j))
    print(f"corpus: {args.docs:,} documents ({args.near:,} near and {args.exact:,} exact copies planted) in "
          f"{args.shards} JSONL shards at {corpus}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    if near_j:
        print(f"planted near copies: true Jaccard min {near_j[0]:.3f} / median {near_j[len(near_j) // 2]:.3f}; "
              f"{above:.1%} at or above the threshold {THRESHOLD}")

    shutil.rmtree(work / "qc", ignore_errors=True)  # a stage writes into an empty folder (the runner clears it)
    ours_s, ours_peak, out = timed([sys.executable, "-c", OURS, str(corpus), str(work / "qc"), str(args.num_cpus),
                                    str(args.false_negative_weight)])
    ours = json.loads(out.strip().splitlines()[-1])
    report = ours["report"]
    assert report["rows_in"] == args.docs, report["rows_in"]
    dropped = pads.dataset(str(work / "qc" / "dropped")).to_table(columns=["id", "qc_reason", "qc_detail"]).to_pylist()
    ours_removed = {r["id"]: re.search(r"of id (\S+)", r["qc_detail"]).group(1) for r in dropped}
    near = report["near_dedup"]
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in report["phases"].items())
    print(f"ours (run_qc, Ray Data on {args.num_cpus} CPUs; LSH {near['bands']} bands x {near['rows']} rows): "
          f"{ours['seconds']:.1f}s, {args.docs / ours['seconds']:,.0f} docs/s (read, hash, cluster, write); "
          f"{ours_s:.1f}s incl. Python and Ray start-up ({args.docs / ours_s:,.0f} docs/s); phases: {phases}; "
          f"peak RSS of the process tree {ours_peak:,.0f} MiB")
    print(f"  removed: {report['rows_filtered']['near_duplicate']:,} near, {report['rows_filtered']['exact_duplicate']:,}"
          f" exact; {near['candidate_pairs']:,} candidate pairs, {near['verified_pairs']:,} verified, "
          f"{near['clusters']:,} clusters")

    base_s, base_peak, out = timed([sys.executable, "-c", BASELINE, str(corpus), str(args.false_negative_weight)])
    base = json.loads(out.strip().splitlines()[-1])
    assert base["rows"] == args.docs
    print(f"baseline (datasketch MinHash + MinHashLSH, 1 process; LSH {base['bands']} bands x {base['rows_per_band']}"
          f" rows): {base['seconds']:.1f}s, {args.docs / base['seconds']:,.0f} docs/s; {base_s:.1f}s incl. start-up; "
          f"removed {len(base['removed']):,}; peak RSS {base_peak:,.0f} MiB")

    for name, removed in (("ours", ours_removed), ("baseline", base["removed"])):
        recall_near, precision_planted, precision_true = scores(removed, pairs, texts, "near")
        recall_exact, _, _ = scores(removed, pairs, texts, "exact")
        found_above = [p for p in pairs if p["kind"] == "near" and jaccard(texts[p["original"]], texts[p["copy"]])
                       >= THRESHOLD]
        recall_above = sum(p["copy"] in removed or p["original"] in removed for p in found_above) / max(
            1, len(found_above))
        print(f"{name}: recall on planted near copies {recall_near:.3f} (on those with true Jaccard >= {THRESHOLD}: "
              f"{recall_above:.3f}), on exact copies {recall_exact:.3f}; precision: {precision_planted:.3f} of "
              f"removals are planted copies or originals, {precision_true:.3f} have true Jaccard >= {THRESHOLD} "
              f"with the document they were matched to")
    print(f"ratio, dedup (ours docs/s / baseline docs/s): {base['seconds'] / ours['seconds']:.2f}x; "
          f"incl. start-up: {base_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
