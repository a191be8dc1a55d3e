"""Benchmark: `domainsynth select` on Ray Data vs the single Python process a user would write instead.

Both score the same corpus with the same fastText model and write Parquet. The corpus is the bundled general pool
sampled with replacement and made unique (a suffix per document), written as JSONL shards. Prints documents per
second for both, their ratio, the phase breakdown and peak memory (RSS of the whole process tree, sampled).

    python benchmarks/select.py --docs 500000
"""

from __future__ import annotations

import os
import sys

# This file is named like the stdlib module `select`: its folder goes to the end of the import path, so `subprocess`
# finds the real `select` and `common` is still found here.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE] + [HERE]

import argparse
import gzip
import json
import random
import subprocess
import tempfile
import time
from pathlib import Path

from common import timed

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"


def build_corpus(out: Path, docs: int, shards: int, seed: int = 0) -> int:
    with gzip.open(DATA / "general_pool.jsonl.gz", "rt", encoding="utf-8") as f:
        pool = [json.loads(line) for line in f]
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    files = [open(out / f"part-{s:03d}.jsonl", "w", encoding="utf-8") for s in range(shards)]
    total = 0
    for i in range(docs):
        r = rng.choice(pool)
        row = {"id": f"doc-{i}", "text": f"{r['text']}\n[{i}]", "source": r["source"], "subsource": r["subsource"]}
        line = json.dumps(row, ensure_ascii=False) + "\n"
        total += len(line)
        files[i % shards].write(line)
    for f in files:
        f.close()
    return total


TRAIN = """
import gzip, json, sys
from domainsynth.actors.fasttext_domain import FastTextParams, train_classifier
pos = [json.loads(l)["text"] for l in gzip.open(sys.argv[1], "rt")]
neg = [json.loads(l)["text"] for l in gzip.open(sys.argv[2], "rt")]
open(sys.argv[3], "wb").write(train_classifier(pos, neg, FastTextParams()).model_bytes)
"""

BASELINE = """
import json, sys, time, resource, glob, os
import pyarrow as pa, pyarrow.parquet as pq
from domainsynth.actors.fasttext_domain import load_model, predict_in_domain_probability
model = load_model(open(sys.argv[1], "rb").read())
os.makedirs(sys.argv[3], exist_ok=True)
t_read = t_score = t_write = 0.0
n = 0
for i, path in enumerate(sorted(glob.glob(os.path.join(sys.argv[2], "*.jsonl")))):
    t = time.perf_counter()
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    t_read += time.perf_counter() - t; t = time.perf_counter()
    scores = []
    for s in range(0, len(rows), 1024):
        scores.extend(predict_in_domain_probability(model, [r["text"] for r in rows[s:s + 1024]]).tolist())
    t_score += time.perf_counter() - t; t = time.perf_counter()
    table = pa.Table.from_pylist(rows).append_column("domain_score", pa.array(scores, pa.float32()))
    pq.write_table(table, os.path.join(sys.argv[3], f"part-{i:03d}.parquet"))
    t_write += time.perf_counter() - t
    n += len(rows)
print(json.dumps({"rows": n, "read": t_read, "score": t_score, "write": t_write,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=2_000_000)
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--quality", default="none", help="select's quality scorer (the baseline has none)")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-select-"))
    corpus = work / "corpus"
    t = time.perf_counter()
    size = build_corpus(corpus, args.docs, args.shards)
    print(f"corpus: {args.docs:,} docs, {size / 2**20:,.0f} MiB JSONL in {args.shards} shards "
          f"(built in {time.perf_counter() - t:.0f}s) at {corpus}")
    model = work / "classifier.bin"
    subprocess.run([sys.executable, "-c", TRAIN, str(DATA / "medical_abstracts.jsonl.gz"),
                    str(DATA / "general_pool.jsonl.gz"), str(model)], check=True)

    base_s, base_peak, out = timed([sys.executable, "-c", BASELINE, str(model), str(corpus), str(work / "baseline")])
    base = json.loads(out.strip().splitlines()[-1])
    print(f"baseline (1 process): {base_s:.1f}s, {args.docs / base_s:,.0f} docs/s; read {base['read']:.1f}s, "
          f"score {base['score']:.1f}s, write {base['write']:.1f}s; peak RSS {base_peak:,.0f} MiB")

    run = work / "run"
    cmd = [sys.executable, "-m", "domainsynth.cluster.cli", "select", "--in-domain", str(DATA / "medical_abstracts.jsonl.gz"),
           "--corpus", str(corpus), "--classifier", str(model), "--out", str(run), "--keep-fraction", "0.1",
           "--quality", args.quality]
    sel_s, sel_peak, _ = timed(cmd)
    report = json.loads((run / "select" / "report.json").read_text())
    assert report["rows_in"] == args.docs, report["rows_in"]
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in report["phases"].items())
    print(f"domainsynth select (Ray Data, {os.cpu_count()} CPUs, quality={args.quality}): {sel_s:.1f}s end to end "
          f"incl. Ray start-up, {args.docs / sel_s:,.0f} docs/s; stage {report['docs_per_second']:,.0f} docs/s; "
          f"phases: {phases}; peak RSS of the process tree {sel_peak:,.0f} MiB")
    print(f"ratio (select end-to-end docs/s / baseline docs/s): {base_s / sel_s:.2f}x")


if __name__ == "__main__":
    main()
