"""CRAFT step 3 — retrieve the corpus documents most similar to the user's few-shot examples.

As the CRAFT authors did, half of ``top_k`` comes from each few-shot's own nearest documents (taken round-robin, so
every few-shot is represented) and half from the documents nearest to all few-shots on average (for normalised
vectors, the mean cosine similarity to the few-shots is the inner product with their mean vector: one query).
Each list is over-fetched, then near-duplicates (cosine >= ``near_duplicate_similarity`` to a better hit, which
covers exact copies) are dropped; when too few distinct hits remain for either half (few-shots often share their
nearest documents), the lists are fetched again, twice as deep.
The chosen documents are read back from the corpus with every field, plus ``score`` (cosine similarity to the
closest few-shot), ``matched_few_shot`` (that few-shot's position in the few-shot file), ``mean_score``,
``retrieved_by`` (``few_shot`` or ``mean``) and ``rank``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import ray
from pydantic import Field

from ...actors.vector_index import IndexPlan, VectorSearcher
from .. import corpus
from ..corpus import (LONE_SURROGATE, CorpusSpec, drop_internal_columns, has_lone_surrogate, open_lines, read_corpus,
                      without_operator_reservations)
from ..paths import expand_inputs
from ..report import embedding_map_png, markdown_table, similarity_histogram_png, write_report
from ..resources import largest_node_cpus
from ..rundir import StageDir, StageError, count_parquet_rows
from ..schema import InputPath, InputPaths, Strict
from ..stage import Stage, StageClock, StageReport
from ..unique_ids import make_ids_unique
from .index import wants_gpu


class RetrieveConfig(Strict):
    few_shots: InputPaths = Field(description="The task's few-shot examples (JSONL; CRAFT's Text/Instruction/Output "
                                            "format works as is).")
    few_shot_field: Optional[str] = Field(None, description="Few-shot field to embed; null = 'text', else 'Text'.")
    top_k: int = Field(1000, gt=0, description="Documents to return.")
    per_few_shot_fraction: float = Field(0.5, ge=0, le=1, description="Share of top_k filled from each "
                                         "few-shot's own top hits (the rest: by mean similarity to all few-shots).")
    overfetch: float = Field(0.2, ge=0, description="Fetch this much more than needed, to absorb duplicates.")
    near_duplicate_similarity: float = Field(0.95, gt=0, le=1, description="Hits at least this similar (cosine) "
                                             "to a better hit are duplicates and dropped.")
    index: Optional[InputPath] = Field(None, description="The index step's folder; null = this run's index/.")
    map_sample: int = Field(2000, ge=0, description="Corpus vectors drawn for the report's embedding map.")
    num_cpus: Optional[int] = Field(None, gt=0, description="CPUs (threads) of the search actor; null = the "
                                                            "largest node's.")


class RetrieveError(StageError):
    """Retrieval cannot run: a bad few-shot file, a missing index, a corpus that does not match the index."""


# ----------------------------------------------------------------------------------------------------- few-shots
def load_few_shots(specs: list[str], text_field: str | None) -> tuple[list[str], str]:
    """The few-shot texts and the field they came from. Few-shots are a handful of hand-written examples, so a bad
    line is an error naming file, line and reason (not a quarantined row)."""
    from ..corpus import JSONL_SUFFIXES

    try:
        fs, files = expand_inputs(specs, JSONL_SUFFIXES)
    except (FileNotFoundError, ValueError) as e:
        raise RetrieveError(f"retrieve.few_shots: {e}") from None
    texts, used = [], text_field
    for file in files:
        with open_lines(fs, file.path) as lines:
            records = [(number, line.decode("utf-8", errors="replace")) for number, line in lines if line.strip()]
        for number, line in records:
            where = f"retrieve.few_shots: {file.key}, line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise RetrieveError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise RetrieveError(f"{where}: expected a JSON object, got {type(record).__name__}")
            if has_lone_surrogate(line.encode("utf-8", "surrogatepass"), record):
                raise RetrieveError(f"{where}: {LONE_SURROGATE}")
            if used is None:
                used = next((k for k in ("text", "Text") if k in record), None)
                if used is None:
                    raise RetrieveError(f"{where}: no 'text' or 'Text' field (fields: {', '.join(record) or 'none'}); "
                                        "name the field to embed with --few-shot-field / retrieve.few_shot_field")
            value = record.get(used)
            if not isinstance(value, str) or not value.strip():
                raise RetrieveError(f"{where}: field {used!r} is {'missing' if value is None else 'not a non-empty string'}")
            texts.append(value)
    if not texts:
        raise RetrieveError(f"retrieve.few_shots: no examples in {', '.join(specs)}")
    return texts, used


# --------------------------------------------------------------------------------------------- choosing the hits
@dataclass
class Hits:
    positions: list[int] = field(default_factory=list)  # index positions, best first
    retrieved_by: list[str] = field(default_factory=list)
    candidates: int = 0  # distinct documents the searches returned
    near_duplicates: int = 0  # of those, dropped as near-duplicates of a chosen document
    few_shot_lists_short: bool = False  # the few-shots' own lists could not fill their share of top_k
    fetch_rounds: int = 0


def near_duplicate_neighbours(vectors: np.ndarray, threshold: float) -> list[np.ndarray]:
    """For each vector, the others at cosine >= threshold (faiss range search over the candidates)."""
    import faiss

    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    # Range search keeps scores strictly above the radius; float16 storage makes exact copies score 1 +- 1e-3.
    limits, _, found = flat.range_search(vectors, threshold - 1e-6)
    return [found[limits[i]:limits[i + 1]] for i in range(len(vectors))]


def choose_hits(search: Callable, vectors: Callable, queries: np.ndarray, n_rows: int, top_k: int,
                per_few_shot_fraction: float, overfetch: float, near_duplicate_similarity: float) -> Hits:
    """CRAFT's half-and-half pool, deduplicated. ``search(queries, k) -> (scores, positions)`` and
    ``vectors(positions)`` are the index's; pure otherwise."""
    shot_quota = round(top_k * per_few_shot_fraction)
    depth = 1.0 + overfetch
    rounds = 0
    while True:
        rounds += 1
        k_shot = min(n_rows, math.ceil(shot_quota / len(queries) * depth)) if shot_quota else 0
        k_mean = min(n_rows, math.ceil(top_k * depth))
        shot_lists = [row[row >= 0] for row in search(queries, k_shot)[1]] if k_shot else []
        mean_list = search(queries.mean(axis=0, keepdims=True), k_mean)[1][0]
        mean_list = mean_list[mean_list >= 0]
        hits = _greedy_pick(shot_lists, mean_list, vectors, top_k, shot_quota, near_duplicate_similarity)
        hits.fetch_rounds = rounds
        exhausted = k_mean >= n_rows and (k_shot == 0 or k_shot >= n_rows)
        if (len(hits.positions) >= top_k and not hits.few_shot_lists_short) or exhausted:
            return hits
        depth *= 2


def _greedy_pick(shot_lists: list[np.ndarray], mean_list: np.ndarray, vectors: Callable, top_k: int,
                 shot_quota: int, threshold: float) -> Hits:
    candidates = np.unique(np.concatenate([*shot_lists, mean_list]).astype(np.int64))
    slot = {int(p): i for i, p in enumerate(candidates)}
    neighbours = near_duplicate_neighbours(vectors(candidates), threshold)
    taken = np.zeros(len(candidates), bool)
    blocked = np.zeros(len(candidates), bool)
    hits = Hits(candidates=len(candidates))

    def take(position: int, how: str) -> bool:
        i = slot[int(position)]
        if taken[i] or blocked[i]:
            return False
        taken[i] = True
        blocked[neighbours[i]] = True
        hits.positions.append(int(position))
        hits.retrieved_by.append(how)
        return True

    def round_robin(limit: int) -> None:
        cursors = [0] * len(shot_lists)
        while len(hits.positions) < limit:
            progressed = False
            for s, hits_of_shot in enumerate(shot_lists):
                while cursors[s] < len(hits_of_shot) and len(hits.positions) < limit:
                    cursors[s] += 1
                    progressed = True
                    if take(hits_of_shot[cursors[s] - 1], "few_shot"):
                        break
            if not progressed:
                return

    round_robin(min(shot_quota, top_k))
    hits.few_shot_lists_short = len(hits.positions) < min(shot_quota, top_k)
    for position in mean_list:
        if len(hits.positions) >= top_k:
            break
        take(position, "mean")
    round_robin(top_k)  # the mean list ran dry: fill from the few-shots' lists
    hits.near_duplicates = int((blocked & ~taken).sum())
    return hits


# ----------------------------------------------------------------------------------------------------- the stage
def index_metadata(cfg: RetrieveConfig, stage: StageDir) -> tuple[StageDir, dict]:
    index_dir = StageDir(cfg.index or stage.sibling("index"))
    meta = index_dir.read_json("index.json")
    if not meta:
        raise RetrieveError(f"retrieve: no index in {index_dir.uri} (run embed and index first, or point "
                            "retrieve.index at one)")
    return index_dir, meta


def check_same_corpus(meta: dict, paths: list[str], index_uri: str) -> None:
    """``_order`` numbers the files the index was built from: reading back from other files would return the wrong
    documents."""
    _, files = expand_inputs(paths, corpus.SUPPORTED_SUFFIXES)
    if [f.path for f in files] != meta["corpus"]["files"]:
        raise RetrieveError(f"the index in {index_uri} was built from {', '.join(meta['corpus']['paths'])}, not from "
                            f"{', '.join(paths)}; use another run directory (--out) for another corpus")


def run_retrieve(cfg: RetrieveConfig, stage: StageDir) -> dict:
    clock = StageClock()
    index_dir, meta = index_metadata(cfg, stage)
    shots, shot_field = load_few_shots(cfg.few_shots, cfg.few_shot_field)
    plan = IndexPlan(**meta["plan"])
    threads = cfg.num_cpus or largest_node_cpus()
    gpu = wants_gpu(None, plan) and meta.get("gpu", False)
    fs, index_path = index_dir.fs_path
    with clock.phase("search"):
        searcher = ray.remote(VectorSearcher).options(num_cpus=threads, num_gpus=1 if gpu else 0).remote(
            fs, index_path, plan.to_dict(), meta["model"], meta["max_seq_length"], threads, gpu)
        try:
            queries = ray.get(searcher.embed.remote(shots))
            n_rows = ray.get(searcher.size.remote())
            hits = choose_hits(lambda q, k: ray.get(searcher.search.remote(q, k)),
                               lambda p: ray.get(searcher.vectors.remote(p)),
                               queries, n_rows, cfg.top_k, cfg.per_few_shot_fraction, cfg.overfetch,
                               cfg.near_duplicate_similarity)
            positions = np.asarray(hits.positions, np.int64)
            chosen_vectors = ray.get(searcher.vectors.remote(positions))
            orders = ray.get(searcher.orders.remote(positions))
            sample = np.random.default_rng(0).choice(n_rows, size=min(cfg.map_sample, n_rows), replace=False)
            sample_vectors = ray.get(searcher.vectors.remote(np.sort(sample)))
        finally:
            ray.kill(searcher)  # its CPUs go back to the read tasks below

    similarity = chosen_vectors @ queries.T
    best = similarity.max(axis=1)
    chosen = pa.table({
        corpus.ORDER: pa.array(orders, pa.int64()),
        "rank": pa.array(np.arange(1, len(orders) + 1), pa.int32()),
        "score": pa.array(best, pa.float32()),
        "matched_few_shot": pa.array(similarity.argmax(axis=1), pa.int32()),
        "mean_score": pa.array(similarity.mean(axis=1), pa.float32()),
        "retrieved_by": pa.array(hits.retrieved_by, pa.string()),
    })
    data_uri = stage.child("data")
    spec = CorpusSpec(meta["corpus"]["paths"], meta["corpus"]["text_field"], meta["corpus"]["id_field"])
    with without_operator_reservations():
        (read_corpus(spec, only_rows=chosen)
            .map_batches(drop_internal_columns, batch_format="pyarrow", batch_size=None)
            .sort("rank")
            .write_parquet(data_uri))
    rows_written = count_parquet_rows(data_uri)
    ids_renamed = make_ids_unique([data_uri], spec.id_field)
    if rows_written != len(orders):
        raise RetrieveError(f"read back {rows_written} documents from the corpus for {len(orders)} hits: the corpus "
                            f"changed since it was embedded ({', '.join(spec.paths)})")

    sample_best = (sample_vectors @ queries.T).max(axis=1) if len(sample) else np.zeros(0)
    stage.write_bytes("embedding_map.png", embedding_map_png(sample_vectors, queries, chosen_vectors,
                                                             "retrieve: corpus, few-shots and retrieved documents"))
    stage.write_bytes("scores.png", similarity_histogram_png(sample_best, best))
    report = {
        "stage": "retrieve", "rows_in": hits.candidates, "rows_out": len(orders), "rows_quarantined": 0,
        "rows_filtered": {"near_duplicate": hits.near_duplicates,
                          "below_top_k": hits.candidates - len(orders) - hits.near_duplicates},
        "ids_made_unique": ids_renamed,
        "few_shots": len(shots), "few_shot_field": shot_field, "top_k": cfg.top_k, "corpus_rows": n_rows,
        "retrieved_by": {how: hits.retrieved_by.count(how) for how in ("few_shot", "mean")},
        "matched_few_shot_counts": np.bincount(chosen.column("matched_few_shot").to_numpy(),
                                               minlength=len(shots)).tolist(),
        "score": _summary(best), "corpus_sample_score": _summary(sample_best),
        "fetch_rounds": hits.fetch_rounds, "index": index_dir.uri, "index_kind": plan.kind,
        **clock.timings(),
        "outputs": {"data": data_uri},
    }
    write_report(stage, report, render_markdown(report))
    return report


def _summary(values: np.ndarray) -> dict | None:
    if not len(values):
        return None
    q = np.quantile(values, [0.0, 0.5, 1.0])
    return {"min": round(float(q[0]), 4), "median": round(float(q[1]), 4), "max": round(float(q[2]), 4)}


def render_markdown(report: dict) -> str:
    f = report["rows_filtered"]
    s, c = report["score"] or {}, report["corpus_sample_score"] or {}
    counts = ", ".join(f"#{i}: {n}" for i, n in enumerate(report["matched_few_shot_counts"]))
    return "\n".join([
        "# retrieve — documents like the few-shots (CRAFT step 3)", "",
        markdown_table([
            ("few-shots", report["few_shots"]), ("corpus documents", report["corpus_rows"]),
            ("candidates searched out", report["rows_in"]), ("retrieved (top_k)", f"{report['rows_out']:,} "
                                                                                   f"(asked {report['top_k']:,})"),
            ("by each few-shot's own hits / by mean similarity",
             f"{report['retrieved_by']['few_shot']:,} / {report['retrieved_by']['mean']:,}"),
            ("dropped: near-duplicates", f["near_duplicate"]), ("not needed (below top_k)", f["below_top_k"]),
            ("ids made unique (ID#k)", report["ids_made_unique"]),
            ("score of retrieved (min / median / max)", f"{s.get('min')} / {s.get('median')} / {s.get('max')}"),
            ("score of a corpus sample (min / median / max)", f"{c.get('min')} / {c.get('median')} / {c.get('max')}"),
            ("index", f"{report['index_kind']} ({report['index']})"), ("seconds", report["seconds"]),
        ]), "",
        "`score` is the cosine similarity to the closest few-shot.", "",
        "![embedding map](embedding_map.png)", "", "![scores](scores.png)", "",
        f"Retrieved documents per matched few-shot: {counts}.", ""])


class RetrieveReport(StageReport):
    few_shots: int
    retrieved_by: dict[str, int]
    score: Optional[dict]


class Retrieve(Stage):
    name, config, report = "retrieve", RetrieveConfig, RetrieveReport
    help = "CRAFT step 3: the corpus documents most like the task's few-shot examples."

    def preflight(self, cfg: RetrieveConfig, recipe) -> None:
        load_few_shots(cfg.few_shots, cfg.few_shot_field)

    def run(self, cfg: RetrieveConfig, stage: StageDir, recipe) -> dict:
        return run_retrieve(cfg, stage)

    def summary(self, r: RetrieveReport) -> str:
        return (f"retrieve: {r.rows_out:,} documents for {r.few_shots} few-shots ({r.retrieved_by['few_shot']:,} by "
                f"their own hits, {r.retrieved_by['mean']:,} by mean similarity); "
                f"{r.rows_filtered['near_duplicate']:,} near-duplicates dropped; score median "
                f"{(r.score or {}).get('median')}")
