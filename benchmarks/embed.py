"""Benchmark: the `embed` stage on Ray Data vs `SentenceTransformer.encode` in one process, on the same documents.

Both embed the same JSONL shards with the bundled all-MiniLM-L6-v2 (batch 64, 256 tokens, normalised, float16) and
write Parquet with the ids. The documents are the bundled real texts (general pool, medical abstracts, PubMedQA)
sampled with replacement and made unique by a suffix. Prints documents per second for both and their ratio: end to
end (the CLI, Ray start-up included) and the stage alone (what a running cluster pays).

    python benchmarks/embed.py --docs 20000
"""

from __future__ import annotations

import os
import sys

# benchmarks/select.py is named like the stdlib module `select` (which `subprocess` imports): this folder goes last on
# the import path.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE] + [HERE]

import argparse
import gzip
import json
import random
import tempfile
from pathlib import Path

from common import timed

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
SOURCES = ("general_pool.jsonl.gz", "medical_abstracts.jsonl.gz", "pubmedqa_abstracts.jsonl.gz")


def build_corpus(out: Path, docs: int, shards: int, seed: int = 0) -> None:
    texts = []
    for name in SOURCES:
        with gzip.open(DATA / name, "rt", encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for line in f]
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    files = [open(out / f"part-{s:03d}.jsonl", "w", encoding="utf-8") for s in range(shards)]
    for i in range(docs):
        files[i % shards].write(json.dumps({"id": f"doc-{i}", "text": f"[{i}] {rng.choice(texts)}"}) + "\n")
    for f in files:
        f.close()


BASELINE = """
import glob, json, os, sys, time
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
from sentence_transformers import SentenceTransformer
from domainsynth.actors.embedding import resolve_model, vectors_to_arrow
model = SentenceTransformer(resolve_model("all-MiniLM-L6-v2"), device="cpu")
model.max_seq_length = int(sys.argv[3])
os.makedirs(sys.argv[2], exist_ok=True)
n, started = 0, time.perf_counter()
for i, path in enumerate(sorted(glob.glob(os.path.join(sys.argv[1], "*.jsonl")))):
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    vectors = model.encode([r["text"] for r in rows], batch_size=64, normalize_embeddings=True,
                           convert_to_numpy=True).astype(np.float16)
    table = pa.table({"id": [r["id"] for r in rows], "embedding": vectors_to_arrow(vectors)})
    pq.write_table(table, os.path.join(sys.argv[2], f"part-{i:03d}.parquet"))
    n += len(rows)
print(json.dumps({"rows": n, "seconds": time.perf_counter() - started}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-embed-"))
    corpus = work / "corpus"
    build_corpus(corpus, args.docs, args.shards)
    print(f"corpus: {args.docs:,} documents in {args.shards} JSONL shards at {corpus}; {os.cpu_count()} CPUs")

    base_s, base_peak, out = timed([sys.executable, "-c", BASELINE, str(corpus), str(work / "baseline"),
                                    str(args.max_seq_length)])
    base = json.loads(out.strip().splitlines()[-1])
    assert base["rows"] == args.docs
    print(f"baseline (SentenceTransformer.encode, 1 process, torch's default threads): {base_s:.1f}s, "
          f"{args.docs / base_s:,.1f} docs/s (model load excluded: {args.docs / base['seconds']:,.1f} docs/s); "
          f"peak RSS {base_peak:,.0f} MiB")

    run = work / "run"
    stage_s, stage_peak, _ = timed([sys.executable, "-m", "domainsynth.cluster.cli", "embed", "--corpus", str(corpus),
                                    "--out", str(run), "--max-seq-length", str(args.max_seq_length)])
    report = json.loads((run / "embed" / "report.json").read_text())
    assert report["rows_out"] == args.docs, report["rows_out"]
    print(f"domainsynth embed (Ray Data, {report['actors']} actors x {report['cpus_per_actor']} CPU): {stage_s:.1f}s "
          f"end to end incl. Ray start-up, {args.docs / stage_s:,.1f} docs/s; the stage alone "
          f"{report['docs_per_second']:,.1f} docs/s; peak RSS of the process tree {stage_peak:,.0f} MiB")
    print(f"ratio, end to end (embed docs/s / baseline docs/s): {base_s / stage_s:.2f}x")
    print(f"ratio, stage alone (stage docs/s / baseline encode docs/s): "
          f"{report['docs_per_second'] / (args.docs / base['seconds']):.2f}x")


if __name__ == "__main__":
    main()
