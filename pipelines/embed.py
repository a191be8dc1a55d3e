"""CRAFT step 1 — embed the corpus: a Ray Data actor pool of sentence-transformers models (GPUs when actors get
them) writes normalised float16 vectors with their row ids as Parquet shards (``embed/data/*.parquet``), which the
index step reads shard by shard."""

from __future__ import annotations

import json
import time

import pyarrow.dataset as pads
import ray
from ray.data import ActorPoolStrategy

from ..actors.embedding import SentenceEmbedder
from . import corpus
from .corpus import READ_TASK_CPUS, CorpusSpec, read_corpus
from .recipe import EmbedConfig
from .report import markdown_table, write_report
from .rundir import StageDir

QUARANTINE_PARTS = "_quarantine"


def embedder_pool_size(cfg: EmbedConfig, cluster_cpus: int) -> int:
    if cfg.concurrency is not None:
        return cfg.concurrency
    if cfg.num_gpus:
        return max(1, int(ray.cluster_resources().get("GPU", 0) // cfg.num_gpus))
    return max(1, int((cluster_cpus - READ_TASK_CPUS) // cfg.num_cpus))


def run_embed(cfg: EmbedConfig, stage: StageDir) -> dict:
    started = time.perf_counter()
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    data_uri, parts_uri = stage.child("data"), stage.child(QUARANTINE_PARTS)
    (read_corpus(CorpusSpec(cfg.corpus, cfg.text_field, cfg.id_field), num_cpus=READ_TASK_CPUS,
                 quarantine_dir=parts_uri)
        .map_batches(SentenceEmbedder,
                     fn_constructor_kwargs={"model": cfg.model, "text_field": cfg.text_field,
                                            "keep_columns": [cfg.id_field, corpus.ORDER], "batch_size": cfg.batch_size,
                                            "max_seq_length": cfg.max_seq_length},
                     compute=ActorPoolStrategy(size=embedder_pool_size(cfg, cpus)),
                     num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus or None,
                     batch_size=cfg.batch_size * 8, batch_format="pyarrow")
        .write_parquet(data_uri))
    seconds_embedding = time.perf_counter() - started

    quarantine = _gather_quarantine(stage)
    fs, path = StageDir(data_uri).fs_path
    try:
        dataset = pads.dataset(path, filesystem=fs, format="parquet")
        rows_out, dim = dataset.count_rows(), dataset.schema.field("embedding").type.list_size
    except (FileNotFoundError, KeyError):
        rows_out, dim = 0, None
    rows_in = rows_out + len(quarantine)
    report = {
        "stage": "embed", "rows_in": rows_in, "rows_out": rows_out, "rows_quarantined": len(quarantine),
        "rows_filtered": {}, "model": cfg.model, "dimensions": dim, "dtype": "float16", "normalised": True,
        "docs_per_second": round(rows_in / max(seconds_embedding, 1e-9), 1),
        "seconds": round(time.perf_counter() - started, 3),
        "outputs": {"data": data_uri, "quarantine": stage.child("quarantine.jsonl")},
    }
    write_report(stage, report, "\n".join([
        "# embed — corpus embeddings (CRAFT step 1)", "",
        markdown_table([("rows in", rows_in), ("rows embedded", rows_out), ("quarantined", len(quarantine)),
                        ("model", cfg.model), ("dimensions", dim), ("documents / second", report["docs_per_second"]),
                        ("seconds", report["seconds"])]), ""]))
    return report


def _gather_quarantine(stage: StageDir) -> list[dict]:
    """The read tasks' per-file quarantine parts, merged into ``quarantine.jsonl`` in file order."""
    fs, root = StageDir(stage.child(QUARANTINE_PARTS)).fs_path
    rows: list[dict] = []
    info = fs.get_file_info(root)
    if info.type.name == "Directory":
        from pyarrow.fs import FileSelector

        for part in sorted(fs.get_file_info(FileSelector(root)), key=lambda i: i.path):
            with fs.open_input_stream(part.path) as f:
                rows += [json.loads(line) for line in f.read().decode().splitlines() if line]
    stage.write_jsonl("quarantine.jsonl", [{"input": "corpus", **r} for r in rows])
    stage.delete(QUARANTINE_PARTS)
    return rows
