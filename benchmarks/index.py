"""Benchmark: the `index` step's approximate index (auto: IVF) against exact flat search, on >= 1M vectors.

The vectors are real all-MiniLM-L6-v2 embeddings of the bundled texts, multiplied: each synthetic vector mixes a
real one with a second (weight 0.5-1 on the first) plus a little noise, then is normalised; the queries are fresh
draws of the same kind. They are written as float16 Parquet shards where the embed stage writes them, and the index
step itself (`domainsynth run`, one Ray task) builds both indexes. Prints build time and peak memory of each build,
then recall@10 of the approximate index against exact search and the time each takes to answer a batch of queries
(and the same for a few other nprobe settings).

    python benchmarks/index.py --vectors 1000000
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
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"


def real_embeddings(n: int, seed: int) -> np.ndarray:
    from domainsynth.actors.embedding import encode, load_sentence_model

    texts = []
    for name in ("general_pool.jsonl.gz", "pubmedqa_abstracts.jsonl.gz", "medical_abstracts.jsonl.gz"):
        with gzip.open(DATA / name, "rt", encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for line in f]
    rng = np.random.default_rng(seed)
    chosen = [texts[i] for i in rng.choice(len(texts), size=min(n, len(texts)), replace=False)]
    return encode(load_sentence_model("all-MiniLM-L6-v2", max_seq_length=128), chosen, 64).astype(np.float32)


def synthetic(base: np.ndarray, n: int, rng: np.random.Generator, noise: float) -> np.ndarray:
    first = base[rng.integers(len(base), size=n)]
    second = base[rng.integers(len(base), size=n)]
    weight = rng.uniform(0.5, 1.0, size=(n, 1)).astype(np.float32)
    mixed = weight * first + (1 - weight) * second + noise * rng.standard_normal(first.shape, dtype=np.float32)
    return mixed / np.linalg.norm(mixed, axis=1, keepdims=True)


def write_embed_stage(run: Path, base: np.ndarray, vectors: int, shard_rows: int, noise: float, seed: int) -> None:
    """Shards and a report laid out as the embed stage leaves them (the index step reads nothing else)."""
    from domainsynth.actors.embedding import vectors_to_arrow

    data = run / "embed" / "data"
    data.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for shard, start in enumerate(range(0, vectors, shard_rows)):
        rows = min(shard_rows, vectors - start)
        table = pa.table({"id": pa.array([f"v{start + i}" for i in range(rows)]),
                          "_order": pa.array(np.arange(start, start + rows, dtype=np.int64)),
                          "embedding": vectors_to_arrow(synthetic(base, rows, rng, noise).astype(np.float16))})
        pq.write_table(table, data / f"part-{shard:05d}.parquet")
    report = {"stage": "embed", "rows_in": vectors, "rows_out": vectors, "rows_quarantined": 0, "rows_filtered": {},
              "model": "all-MiniLM-L6-v2", "max_seq_length": 128, "dimensions": base.shape[1],
              "corpus": {"paths": ["synthetic"], "files": [], "text_field": "text", "id_field": "id"}}
    (run / "embed" / "report.json").write_text(json.dumps(report))


def build(run: Path, kind: str, overrides: list[str]) -> dict:
    recipe = run / "recipe.yaml"
    recipe.write_text(f"run_dir: {run}\nindex:\n  kind: {kind}\n")
    cmd = [sys.executable, "-m", "domainsynth.cluster.cli", "run", str(recipe)]
    for o in overrides:
        cmd += ["--set", o]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((run / "index" / "report.json").read_text())


def load(run: Path):
    import faiss

    return faiss.read_index(str(run / "index" / "index.faiss"))


def timed_search(index, queries: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    index.search(queries[:10], k)  # warm-up
    start = time.perf_counter()
    _, found = index.search(queries, k)
    return time.perf_counter() - start, found


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--base", type=int, default=4000, help="real documents embedded as the base vectors")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--shard-rows", type=int, default=20_000)
    parser.add_argument("--noise", type=float, default=0.02, help="per-dimension noise before normalising")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="index recipe overrides for the approximate build, e.g. index.nprobe=64")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    import faiss

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-index-"))
    t = time.perf_counter()
    base = real_embeddings(args.base, seed=0)
    exact_run, approx_run = work / "exact", work / "approx"
    write_embed_stage(exact_run, base, args.vectors, args.shard_rows, args.noise, seed=1)
    approx_run.mkdir()
    os.symlink(exact_run / "embed", approx_run / "embed")
    queries = synthetic(base, args.queries, np.random.default_rng(2), args.noise)
    print(f"{args.vectors:,} vectors of {base.shape[1]} dimensions from {len(base):,} real embeddings, "
          f"{args.queries:,} queries; made in {time.perf_counter() - t:.0f}s; {os.cpu_count()} CPUs; at {work}")

    approx = build(approx_run, "auto", args.overrides)
    exact = build(exact_run, "flat", [])
    for name, r in (("exact (flat)", exact), (f"approximate ({approx['factory']}, nprobe {approx['nprobe']})", approx)):
        print(f"build {name}: {r['seconds']:.1f}s (train {r['train_seconds']:.1f}s on {r['train_rows']:,} vectors, "
              f"add {r['add_seconds']:.1f}s); index {r['index_bytes'] / 2**20:,.0f} MiB; peak RSS of the build "
              f"{r['peak_rss_mib']:,.0f} MiB" + (f"; calibrated recall@10 by nprobe {r['recall_curve']}"
                                                   if r.get("recall_curve") else ""))

    k = 10
    flat, ivf = load(exact_run), load(approx_run)
    exact_s, truth = timed_search(flat, queries, k)
    ivf_index = faiss.extract_index_ivf(ivf)
    nlist, chosen = ivf_index.nlist, approx["nprobe"]
    results = {}
    for nprobe in sorted({max(1, chosen // 2), chosen, chosen * 2, chosen * 4}):
        ivf_index.nprobe = nprobe
        seconds, found = timed_search(ivf, queries, k)
        results[nprobe] = (seconds, recall_at(found, truth))
        print(f"  nprobe {nprobe:>4} of {nlist}: recall@{k} {results[nprobe][1]:.3f}, {seconds:.3f}s for "
              f"{args.queries:,} queries, {exact_s / seconds:.1f}x faster than exact")
    seconds, recall = results[chosen]
    print(f"exact search: {exact_s:.2f}s for {args.queries:,} queries")
    print(f"approximate (nprobe {chosen}, chosen by the index step): recall@{k} {recall:.3f} (target >= 0.95); "
          f"{exact_s / seconds:.1f}x faster than exact (target >= 10x)")


if __name__ == "__main__":
    main()
