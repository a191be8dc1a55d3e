"""CRAFT step 1 — embed the corpus: a Ray Data actor pool of sentence-transformers models (GPUs when actors get
them) writes normalised float16 vectors with their row ids as Parquet shards (``embed/data/*.parquet``), which the
index step reads shard by shard."""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow.dataset as pads
import ray
from pydantic import ByteSize, Field
from ray.data import ActorPoolStrategy

from ...actors.embedding import SentenceEmbedder
from .. import corpus, paths
from ..corpus import READ_TASK_CPUS, SUPPORTED_SUFFIXES, CorpusSpec, read_corpus, reading_cpus
from ..paths import expand_inputs
from ..report import markdown_table, write_report
from ..resources import cluster_cpus, cluster_gpus
from ..rundir import QUARANTINE_PARTS, StageDir, StageError, gather_quarantine
from ..schema import IdField, InputPaths, ModelRef, Strict
from ..stage import Stage, StageClock, StageReport, check_inputs
from ..unique_ids import make_ids_unique


class EmbedConfig(Strict):
    corpus: Optional[InputPaths] = Field(None, description="Documents to embed: files, directories or globs, local "
                                                         "or URIs; null = this run's select output.")
    text_field: str = Field("text", description="Field holding the text.")
    id_field: IdField = "id"
    model: ModelRef = Field("all-MiniLM-L6-v2", description="sentence-transformers id or path (default bundled).")
    batch_size: int = Field(64, gt=0, description="Texts per forward pass.")
    max_seq_length: Optional[int] = Field(256, gt=0, description="Tokens per text; null = the model's own.")
    num_cpus: Optional[float] = Field(None, gt=0, description="CPUs per embedding actor (torch threads); null = "
                                                              "the cluster's CPUs shared out over the actors.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per embedding actor (GPU clusters).")
    concurrency: Optional[int] = Field(None, gt=0, description="Embedding actors; null = one per CPU (per GPU "
                                                               "when num_gpus is set).")
    memory: Optional[ByteSize] = Field(None, description="Host memory Ray reserves for each embedding actor (bytes, "
                                                         "or a size such as 1.2GiB): actors are placed where it "
                                                         "fits, and Ray Data stops warning that the pool asks for "
                                                         "none. null = none reserved.")

# Batches per actor call (and per block). sentence-transformers sorts a call's texts by length, so bigger calls pad
# less (measured on 20k documents: 4 batches a call cost 12% against one process encoding 5,000 texts a call).
FORWARD_PASSES_PER_CALL = 8


class EmbedError(StageError):
    """The embed stage cannot run as configured; the message names the field."""


def embedder_pool(cfg: EmbedConfig, cluster_cpus: int) -> tuple[int, float]:
    """(actors, CPUs per actor). On CPUs the default is one actor per CPU sharing what the read task leaves: several
    single-threaded torch processes embed faster than one multi-threaded one (tokenisation is serial)."""
    reserved, _ = reading_cpus(cluster_cpus)
    if cfg.num_gpus:
        actors = cfg.concurrency or max(1, int(cluster_gpus() // cfg.num_gpus))
        return actors, cfg.num_cpus or 1.0
    if cfg.num_cpus is None:
        actors = cfg.concurrency or cluster_cpus
        cpus = (cluster_cpus - reserved) / actors
    else:
        actors = cfg.concurrency or max(1, int((cluster_cpus - reserved) // cfg.num_cpus))
        cpus = cfg.num_cpus
    if actors * cpus + reserved > cluster_cpus + 1e-9 or cpus <= 0:
        raise EmbedError(f"embed.concurrency/num_cpus: {actors} actors x {cpus:g} CPUs and the read tasks need "
                         f"{actors * cpus + reserved:g} CPUs, the cluster has {cluster_cpus}")
    return actors, cpus


def blocks_for_actors(rows: int, actors: int, batch_size: int) -> tuple[int, int]:
    """(actors, rows per block) for a corpus of about ``rows``. Embedding costs ~1,000x more per row than reading,
    and Ray Data hands whole blocks to actors: blocks of a few batches spread the work over every actor (one
    4,096-row read block would keep one actor busy for minutes); a smaller corpus is cut into one block per actor, and
    one of fewer batches than actors gets an actor per batch (each actor loads the model: an idle one is waste)."""
    actors = max(1, min(actors, -(-rows // batch_size)))
    return actors, max(batch_size, min(batch_size * FORWARD_PASSES_PER_CALL, -(-rows // actors)))


def corpus_paths(cfg: EmbedConfig, stage: StageDir) -> list[str]:
    """The recipe's corpus, or (when it names none) the select stage's output in the same run."""
    return cfg.corpus or [stage.sibling("select", "data")]


def run_embed(cfg: EmbedConfig, stage: StageDir) -> dict:
    clock = StageClock()
    cpus = cluster_cpus()
    actors, cpus_per_actor = embedder_pool(cfg, cpus)
    _, cut_blocks = reading_cpus(cpus)
    spec = CorpusSpec(corpus_paths(cfg, stage), cfg.text_field, cfg.id_field)
    _, files = expand_inputs(spec.paths, SUPPORTED_SUFFIXES)
    data_uri, parts_uri = stage.child("data"), stage.child(QUARANTINE_PARTS)
    actors, rows_per_block = blocks_for_actors(corpus.estimate_rows(spec.paths), actors, cfg.batch_size)
    (read_corpus(spec, num_cpus=READ_TASK_CPUS, quarantine_dir=parts_uri,
                 rows_per_block=rows_per_block if cut_blocks else None)
        .map_batches(SentenceEmbedder,
                     fn_constructor_kwargs={"model": cfg.model, "text_field": cfg.text_field,
                                            "keep_columns": [cfg.id_field, corpus.ORDER], "batch_size": cfg.batch_size,
                                            "max_seq_length": cfg.max_seq_length,
                                            "torch_threads": max(1, round(cpus_per_actor))},
                     compute=ActorPoolStrategy(size=actors),
                     num_cpus=cpus_per_actor, num_gpus=cfg.num_gpus or None,
                     **({"memory": int(cfg.memory)} if cfg.memory else {}),
                     batch_size=rows_per_block, batch_format="pyarrow")
        .write_parquet(data_uri))
    seconds_embedding = clock.seconds()
    ids_renamed = make_ids_unique([data_uri], cfg.id_field)

    quarantine = gather_quarantine(stage, "corpus")
    fs, path = StageDir(data_uri).fs_path
    try:
        dataset = pads.dataset(path, filesystem=fs, format="parquet")
        rows_out, dim = dataset.count_rows(), dataset.schema.field("embedding").type.list_size
    except (FileNotFoundError, KeyError):
        rows_out, dim = 0, None
    rows_in = rows_out + len(quarantine)
    report = {
        "stage": "embed", "rows_in": rows_in, "rows_out": rows_out, "rows_quarantined": len(quarantine),
        "rows_filtered": {}, "ids_made_unique": ids_renamed, "model": cfg.model, "max_seq_length": cfg.max_seq_length, "dimensions": dim,
        "dtype": "float16", "normalised": True,
        # What the index and retrieve steps need to map vectors back to documents (``_order`` numbers these files).
        "corpus": {"paths": spec.paths, "files": [f.path for f in files], "text_field": cfg.text_field,
                   "id_field": cfg.id_field},
        "actors": actors, "cpus_per_actor": round(cpus_per_actor, 3),
        "docs_per_second": round(rows_in / max(seconds_embedding, 1e-9), 1),
        **clock.timings(),
        "outputs": {"data": data_uri, "quarantine": stage.child("quarantine.jsonl")},
    }
    write_report(stage, report, "\n".join([
        "# embed — corpus embeddings (CRAFT step 1)", "",
        markdown_table([("rows in", rows_in), ("rows embedded", rows_out), ("quarantined", len(quarantine)),
                        ("ids made unique (ID#k)", ids_renamed),
                        ("model", cfg.model), ("dimensions", dim), ("documents / second", report["docs_per_second"]),
                        ("seconds", report["seconds"])]), ""]))
    return report



def embed_texts(texts: list[str], model: str, max_seq_length: int | None = 256) -> np.ndarray:
    """Normalised float32 vectors for a few thousand texts (grouping problems, report measures), computed in one
    Ray task so that the driver never loads a model."""
    if not texts:
        return np.zeros((0, 0), np.float32)
    return ray.get(_embed_task.remote(texts, model, max_seq_length))


@ray.remote(num_cpus=1)
def _embed_task(texts: list[str], model: str, max_seq_length: int | None) -> np.ndarray:
    import torch

    from ...actors.embedding import encode, load_sentence_model

    torch.set_num_threads(1)
    return encode(load_sentence_model(model, max_seq_length), texts, batch_size=64).astype(np.float32)


class EmbedReport(StageReport):
    model: str
    dimensions: Optional[int]  # null when nothing was embedded
    docs_per_second: float


class Embed(Stage):
    name, config, report = "embed", EmbedConfig, EmbedReport
    help = "CRAFT step 1: corpus embeddings (sentence-transformers) in a Ray Data actor pool."

    def check_recipe(self, cfg: EmbedConfig, recipe) -> None:
        if cfg.corpus is None and recipe.select is None:
            raise ValueError("embed.corpus: required unless the recipe has a select section (then embed reads "
                             "select's output)")

    def preflight(self, cfg: EmbedConfig, recipe) -> None:
        if cfg.corpus is not None:  # null: select's output, made by this run
            check_inputs("embed.corpus", cfg.corpus)

    def upstream(self, cfg: EmbedConfig, recipe) -> dict[str, str]:
        return {} if cfg.corpus else {"embed.corpus": paths.join(recipe.run_dir, "select", "data")}

    def run(self, cfg: EmbedConfig, stage: StageDir, recipe) -> dict:
        return run_embed(cfg, stage)

    def summary(self, r: EmbedReport) -> str:
        return (f"embed: {r.rows_out:,} of {r.rows_in:,} documents embedded ({r.model}, {r.dimensions} dimensions); "
                f"quarantined {r.rows_quarantined:,}; {r.docs_per_second:,.0f} docs/s")
