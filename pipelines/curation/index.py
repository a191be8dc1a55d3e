"""CRAFT step 2 — index the embedded corpus with faiss, in one Ray task (on a GPU node when faiss-gpu is there).

The kind follows the corpus size (exact search up to ``exact_max_rows`` vectors, IVF above) unless the recipe names
one. IVF kinds are trained on a sample drawn from every shard in proportion to its size; vectors are then added
shard by shard, so no more than one shard's vectors and the index itself are in memory at once. The index, the
position -> row map and ``index.json`` (what retrieve needs: plan, model, corpus) land in ``<run>/index/``.
"""

from __future__ import annotations

import io
import math
import resource
from typing import Literal, Optional

import numpy as np
import pyarrow.parquet as pq
import ray
from pydantic import Field

from ...actors.embedding import EMBEDDING, arrow_to_vectors
from ...actors.vector_index import (ExactNeighbours, IndexPlan, calibrate, faiss_gpus, finish_for_saving, new_index,
                                    save_index, set_search_parameters, to_gpus)
from .. import corpus
from ..report import markdown_table, write_report
from ..resources import gpus_up, largest_node_cpus
from ..rundir import StageDir, StageError
from ..schema import Strict
from ..stage import Stage, StageClock, StageReport


class IndexConfig(Strict):
    kind: Literal["auto", "flat", "ivf", "ivfpq", "hnsw"] = Field(
        "auto", description="auto = exact 'flat' up to exact_max_rows vectors, 'ivf' above.")
    exact_max_rows: int = Field(200_000, gt=0, description="auto: the largest corpus searched exactly.")
    nlist: Optional[int] = Field(None, gt=0, description="IVF cells; null = a power of two near 4*sqrt(rows).")
    nprobe: Optional[int] = Field(None, gt=0, description="IVF cells searched per query; null = the fewest that "
                                                          "reach target_recall (measured at build time).")
    target_recall: float = Field(0.99, gt=0, le=1, description="IVF with nprobe unset: recall@10 against exact "
                                                               "search that the chosen nprobe must reach.")
    calibration_queries: int = Field(256, gt=0, description="Corpus vectors used as queries to measure recall.")
    pq_m: int = Field(48, gt=0, description="ivfpq: sub-quantizers (must divide the dimension); 8 bits each.")
    hnsw_m: int = Field(32, gt=0, description="hnsw: graph neighbours per vector.")
    ef_construction: int = Field(80, gt=0, description="hnsw: build-time search depth.")
    ef_search: int = Field(128, gt=0, description="hnsw: query-time search depth.")
    train_rows: int = Field(100_000, gt=0, description="IVF: vectors sampled (over all shards) to train on.")
    gpu: Optional[bool] = Field(None, description="Build and search on GPUs with faiss-gpu; null = when faiss "
                                                  "sees one (flat and IVF kinds; HNSW stays on CPU).")
    num_cpus: Optional[int] = Field(None, gt=0, description="CPUs (faiss threads) of the build and search task; "
                                                            "null = the largest node's.")
    seed: int = Field(0, description="Seed of the training sample and the calibration queries.")

MIN_TRAINING_POINTS_PER_CELL = 39  # faiss warns below this many k-means points per centroid
RECALL_AT = 10


class IndexBuildError(StageError):
    """The index step cannot run (no embeddings, an impossible setting); the message says which."""


def plan_index(cfg: IndexConfig, rows: int, dim: int) -> IndexPlan:
    kind = cfg.kind if cfg.kind != "auto" else ("flat" if rows <= cfg.exact_max_rows else "ivf")
    if kind in ("ivf", "ivfpq"):
        trainable = max(1, min(rows, cfg.train_rows) // MIN_TRAINING_POINTS_PER_CELL)
        nlist = cfg.nlist or min(trainable, 2 ** round(math.log2(max(1.0, 4 * math.sqrt(rows)))))
        if nlist > min(rows, cfg.train_rows):
            raise IndexBuildError(f"index.nlist: {nlist} cells need at least as many training vectors; expected at "
                                  f"most {min(rows, cfg.train_rows)} ({rows} vectors, train_rows {cfg.train_rows})")
        nprobe = min(nlist, cfg.nprobe) if cfg.nprobe else None  # None: calibrated after the build
        if kind == "ivfpq" and dim % cfg.pq_m:
            raise IndexBuildError(f"index.pq_m: {cfg.pq_m} does not divide the embedding dimension {dim}; expected a "
                              f"divisor such as {next(m for m in (64, 48, 32, 16, 8, 4, 2, 1) if dim % m == 0)}")
        return IndexPlan(kind, dim, nlist=nlist, nprobe=nprobe, pq_m=cfg.pq_m if kind == "ivfpq" else None)
    if kind == "hnsw":
        return IndexPlan(kind, dim, hnsw_m=cfg.hnsw_m, ef_construction=cfg.ef_construction, ef_search=cfg.ef_search)
    return IndexPlan(kind, dim)


def list_shards(data_uri: str) -> list[tuple[str, int]]:
    """The embed stage's Parquet shards with their row counts (from the footers; nothing is read)."""
    from pyarrow.fs import FileSelector

    fs, root = StageDir(data_uri).fs_path
    if fs.get_file_info(root).type.name != "Directory":
        return []
    files = sorted(i.path for i in fs.get_file_info(FileSelector(root)) if i.path.endswith(".parquet"))
    return [(f, pq.ParquetFile(f, filesystem=fs).metadata.num_rows) for f in files]


def read_shard(data_uri: str, path: str) -> tuple[np.ndarray, np.ndarray]:
    fs, _ = StageDir(data_uri).fs_path
    table = pq.read_table(path, columns=[corpus.ORDER, EMBEDDING], filesystem=fs)
    return table.column(corpus.ORDER).to_numpy(), arrow_to_vectors(table.column(EMBEDDING))


def training_sample(data_uri: str, shards: list[tuple[str, int]], rows: int, seed: int) -> np.ndarray:
    """``rows`` vectors drawn uniformly over all shards (each shard gives its share)."""
    total = sum(n for _, n in shards)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, size=min(rows, total), replace=False))
    parts, start = [], 0
    for path, n in shards:
        local = chosen[(chosen >= start) & (chosen < start + n)] - start
        if len(local):
            parts.append(read_shard(data_uri, path)[1][local])
        start += n
    return np.concatenate(parts)


def build_index(data_uri: str, shards: list[tuple[str, int]], plan: IndexPlan, cfg: IndexConfig, out: StageDir,
                threads: int, use_gpu: bool) -> dict:
    """Train (IVF), add shard by shard, measure recall (and choose the search depth), save. Runs inside a Ray task;
    returns the final plan, timings and sizes."""
    import faiss
    from tqdm.auto import tqdm

    faiss.omp_set_num_threads(threads)
    use_gpu = bool(use_gpu and plan.gpu_capable and faiss_gpus() > 0)
    index = new_index(plan)
    if use_gpu:
        index = to_gpus(index)
    stats = {"gpu": use_gpu, "threads": threads, "train_rows": 0, "train_seconds": 0.0}
    clock = StageClock()  # in this task: its phases come back as stats
    queries = None
    if plan.kind != "flat":  # recall is measured with corpus vectors as queries, drawn in the same pass as training's
        wanted = cfg.calibration_queries + (cfg.train_rows if plan.needs_training else 0)
        sample = np.random.default_rng(cfg.seed).permutation(training_sample(data_uri, shards, wanted, cfg.seed))
        queries, sample = sample[:cfg.calibration_queries], sample[cfg.calibration_queries:]
    if plan.needs_training:
        with clock.phase("train"):
            index.train(sample)
        stats.update(train_rows=len(sample), train_seconds=round(clock.seconds(), 3))
    exact = ExactNeighbours(queries, k=RECALL_AT) if queries is not None else None
    row_ids = []
    with clock.phase("add"):
        for path, _ in tqdm(shards, desc="index: adding shards", unit="shard"):
            orders, vectors = read_shard(data_uri, path)
            index.add(vectors)
            if exact is not None:
                exact.add(vectors)
            row_ids.append(orders)
    stats["add_seconds"] = round(clock.phase_seconds("add"), 3)
    if exact is not None:
        plan, curve = calibrate(index, plan, exact, cfg.target_recall)
        stats["recall_curve"] = {str(depth): round(r, 4) for depth, r in curve.items()}
        stats["recall_at_10"] = round(curve[plan.nprobe if plan.needs_training else plan.ef_search], 4)
    index = finish_for_saving(index, plan)
    set_search_parameters(index, plan)
    fs, root = out.fs_path
    fs.create_dir(root, recursive=True)
    save_index(index, fs, f"{root}/index.faiss")
    buf = io.BytesIO()
    np.save(buf, (np.concatenate(row_ids) if row_ids else np.zeros(0)).astype(np.int64))
    out.write_bytes("row_ids.npy", buf.getvalue())
    stats.update(plan=plan, index_bytes=fs.get_file_info(f"{root}/index.faiss").size, ntotal=int(index.ntotal),
                 peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    return stats


def wants_gpu(setting: bool | None, plan: IndexPlan) -> bool:
    """Ask Ray for a GPU when the recipe says so, or (unset) when a node up now has one and the kind can use it (not
    one the autoscaler could start: a GPU pod for a faiss build is not worth its cost unless asked for)."""
    if setting is not None:
        return setting and plan.gpu_capable
    return plan.gpu_capable and gpus_up() >= 1


def embed_output(stage: StageDir) -> tuple[dict, str]:
    embed = StageDir(stage.sibling("embed"))
    report = embed.read_json("report.json")
    if not report:
        raise IndexBuildError(f"index: no finished embed stage in {embed.uri} (run embed first, or give the recipe an "
                          "embed section)")
    return report, embed.child("data")


def run_index(cfg: IndexConfig, stage: StageDir) -> dict:
    clock = StageClock()
    embed_report, data_uri = embed_output(stage)
    shards = [(p, n) for p, n in list_shards(data_uri) if n]
    rows = sum(n for _, n in shards)
    if rows == 0:
        raise IndexBuildError(f"index: the corpus is empty: {embed_report['rows_in']} rows read, none embedded "
                          f"(see {stage.sibling('embed', 'quarantine.jsonl')})")
    plan = plan_index(cfg, rows, embed_report["dimensions"])
    threads = cfg.num_cpus or largest_node_cpus()
    gpu = wants_gpu(cfg.gpu, plan)
    # max_calls=1: the worker exits afterwards, handing the index's memory back.
    task = ray.remote(max_calls=1)(build_index).options(num_cpus=threads, num_gpus=1 if gpu else 0)
    stats = ray.get(task.remote(data_uri, shards, plan, cfg, stage, threads, gpu))
    plan = stats.pop("plan")
    if stats["ntotal"] != rows:
        raise IndexBuildError(f"index holds {stats['ntotal']} vectors, the shards {rows}")
    meta = {"plan": plan.to_dict(), "factory": plan.factory, "rows": rows, "model": embed_report["model"],
            "max_seq_length": embed_report["max_seq_length"], "corpus": embed_report["corpus"], "gpu": stats["gpu"]}
    stage.write_json("index.json", meta)
    report = {"stage": "index", "rows_in": rows, "rows_out": rows, "rows_quarantined": 0, "rows_filtered": {},
              "kind": plan.kind, "factory": plan.factory, "nlist": plan.nlist, "nprobe": plan.nprobe,
              "shards": len(shards), **stats, **clock.timings(),
              "outputs": {"index": stage.child("index.faiss"), "row_ids": stage.child("row_ids.npy"),
                          "meta": stage.child("index.json")}}
    write_report(stage, report, "\n".join([
        "# index — faiss index of the corpus embeddings (CRAFT step 2)", "",
        markdown_table([("vectors", rows), ("kind", f"{plan.kind} (`{plan.factory}`)"),
                        ("cells searched (nprobe / nlist)", f"{plan.nprobe} / {plan.nlist}" if plan.nlist else "-"),
                        (f"recall@{RECALL_AT} against exact search ({cfg.calibration_queries} corpus vectors as "
                         "queries)", stats.get("recall_at_10", "1.0 (exact)")),
                        ("recall by search depth", ", ".join(f"{d}: {r}" for d, r in
                                                             stats.get("recall_curve", {}).items()) or "-"),
                        ("trained on", stats["train_rows"]), ("train seconds", stats["train_seconds"]),
                        ("add seconds", stats["add_seconds"]), ("index size (MiB)", round(stats["index_bytes"] / 2**20, 1)),
                        ("on GPU", stats["gpu"]), ("peak memory of the build (MiB)", stats["peak_rss_mib"]),
                        ("seconds", report["seconds"])]), ""]))
    return report


class IndexReport(StageReport):
    kind: str
    factory: str


class Index(Stage):
    name, config, report = "index", IndexConfig, IndexReport
    help = "CRAFT step 2: a faiss index of the embeddings (exact, IVF, IVF-PQ or HNSW; recall measured)."

    def run(self, cfg: IndexConfig, stage: StageDir, recipe) -> dict:
        return run_index(cfg, stage)

    def summary(self, r: IndexReport) -> str:
        return f"index: {r.rows_out:,} vectors, {r.kind} ({r.factory}), built in {r.seconds:.1f}s"
