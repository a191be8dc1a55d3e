"""TRAIT step 1 — in-domain data selection.

1. Train a fastText classifier: positives are the user's in-domain examples, negatives a random sample of the
   general corpus (or a negatives file). It trains in a fresh process and is saved as ``classifier.bin``.
2. Score every corpus document on Ray Data workers: ``domain_score`` = P(in-domain) from an actor pool that loads
   the model once per worker, and ``quality_score`` (educational value) from a pluggable scorer.
3. Keep the top fraction (or everything above a threshold) by domain score, then those of good quality, then drop
   exact duplicates, and write ``data/*.parquet``, ``quarantine.jsonl`` and the report.

A top-fraction cut needs every score before it can choose, so the corpus is read twice: the scoring pass streams
only the per-row scores back to the driver (a few columns), and the writing pass reads back just the chosen rows
(the other lines are skipped before parsing) with their scores attached. No copy of the corpus text is staged.
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import Annotated, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from pydantic import Field, field_validator, model_validator
from ray.data import ActorPoolStrategy

from ...actors.fasttext_domain import FastTextDomainScorer, FastTextParams, normalise_text, train_classifier
from ...actors.quality import HeuristicQualityScorer, HFQualityScorer
from .. import corpus
from ..corpus import (READ_TASK_CPUS, CorpusSpec, drop_internal_columns, read_corpus, read_texts_locally,
                      without_operator_reservations)
from ..report import markdown_table, score_histogram_png, write_report
from ..resources import cluster_cpus
from ..rundir import StageDir, StageError, count_parquet_rows, read_file_bytes
from ..schema import IdField, InputPath, InputPaths, PathRole, Strict
from ..stage import Stage, StageClock, StageReport, check_file, check_inputs
from ..unique_ids import make_ids_unique


class FastTextConfig(Strict):
    epoch: int = Field(5, gt=0, description="Training epochs.")
    lr: float = Field(0.1, gt=0, description="Learning rate.")
    word_ngrams: int = Field(2, ge=1, le=5, description="Word n-grams (bigrams help).")
    dim: int = Field(32, gt=0, description="Vector size (small: the task is binary).")
    bucket: int = Field(262_144, gt=0, description="Hash buckets for n-grams.")
    min_count: int = Field(2, ge=1, description="Fewest occurrences of a word to learn it.")
    balance_classes: bool = Field(True, description="Upsample positives to the number of negatives.")
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="Held out of both classes to report "
                                                                   "precision and recall.")
    seed: int = Field(13, description="Sampling and training seed.")
    threads: int = Field(1, ge=1, description="Training threads; 1 keeps training reproducible (fastText's "
                                              "multi-threaded SGD is not).")


# "hf:MODEL" names a model (a Hugging Face id or folder) after its prefix.
QualityScorer = Annotated[str, PathRole("model", prefix="hf:")]


class QualityConfig(Strict):
    scorer: QualityScorer = Field("heuristic", description="'heuristic', 'none', or 'hf:MODEL' (Hugging Face id or path).")
    min_score: float = Field(0.8, ge=0, le=1, description="Keep documents whose quality_score is at least this.")
    max_length: int = Field(512, gt=0, description="hf: tokens per document.")
    max_score: float = Field(5.0, gt=0, description="hf regression heads: the grade that maps to 1.0.")
    batch_size: int = Field(32, gt=0, description="hf: documents per forward pass.")
    num_gpus: float = Field(0.0, ge=0, description="hf: GPUs per scoring actor.")
    concurrency: int = Field(1, gt=0, description="hf: scoring actors.")

    @field_validator("scorer")
    @classmethod
    def _known_scorer(cls, value: str) -> str:
        if value in ("heuristic", "none") or (value.startswith("hf:") and len(value) > 3):
            return value
        raise ValueError(f"expected 'heuristic', 'none' or 'hf:MODEL', got {value!r}")


class SelectConfig(Strict):
    in_domain: InputPaths = Field(description="The small in-domain set (JSONL/Parquet): the classifier's positives.")
    corpus: InputPaths = Field(description="The general corpus: files, directories or globs, local or URIs.")
    text_field: str = Field("text", description="Field holding the text.")
    in_domain_text_field: Optional[str] = Field(None, description="Text field of the in-domain file; "
                                                                  "null = text_field.")
    id_field: IdField = "id"
    negatives: Optional[InputPaths] = Field(None, description="General-text negatives; null = sample the corpus.")
    negatives_sample: int = Field(20_000, gt=0, description="How many negatives to train on.")
    classifier: Optional[InputPath] = Field(None, description="A trained fastText model to reuse instead of training.")
    keep_fraction: Optional[float] = Field(None, gt=0, le=1, description="Keep this top fraction by domain score.")
    threshold: Optional[float] = Field(None, ge=0, le=1, description="Keep domain_score >= threshold "
                                                                     "(default 0.5 when keep_fraction is unset).")
    dedup: bool = Field(True, description="Drop exact duplicates (normalised text hash) among kept documents.")
    batch_size: int = Field(1024, gt=0, description="Documents per scoring batch.")
    scorer_concurrency: Optional[int] = Field(None, gt=0, description="fastText scoring actors; null = one per CPU.")
    fasttext: FastTextConfig = FastTextConfig()
    quality: QualityConfig = QualityConfig()

    @model_validator(mode="after")
    def _one_selection_rule(self) -> "SelectConfig":
        if self.keep_fraction is not None and self.threshold is not None:
            raise ValueError("set keep_fraction or threshold, not both")
        return self

    @property
    def effective_threshold(self) -> Optional[float]:
        if self.keep_fraction is not None:
            return None
        return 0.5 if self.threshold is None else self.threshold

TEXT_HASH = "_text_hash"
N_TOKENS = "_n_tokens"
CLASSIFIER_FILE = "classifier.bin"


class SelectError(StageError):
    pass


# --------------------------------------------------------------------------------------------------- step 1: train
@ray.remote(max_calls=1)  # a fresh worker process per training: the fastText wheel cannot train twice in one process
def _train_in_fresh_process(positives, negatives, params: FastTextParams):
    return train_classifier(positives, negatives, params)


def sample_negatives(cfg: SelectConfig, n: int, seed: int) -> list[str]:
    """Up to ``n`` texts drawn uniformly from the negatives file, or from the corpus itself."""
    if cfg.negatives:
        texts, _ = read_texts_locally(CorpusSpec(cfg.negatives, cfg.text_field, cfg.id_field))
        return random.Random(seed).sample(texts, min(n, len(texts)))
    ds = read_corpus(CorpusSpec(cfg.corpus, cfg.text_field, cfg.id_field))
    estimated_rows = corpus.estimate_rows(cfg.corpus)
    fraction = min(1.0, 1.5 * n / max(estimated_rows, 1))
    if fraction < 1.0:
        ds = ds.random_sample(fraction, seed=seed)
    sampled = ds.map_batches(_texts_only, fn_kwargs={"text_field": cfg.text_field}, batch_format="pyarrow")
    # Sorted first: Ray Data returns the sample in whichever order its tasks finish, and the classifier (hence the
    # selection) must be the same on every run with the same seed.
    texts = sorted(row["text"] for row in sampled.take_all())
    random.Random(seed).shuffle(texts)
    return texts[:n]


def _texts_only(batch: pa.Table, text_field: str) -> pa.Table:
    valid = pc.is_null(batch.column(corpus.QUARANTINE_REASON))
    return pa.table({"text": batch.filter(valid).column(text_field)})


def obtain_classifier(cfg: SelectConfig, stage: StageDir, quarantine: list[dict]) -> tuple[str, dict]:
    """The classifier (the recipe's, or one trained on in_domain against sampled negatives), written to the stage's
    folder: its URI there, and what the report says of it."""
    if cfg.classifier:
        model_bytes = read_file_bytes(cfg.classifier)
        info = {"reused": cfg.classifier}
    else:
        positives, bad = read_texts_locally(
            CorpusSpec(cfg.in_domain, cfg.in_domain_text_field or cfg.text_field, cfg.id_field))
        quarantine.extend({"input": "in_domain", **b} for b in bad)
        if len(positives) < 10:
            raise SelectError(f"select.in_domain: need at least 10 usable in-domain texts, found {len(positives)}")
        negatives = sample_negatives(cfg, cfg.negatives_sample, cfg.fasttext.seed)
        if len(negatives) < 10:
            raise SelectError(_too_few_negatives(cfg, len(negatives)))
        params = FastTextParams(**cfg.fasttext.model_dump())
        # fastText occasionally reports "Encountered NaN"; a retry runs in a new process (max_calls=1).
        trained = ray.get(_train_in_fresh_process.options(num_cpus=min(params.threads, cluster_cpus()), max_retries=2,
                                                          retry_exceptions=[RuntimeError])
                          .remote(positives, negatives, params))
        model_bytes, info = trained.model_bytes, trained.metrics
        info["in_domain_rows_quarantined"] = len(bad)
    stage.write_bytes(CLASSIFIER_FILE, model_bytes)
    return stage.child(CLASSIFIER_FILE), info


def _too_few_negatives(cfg: SelectConfig, found: int) -> str:
    """Why training has too few negatives: an empty or all-malformed corpus says so (with the first bad row)."""
    field, specs = ("select.negatives", cfg.negatives) if cfg.negatives else ("select.corpus", cfg.corpus)
    if found:
        return f"{field}: need at least 10 usable texts to train on (negatives), found {found} in {', '.join(specs)}"
    _, bad = read_texts_locally(CorpusSpec(specs, cfg.text_field, cfg.id_field))
    if not bad:
        return f"{field}: the corpus is empty: no rows in {', '.join(specs)}"
    first = bad[0]
    return (f"{field}: no usable rows in {', '.join(specs)}: all {len(bad):,} rows are malformed "
            f"(first: {first['file']}, line {first['line']}: {first['reason']})")


# --------------------------------------------------------------------------------------------------- step 2: score
def text_hashes(normalised: pa.Array) -> pa.Array:
    """A stable 64-bit hash of each normalised text (the same in every worker process, unlike Python's ``hash``)."""
    return pa.array([None if t is None else int.from_bytes(hashlib.blake2b(t, digest_size=8).digest(), "little",
                                                             signed=True)
                     for t in normalised.cast(pa.binary()).to_pylist()], pa.int64())


def token_counts(normalised: pa.Array) -> pa.Array:
    """Tokens as the classifier counts them: words and punctuation marks (``normalise_text`` separates them by single
    spaces), so the count is one pass over the text the scoring already built."""
    return pc.add(pc.count_substring(normalised, " "), 1).cast(pa.int32())


SCORE_COLUMNS = [corpus.ORDER, corpus.SOURCE_FILE, corpus.SOURCE_LINE, corpus.QUARANTINE_REASON, corpus.RAW,
                 "domain_score", "quality_score", TEXT_HASH, N_TOKENS]


def keep_score_columns(batch: pa.Table) -> pa.Table:
    return batch.select([c for c in SCORE_COLUMNS if c in batch.column_names])


class SelectionScorer:
    """Ray Data actor for the scoring pass. It loads the fastText model once and adds ``domain_score``, the exact-dedup
    key and the token count (all from one normalisation of the text) and, with the heuristic scorer,
    ``quality_score``; only the few columns the choice needs leave the actor. It reads the classifier from the
    stage's folder, so that an actor Ray restarts finds it again (an object-store argument may be gone by then)."""

    def __init__(self, classifier_uri: str, text_field: str, heuristic_quality: bool, keep_text: bool):
        self.domain = FastTextDomainScorer(read_file_bytes(classifier_uri), text_field)
        self.quality = HeuristicQualityScorer(text_field) if heuristic_quality else None
        self.text_field = text_field
        self.keep_text = keep_text

    def __call__(self, batch: pa.Table) -> pa.Table:
        normalised = normalise_text(batch.column(self.text_field).combine_chunks())
        batch = (batch.append_column(TEXT_HASH, text_hashes(normalised))
                 .append_column(N_TOKENS, token_counts(normalised))
                 .append_column("domain_score", self.domain.score_normalised(normalised)))
        if self.quality is not None:
            batch = self.quality(batch)
        return batch if self.keep_text else keep_score_columns(batch)


# Scoring is CPU-bound in the actors; they ask for 3/4 of a CPU beside read tasks' 1/4 (corpus.READ_TASK_CPUS): on
# 2 CPUs two scoring actors and two read tasks run side by side, on 1 CPU one of each.
SCORER_ACTOR_CPUS = 0.75


def scorer_pool_size(cfg: SelectConfig, cluster_cpus: int) -> int:
    """Scoring actors: ``scorer_concurrency``, or as many as fit beside one read task and the hf quality actors (at
    most one per CPU)."""
    hf_actors = cfg.quality.concurrency if cfg.quality.scorer.startswith("hf:") else 0
    fit = int((cluster_cpus - READ_TASK_CPUS - hf_actors * SCORER_ACTOR_CPUS) // SCORER_ACTOR_CPUS)
    if cfg.scorer_concurrency is not None:
        if cfg.scorer_concurrency > fit:
            raise SelectError(f"select.scorer_concurrency: {cfg.scorer_concurrency} scoring actors need "
                              f"{(cfg.scorer_concurrency + hf_actors) * SCORER_ACTOR_CPUS + READ_TASK_CPUS:g} CPUs with a read task"
                              f"{' and the hf quality actors' if hf_actors else ''}, "
                              f"the cluster has {cluster_cpus}; expected at most {max(fit, 1)}")
        return cfg.scorer_concurrency
    return max(1, min(cluster_cpus, fit))


def score_corpus(cfg: SelectConfig, classifier_uri: str, actors: int) -> pa.Table:
    uses_hf = cfg.quality.scorer.startswith("hf:")
    ds = read_corpus(CorpusSpec(cfg.corpus, cfg.text_field, cfg.id_field), num_cpus=READ_TASK_CPUS)
    ds = ds.map_batches(
        SelectionScorer,
        fn_constructor_kwargs={"classifier_uri": classifier_uri, "text_field": cfg.text_field,
                               "heuristic_quality": cfg.quality.scorer == "heuristic", "keep_text": uses_hf},
        # All the actors start at once, but a small corpus read in fewer blocks than actors leaves some idle: a pool
        # of 1..actors says so to Ray Data (a fixed size it would warn about).
        compute=ActorPoolStrategy(min_size=1, max_size=actors, initial_size=actors),
        num_cpus=SCORER_ACTOR_CPUS,
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
    )
    if uses_hf:
        q = cfg.quality
        ds = ds.map_batches(
            HFQualityScorer,
            fn_constructor_kwargs={"model": q.scorer[3:], "text_field": cfg.text_field, "max_length": q.max_length,
                                   "max_score": q.max_score, "batch_size": q.batch_size},
            compute=ActorPoolStrategy(size=q.concurrency),
            num_cpus=SCORER_ACTOR_CPUS,
            num_gpus=q.num_gpus or None,
            batch_size=max(q.batch_size * 4, 64),
            batch_format="pyarrow",
        ).map_batches(keep_score_columns, batch_format="pyarrow", batch_size=None)
    # The per-row scores are small (a few numbers per document): they stream back to the driver, which needs all of
    # them to choose a top fraction.
    return pa.concat_tables(list(ds.iter_batches(batch_format="pyarrow", batch_size=None)), promote_options="default")


# --------------------------------------------------------------------------------------------------- step 3: keep
def choose_rows(scores: pa.Table, cfg: SelectConfig) -> tuple[np.ndarray, dict, dict]:
    """Decide which rows to keep from the per-row scores; returns the keep mask, filtered counts and thresholds."""
    order = scores.column(corpus.ORDER).to_numpy()
    valid = pc.is_null(scores.column(corpus.QUARANTINE_REASON)).to_numpy(zero_copy_only=False)
    domain = scores.column("domain_score").to_numpy(zero_copy_only=False).astype(np.float64)
    domain = np.where(valid, domain, -np.inf)
    n_valid = int(valid.sum())

    if cfg.keep_fraction is not None:
        k = math.ceil(cfg.keep_fraction * n_valid)
        # Exactly k rows: highest score first, ties broken by corpus position so reruns choose the same rows.
        ranked = np.lexsort((order, -domain))
        keep_domain = np.zeros(len(order), dtype=bool)
        keep_domain[ranked[:k]] = True
        keep_domain &= valid
        threshold = float(domain[ranked[k - 1]]) if k else 1.0
    else:
        threshold = cfg.effective_threshold
        keep_domain = valid & (domain >= threshold)

    keep_quality = keep_domain.copy()
    if cfg.quality.scorer != "none":
        quality = scores.column("quality_score").to_numpy(zero_copy_only=False).astype(np.float64)
        keep_quality &= np.nan_to_num(quality, nan=-1.0) >= cfg.quality.min_score

    keep = keep_quality.copy()
    if cfg.dedup:
        idx = np.flatnonzero(keep_quality)
        idx = idx[np.argsort(order[idx], kind="stable")]
        hashes = scores.column(TEXT_HASH).to_numpy(zero_copy_only=False)[idx]
        _, first = np.unique(hashes, return_index=True)
        keep = np.zeros(len(order), dtype=bool)
        keep[idx[first]] = True

    filtered = {
        "low_domain_score": int(valid.sum() - keep_domain.sum()),
        "low_quality": int(keep_domain.sum() - keep_quality.sum()),
        "duplicate": int(keep_quality.sum() - keep.sum()),
    }
    thresholds = {"domain_threshold": threshold, "keep_fraction": cfg.keep_fraction,
                  "min_quality": cfg.quality.min_score if cfg.quality.scorer != "none" else None}
    return keep, filtered, thresholds


# --------------------------------------------------------------------------------------------------- the stage
def run_select(cfg: SelectConfig, stage: StageDir) -> dict:
    clock = StageClock()
    quarantine: list[dict] = []
    scoring_actors = scorer_pool_size(cfg, cluster_cpus())  # a recipe asking for more than fits fails before work
    with clock.phase("classifier"):
        classifier_uri, classifier_info = obtain_classifier(cfg, stage, quarantine)
    with clock.phase("read_and_score"):
        scores = score_corpus(cfg, classifier_uri, scoring_actors)
    with clock.phase("choose"):
        keep_mask, filtered, chosen = choose_rows(scores, cfg)
    with clock.phase("write"):
        data_uri = stage.child("data")
        kept = scores.filter(pa.array(keep_mask)).select(
            [c for c in (corpus.ORDER, "domain_score", "quality_score") if c in scores.column_names])
        with without_operator_reservations():
            (read_corpus(CorpusSpec(cfg.corpus, cfg.text_field, cfg.id_field), only_rows=kept)
                .map_batches(drop_internal_columns, batch_format="pyarrow", batch_size=None)
                .write_parquet(data_uri))
        ids_renamed = make_ids_unique([data_uri], cfg.id_field)
    with clock.phase("report"):
        report = _select_report(cfg, stage, scores, keep_mask, filtered, chosen, quarantine, classifier_info,
                                ids_renamed, corpus_seconds=sum(map(clock.phase_seconds,
                                                                    ("read_and_score", "choose", "write"))))
    report.update(clock.timings())
    write_report(stage, report, render_markdown(report))
    return report


def _select_report(cfg: SelectConfig, stage: StageDir, scores: pa.Table, keep_mask: np.ndarray, filtered: dict,
                   chosen: dict, quarantine: list[dict], classifier_info: dict, ids_renamed: int,
                   corpus_seconds: float) -> dict:
    """report.json's fields (timings aside), with quarantine.jsonl and the domain-score histogram written."""
    data_uri = stage.child("data")
    bad = scores.filter(pc.is_valid(scores.column(corpus.QUARANTINE_REASON)))
    quarantine.extend({"input": "corpus", "file": r[corpus.SOURCE_FILE], "line": r[corpus.SOURCE_LINE],
                       "reason": r[corpus.QUARANTINE_REASON], "raw": r[corpus.RAW]}
                      for r in bad.select([corpus.SOURCE_FILE, corpus.SOURCE_LINE, corpus.QUARANTINE_REASON,
                                           corpus.RAW]).to_pylist())
    stage.write_jsonl("quarantine.jsonl", quarantine)
    rows_written = count_parquet_rows(data_uri)
    domain = scores.column("domain_score").to_numpy(zero_copy_only=False)
    valid = pc.is_null(scores.column(corpus.QUARANTINE_REASON)).to_numpy(zero_copy_only=False)
    tokens = pc.fill_null(scores.column(N_TOKENS), 0).to_numpy()
    report = {
        "stage": "select",
        "rows_in": scores.num_rows,
        "rows_out": int(keep_mask.sum()),
        "rows_quarantined": bad.num_rows,
        "rows_filtered": filtered,
        "ids_made_unique": ids_renamed,
        # Throughput of the corpus work: scoring, choosing and writing (not training, which depends on the in-domain set).
        "docs_per_second": round(scores.num_rows / max(corpus_seconds, 1e-9), 1),
        "thresholds": chosen,
        "quality_scorer": cfg.quality.scorer,
        "tokens_kept": int(tokens[keep_mask].sum(dtype=np.int64)),
        "token_unit": "words and punctuation marks (the classifier's tokenisation)",
        "in_domain_rows_quarantined": sum(1 for q in quarantine if q.get("input") == "in_domain"),
        "classifier": classifier_info,
        "outputs": {"data": data_uri, "classifier": stage.child(CLASSIFIER_FILE),
                    "quarantine": stage.child("quarantine.jsonl")},
    }
    if rows_written != report["rows_out"]:
        raise SelectError(f"wrote {rows_written} rows but chose {report['rows_out']}")
    if valid.any():
        png = score_histogram_png(domain[valid].astype(np.float64), keep_mask[valid], chosen["domain_threshold"],
                                  "select: domain scores of the corpus")
        stage.write_bytes("domain_scores.png", png)
    return report


def render_markdown(report: dict) -> str:
    t = report["thresholds"]
    f = report["rows_filtered"]
    clf = report["classifier"]
    counts = markdown_table([
        ("rows in", report["rows_in"]), ("rows out (kept)", report["rows_out"]),
        ("filtered: low domain score", f["low_domain_score"]), ("filtered: low quality", f["low_quality"]),
        ("filtered: duplicate", f["duplicate"]), ("quarantined", report["rows_quarantined"]),
        ("ids made unique (ID#k)", report["ids_made_unique"]),
        ("tokens kept (words and punctuation marks)", report["tokens_kept"]),
        ("seconds", report["seconds"]), ("documents / second", report["docs_per_second"]),
    ])
    rule = (f"top {t['keep_fraction']:.2%} by domain score (score cut {t['domain_threshold']:.4f})"
            if t["keep_fraction"] is not None else f"domain_score >= {t['domain_threshold']}")
    lines = [
        "# select — in-domain data selection (TRAIT step 1)", "",
        f"Kept: {rule}; quality scorer `{report['quality_scorer']}`"
        + (f", quality_score >= {t['min_quality']}" if t["min_quality"] is not None else "") + "; exact dedup.", "",
        counts, "", "![domain scores](domain_scores.png)", "",
        "## Classifier", "",
    ]
    if "reused" in clf:
        lines.append(f"Reused `{clf['reused']}`.")
    else:
        lines.append(markdown_table([(k, v) for k, v in clf.items()]))
    lines += ["", "## Phases (seconds)", "", markdown_table(list(report["phases"].items())), ""]
    return "\n".join(lines)


class SelectReport(StageReport):
    tokens_kept: int
    docs_per_second: float


class Select(Stage):
    name, config, report = "select", SelectConfig, SelectReport
    help = "TRAIT step 1: in-domain, educational documents out of a general corpus (fastText + a quality filter)."

    def preflight(self, cfg: SelectConfig, recipe) -> None:
        for field, specs in (("select.in_domain", cfg.in_domain), ("select.corpus", cfg.corpus),
                             ("select.negatives", cfg.negatives)):
            if specs:
                check_inputs(field, specs)
        if cfg.classifier:
            check_file("select.classifier", cfg.classifier)

    def run(self, cfg: SelectConfig, stage: StageDir, recipe) -> dict:
        return run_select(cfg, stage)

    def summary(self, r: SelectReport) -> str:
        f = r.rows_filtered
        return (f"select: kept {r.rows_out:,} of {r.rows_in:,} documents ({r.tokens_kept:,} tokens); filtered "
                f"{f['low_domain_score']:,} low domain score, {f['low_quality']:,} low quality, {f['duplicate']:,} "
                f"duplicates; quarantined {r.rows_quarantined:,}; {r.docs_per_second:,.0f} docs/s")
