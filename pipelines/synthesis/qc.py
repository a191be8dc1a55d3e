"""Quality control of synthetic samples: copies of references, contamination with evaluation sets, closeness to the
references, exact and near-duplicates. Each dropped row gets one reason, the first that applies, in this order:

1. ``duplicate_of_reference``: the same normalised text as a reference, or a MinHash-estimated Jaccard similarity of
   word shingles >= ``near_dedup.threshold`` to one (every row against every reference: references are few);
2. ``contaminated``: shares a word ``decontaminate.ngram``-gram (13, GPT-3's choice) with an evaluation item, or
   contains a shorter evaluation item (``SHORT_ITEM_MIN_WORDS`` to ngram - 1 words) whole, as a contiguous run of its
   normalised words; an item under ``SHORT_ITEM_MIN_WORDS`` words matches only a sample that is that text;
3. ``similar_to_reference``: embedding cosine to the closest reference >= ``max_reference_similarity`` (when set);
4. ``exact_duplicate``: the same normalised text as an earlier row (smaller ``_order``); the first is kept;
5. ``near_duplicate``: in a cluster of near-duplicates; the member with the smallest ``_order`` is kept.

Steps 4 and 5 look only at rows that survived steps 1-3, so every cluster of duplicates keeps exactly one row.

How it runs at scale (no text ever reaches the driver):

- Pass 1, Ray Data tasks (one per input file, or blocks of ``batch_size`` rows shared out when there are fewer files
  than CPUs): each row is normalised and hashed once (word hashes, then its exact-duplicate key, its MinHash
  signature and LSH band keys, its evaluation n-grams looked up in the sorted hash set of every evaluation item,
  which was built in the driver and ``ray.put`` once, then its runs of as many words as each short evaluation item
  that start with a short item's first word; its signature compared with the references'). Only compact
  columns come back to the driver: ``_order``, the 8-byte exact key, the ``bands`` 8-byte band keys and a few bytes of
  reference/evaluation results; with the decisions, about 42 + 8 x bands bytes a row (106 bytes at the defaults:
  8 bands of 16 rows for Jaccard 0.85 and 128 permutations, i.e. ~11 GB per 100M rows, twice that for a moment while
  they are sorted by ``_order``). Signatures (4 x num_perm bytes a row) are not kept.
- Pass 2 (only with ``max_reference_similarity``): the rows still in are read back and embedded by an actor pool
  that returns each row's closest reference.
- In the driver, on those arrays: exact duplicates by sorting keys; LSH candidates by sorting each band's keys
  (rows sharing a key in any band are candidates). Rows that are candidates are read back (pass 3) and their
  signatures computed again -- usually a small share, and cheaper to recompute than to hold for every row -- so that
  each candidate pair is verified (estimated Jaccard >= threshold) before it joins a cluster (connected components).
- Writing: kept rows, and dropped rows with ``qc_reason`` and ``qc_detail``, are read back from the input (only
  their lines are parsed) and written with every input field.

Measured (benchmarks/qc.py, 200k documents, 2 CPUs): 15.8k documents/s end to end against 3.3k for datasketch in one
process, with the same recall on planted near-duplicates (0.69 of those at Jaccard >= 0.85 with datasketch's LSH
weights; 0.86 with ``false_negative_weight`` 0.9, at no measurable cost).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import ray
from pydantic import Field
from ray.data import ActorPoolStrategy

from ...actors import minhash
from ...actors.nearest_reference import NEAREST, SIMILARITY, NearestReference
from .. import corpus, paths
from ..corpus import (READ_TASK_CPUS, SUPPORTED_SUFFIXES, CorpusSpec, drop_internal_columns, read_corpus, reading_cpus,
                      without_operator_reservations)
from ..paths import expand_inputs
from ..report import markdown_table, write_report
from ..resources import cluster_cpus
from ..rundir import QUARANTINE_PARTS, StageDir, StageError, count_parquet_rows, gather_quarantine
from ..schema import IdField, InputPaths, Strict
from ..stage import Stage, StageClock, check_inputs
from ..unique_ids import make_ids_unique
from .diversity import DiversityConfig
from .outcomes import OutcomeReport, acceptance_rate, kept_diversity, outcome_rows, outcome_summary
from .references import References, load_reference_texts, read_records, references_of


class NearDedupConfig(Strict):
    """MinHash/LSH near-duplicate detection on word shingles."""
    enabled: bool = Field(True, description="Drop near-duplicates within the set and of references.")
    threshold: float = Field(0.85, gt=0, le=1, description="Jaccard similarity of shingle sets at or above which two "
                                                           "texts are near-duplicates (CRAFT: 85%).")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations.")
    shingle_words: int = Field(3, ge=1, le=10, description="Words per shingle.")
    seed: int = Field(1, description="Seed of the MinHash permutations.")
    false_negative_weight: float = Field(
        0.5, gt=0, lt=1, description="LSH bands and rows minimise this x the missed pairs above the threshold + "
        "(1 - this) x the candidate pairs below it (0.5: datasketch's choice). Candidates are verified, so a higher "
        "value finds more near-duplicates at the cost of verifying more pairs.")


class DecontaminateConfig(Strict):
    """Drop samples sharing an n-gram with an evaluation item (GPT-3 / Llama style decontamination)."""
    eval_files: InputPaths = Field(description="Evaluation sets (JSONL/Parquet) that must not leak into training data.")
    eval_fields: Optional[list[str]] = Field(None, description="Fields of an eval row whose text is checked; null = "
                                             "every string field.")
    ngram: int = Field(13, ge=3, le=50, description="Words per n-gram (13: GPT-3's choice).")


class QcConfig(Strict):
    """Quality control: exact and near-duplicates (within the set and against references), decontamination against
    evaluation sets, similarity to references; every removal counted by reason."""
    input: Optional[InputPaths] = Field(None, description="Samples to check (JSONL/Parquet); null = this run's "
                                                        "synthesize output.")
    text_field: str = Field("text", description="Field holding the text.")
    id_field: IdField = "id"
    exact_dedup: bool = Field(True, description="Drop exact duplicates (normalised text).")
    near_dedup: NearDedupConfig = NearDedupConfig()
    references: Optional[InputPaths] = Field(None, description="Reference samples (e.g. the few-shots): samples that "
                                           "near-duplicate one are dropped; null = synthesize's references.")
    reference_fields: Optional[list[str]] = Field(None, description="Fields of a reference joined into its text; "
                                                  "null = as for synthesize.")
    decontaminate: Optional[DecontaminateConfig] = None
    max_reference_similarity: Optional[float] = Field(None, gt=0, le=1, description="Drop samples whose embedding "
                                                      "cosine to the closest reference is at least this; null = off.")
    batch_size: int = Field(1024, gt=0, description="Rows per hashing batch.")
    diversity: DiversityConfig = DiversityConfig()

REASONS = ("duplicate_of_reference", "contaminated", "similar_to_reference", "exact_duplicate", "near_duplicate")
QC_REASON, QC_DETAIL = "qc_reason", "qc_detail"
EXACT, BANDS, SIGNATURE = "_exact", "_bands", "_signature"
REF_KIND, REF_INDEX, REF_JACCARD, EVAL_ITEM = "_ref_kind", "_ref_index", "_ref_jaccard", "_eval_item"
EVAL_WORDS = "_eval_words"  # words of the short evaluation item matched (0: an n-gram)
# Evaluation items of this many words up to ngram - 1 are looked for inside samples; shorter ones only as a sample's
# whole text. Measured on the quickstart's 144 MMLU biology rows (question and choices) against 16,906 bundled texts
# that share none (web pool, medical and PubMed abstracts, the quickstart corpus, few-shots): looking for items of
# 3+ words would flag 17 of them ("a large population", ...), 4+ words 4 ("increase the mortality rate", "I, II, and
# III"), 5+ words none; all 225 items of 5-12 words (33 questions, 192 choices) planted in web texts are caught.
SHORT_ITEM_MIN_WORDS = 5
ALL_PAIRS_UP_TO = 16  # a bucket of up to this many rows gives all its pairs; a larger one a star and a chain
REFERENCE_COMPARE_BYTES = 1 << 24  # rows x references x permutations compared at a time in pass 1


class QcError(StageError):
    """QC cannot run as configured; the message names the field."""


# ------------------------------------------------------------------------------------------ inputs and preflight
@dataclass
class EvalGrams:
    """The n-gram hashes of every evaluation item (sorted) and, in parallel, the item each came from; and the
    whole-item hashes of the short items (``SHORT_ITEM_MIN_WORDS`` to ngram - 1 words), looked for inside samples."""
    hashes: np.ndarray  # uint64, sorted
    items: np.ndarray  # int32: index into ``sources``
    sources: list[tuple[str, int]]  # (file, line) of each item
    words: np.ndarray  # int16, parallel to ``hashes``: the item's words when under ngram (its one gram), else 0
    short_hashes: np.ndarray  # uint64, sorted: a short item's run of all its words
    short_items: np.ndarray  # int32: index into ``sources``
    short_first: np.ndarray  # uint64, sorted, distinct: the hashes of the short items' first words
    short_widths: list[int]  # the distinct word counts of the short items


@dataclass
class QcInputs:
    paths: list[str]
    reference_texts: list[str] | None
    eval: EvalGrams | None


def load_eval_grams(cfg: DecontaminateConfig) -> EvalGrams:
    """Every string field of every evaluation row (or the ``eval_fields``; a list of strings counts string by
    string), each field on its own, as word n-grams, and the short ones also whole (see ``SHORT_ITEM_MIN_WORDS``)."""
    what = "qc.decontaminate.eval_files"
    try:
        records = read_records(cfg.eval_files, what)
    except ValueError as e:
        raise QcError(str(e)) from None
    texts, owners, sources = [], [], []
    for file, line, record in records:
        fields = cfg.eval_fields or [k for k, v in record.items() if _strings(v)]
        for name in fields:
            value = record.get(name)
            if not _strings(value):
                problem = "missing" if name not in record else f"not text (got {type(value).__name__})"
                raise QcError(f"qc.decontaminate.eval_fields: {file}, line {line}: field {name!r} is {problem} "
                              f"(fields: {', '.join(record) or 'none'})")
            for text in [value] if isinstance(value, str) else value:
                texts.append(text)
                owners.append(len(sources))
        sources.append((file, line))
    return eval_grams(texts, owners, sources, cfg.ngram)


def eval_grams(texts: list[str], owners: list[int], sources: list, ngram: int) -> EvalGrams:
    """The n-gram table of evaluation texts, each text on its own: ``owners[k]`` is the item (an index into
    ``sources``) that ``texts[k]`` belongs to (an item may own several texts: its fields)."""
    owners = np.asarray(owners, np.int32)
    word_hashes, word_offsets = minhash.word_hashes(minhash.normalised_words(texts))
    hashes, offsets = minhash.window_hashes(word_hashes, word_offsets, ngram, salt=minhash.NGRAM_SALT)
    counts = np.diff(word_offsets)
    grams = np.diff(offsets)
    items = np.repeat(owners, grams)
    words = np.repeat(np.where(counts < ngram, counts, 0).astype(np.int16), grams)
    order = np.argsort(hashes, kind="stable")
    # short items: the run of all their words, hashed as a sample's runs of that many words are
    short = np.flatnonzero((counts >= SHORT_ITEM_MIN_WORDS) & (counts < ngram))
    starts = word_offsets[:-1][short]
    short_hashes, short_items = [], []
    for width, at, run in minhash.run_hashes(word_hashes, word_offsets, starts, np.unique(counts[short]),
                                             salt=minhash.NGRAM_SALT):
        whole = counts[short[np.searchsorted(starts, at)]] == width  # the run is the whole item
        short_hashes.append(run[whole])
        short_items.append(owners[short[np.searchsorted(starts, at[whole])]])
    short_hashes = np.concatenate(short_hashes) if short_hashes else np.zeros(0, np.uint64)
    short_items = np.concatenate(short_items) if short_items else np.zeros(0, np.int32)
    short_order = np.argsort(short_hashes, kind="stable")
    return EvalGrams(hashes[order], items[order], sources, words[order], short_hashes[short_order],
                     short_items[short_order], np.unique(word_hashes[starts]), np.unique(counts[short]).tolist())


def _strings(value) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and bool(value)
                                      and all(isinstance(v, str) for v in value))


def check_qc(cfg: QcConfig, references: References | None = None, upstream: str | None = None) -> QcInputs:
    """Everything QC reads besides the samples, loaded and checked before any work (the runner's preflight calls this
    too): the input paths, the references' fields, the evaluation files and fields. Raises ``QcError`` naming the
    recipe field."""
    if cfg.input is not None:
        try:
            expand_inputs(cfg.input, SUPPORTED_SUFFIXES)
        except (FileNotFoundError, ValueError) as e:
            raise QcError(f"qc.input: {e}") from None
    refs = references_of(cfg, references)
    reference_texts = None
    if refs is not None:
        try:
            reference_texts = load_reference_texts(refs, "qc.references")
        except ValueError as e:
            raise QcError(str(e)) from None
    grams = load_eval_grams(cfg.decontaminate) if cfg.decontaminate is not None else None
    return QcInputs(list(cfg.input or ([upstream] if upstream else [])), reference_texts, grams)


# --------------------------------------------------------------------------------------------- pass 1: hashing
class HashRows:
    """Ray Data map (tasks): the compact per-row facts QC decides on. ``shared`` is an object reference to the
    reference signatures and the evaluation n-gram set (numpy arrays read zero-copy from the object store)."""

    def __init__(self, cfg: QcConfig, bands: int, rows: int, shared: ray.ObjectRef):
        self.text_field, self.near, self.ngram = cfg.text_field, cfg.near_dedup, (
            cfg.decontaminate.ngram if cfg.decontaminate else None)
        self.bands, self.rows, self.shared = bands, rows, shared

    def __call__(self, batch: pa.Table) -> pa.Table:
        shared = ray.get(self.shared)
        n = batch.num_rows
        word_hashes, offsets = minhash.word_hashes(minhash.normalised_words(batch.column(self.text_field)))
        exact = minhash.sequence_hashes(word_hashes, offsets)
        columns = {corpus.ORDER: batch.column(corpus.ORDER), EXACT: pa.array(exact)}
        ref_kind, ref_index = np.zeros(n, np.int8), np.full(n, -1, np.int32)
        ref_jaccard = np.full(n, np.nan, np.float32)
        if shared["ref_exact"] is not None:  # 1: exact copy of a reference
            ref_index[:] = _lookup(shared["ref_exact"], shared["ref_exact_index"], exact)
            ref_kind[ref_index >= 0] = 1
        if self.near.enabled:
            sig = minhash.signatures(*minhash.window_hashes(word_hashes, offsets, self.near.shingle_words),
                                     self.near.num_perm, self.near.seed)
            keys = minhash.band_keys(sig, self.bands, self.rows)
            columns[BANDS] = pa.FixedSizeListArray.from_arrays(pa.array(keys.ravel()), self.bands)
            if shared["ref_signatures"] is not None:  # 2: near copy of a reference
                best, which = _closest_signatures(sig, shared["ref_signatures"])
                near = (ref_kind == 0) & (best >= self.near.threshold)
                ref_kind[near], ref_index[near], ref_jaccard[near] = 2, which[near], best[near]
        columns.update({REF_KIND: pa.array(ref_kind), REF_INDEX: pa.array(ref_index),
                        REF_JACCARD: pa.array(ref_jaccard)})
        if self.ngram:
            grams, gram_offsets = minhash.window_hashes(word_hashes, offsets, self.ngram, salt=minhash.NGRAM_SALT)
            item, words = _first_eval_hit(grams, gram_offsets, shared["eval_hashes"], shared["eval_items"],
                                          shared["eval_words"])
            _short_eval_hits(word_hashes, offsets, shared, item, words)
            columns[EVAL_ITEM], columns[EVAL_WORDS] = pa.array(item), pa.array(words)
        return pa.table(columns)


def _lookup(sorted_keys: np.ndarray, values: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``values`` at each key's place in ``sorted_keys``, -1 where it is absent."""
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return np.where(sorted_keys[at] == keys, values[at], -1).astype(np.int32)


def _closest_signatures(sig: np.ndarray, refs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(best estimated Jaccard, which reference) of each row against every reference, in bounded chunks."""
    best, which = np.full(len(sig), -1.0, np.float32), np.zeros(len(sig), np.int32)
    step = max(1, REFERENCE_COMPARE_BYTES // max(1, len(sig) * sig.shape[1]))
    for lo in range(0, len(refs), step):
        estimate = minhash.estimated_jaccard(sig[:, None, :], refs[None, lo:lo + step, :]).astype(np.float32)
        top = estimate.argmax(axis=1)
        value = estimate[np.arange(len(sig)), top]
        better = value > best
        best[better], which[better] = value[better], top[better] + lo
    return best, which


def _first_eval_hit(grams: np.ndarray, offsets: np.ndarray, eval_hashes: np.ndarray, eval_items: np.ndarray,
                    eval_words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the evaluation item of its first n-gram found in the evaluation set (-1 when none is), and that
    gram's ``words`` (an item shorter than the n-gram is its one gram: the row is that whole text; else 0)."""
    out, words = np.full(len(offsets) - 1, -1, np.int32), np.zeros(len(offsets) - 1, np.int16)
    if not len(grams) or not len(eval_hashes):
        return out, words
    at = np.minimum(np.searchsorted(eval_hashes, grams), len(eval_hashes) - 1)
    hit = np.flatnonzero(eval_hashes[at] == grams)
    if len(hit):
        row = np.searchsorted(offsets, hit, side="right") - 1
        rows, first = np.unique(row, return_index=True)
        out[rows], words[rows] = eval_items[at[hit[first]]], eval_words[at[hit[first]]]
    return out, words


def _short_eval_hits(word_hashes: np.ndarray, offsets: np.ndarray, shared: dict, item: np.ndarray,
                     words: np.ndarray) -> None:
    """Rows without an n-gram hit that contain a short evaluation item whole (the longest such item wins): ``item``
    and ``words`` (its word count) are set in place. Only runs starting with a short item's first word are hashed,
    at the short items' widths."""
    short, first = shared["short_hashes"], shared["short_first"]
    if short is None or not len(short) or not len(word_hashes):
        return
    at = np.minimum(np.searchsorted(first, word_hashes), len(first) - 1)
    starts = np.flatnonzero(first[at] == word_hashes)
    runs = minhash.run_hashes(word_hashes, offsets, starts, shared["short_widths"], salt=minhash.NGRAM_SALT)
    for width, begins, hashes in reversed(runs):  # longest first
        at = np.minimum(np.searchsorted(short, hashes), len(short) - 1)
        hit = np.flatnonzero(short[at] == hashes)
        if not len(hit):
            continue
        row = np.searchsorted(offsets, begins[hit], side="right") - 1
        rows, first_hit = np.unique(row, return_index=True)
        free = item[rows] < 0
        item[rows[free]] = shared["short_items"][at[hit[first_hit[free]]]]
        words[rows[free]] = width


def _shared_tables(cfg: QcConfig, inputs: QcInputs) -> dict:
    refs, grams = inputs.reference_texts, inputs.eval
    shared = {"ref_exact": None, "ref_exact_index": None, "ref_signatures": None,
              "eval_hashes": None, "eval_items": None, "eval_words": None, "short_hashes": None, "short_items": None,
              "short_first": None, "short_widths": None}
    if refs:
        keys = minhash.text_hashes(refs)
        order = np.argsort(keys, kind="stable")  # the first of equal references wins
        shared["ref_exact"], shared["ref_exact_index"] = keys[order], order.astype(np.int32)
        if cfg.near_dedup.enabled:
            shared["ref_signatures"] = minhash.minhash_texts(refs, cfg.near_dedup.num_perm,
                                                             cfg.near_dedup.shingle_words, cfg.near_dedup.seed)
    if grams is not None:
        shared.update({"eval_hashes": grams.hashes, "eval_items": grams.items, "eval_words": grams.words,
                       "short_hashes": grams.short_hashes, "short_items": grams.short_items,
                       "short_first": grams.short_first, "short_widths": grams.short_widths})
    return shared


def _collect(dataset: ray.data.Dataset) -> pa.Table | None:
    batches = list(dataset.iter_batches(batch_format="pyarrow", batch_size=None))
    batches = [b for b in batches if b.num_rows]
    return pa.concat_tables(batches).combine_chunks() if batches else None


# ------------------------------------------------------------------------------------------------ the decisions
class Decisions:
    """Per row (in ``_order`` order): the reason code (0 = kept, else 1 + index in REASONS), the row it duplicates
    (position, or reference / evaluation item index) and a score for the detail."""

    def __init__(self, n: int):
        self.reason = np.zeros(n, np.int8)
        self.partner = np.full(n, -1, np.int64)
        self.score = np.full(n, np.nan, np.float32)

    def drop(self, rows: np.ndarray, reason: str, partner=None, score=None) -> None:
        """Drop ``rows`` for ``reason``, except those an earlier reason already dropped (the first one stays)."""
        free = self.reason[rows] == 0
        rows = rows[free]
        self.reason[rows] = REASONS.index(reason) + 1
        if partner is not None:
            self.partner[rows] = np.broadcast_to(partner, free.shape)[free]
        if score is not None:
            self.score[rows] = np.broadcast_to(score, free.shape)[free]

    def alive(self) -> np.ndarray:
        return np.flatnonzero(self.reason == 0)


def exact_duplicates(keys: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(duplicates, the first row with the same key for each) among ``rows`` (ascending: earlier rows first)."""
    _, first, inverse = np.unique(keys[rows], return_index=True, return_inverse=True)
    keeper = rows[first][inverse]
    dup = keeper != rows
    return rows[dup], keeper[dup]


def candidate_pairs(keys: np.ndarray) -> np.ndarray:
    """``[m, 2]`` distinct pairs (i < j) of rows that share a band key (``keys``: ``[rows, bands]``). A bucket of up
    to ALL_PAIRS_UP_TO rows gives all its pairs; a larger one (boilerplate shared by many rows) a star from its first
    row plus a chain through its rows in order, which keeps the pair count linear while still connecting every
    member that is near its first or its neighbours."""
    pairs = [np.zeros((0, 2), np.int64)]
    for band in range(keys.shape[1]):
        order = np.argsort(keys[:, band], kind="stable")
        sorted_keys = keys[order, band]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        sizes = np.diff(np.r_[starts, len(sorted_keys)])
        for size in np.unique(sizes[sizes >= 2]):
            members = order[starts[sizes == size][:, None] + np.arange(size)[None, :]]  # [buckets, size]
            if size <= ALL_PAIRS_UP_TO:
                i, j = np.triu_indices(size, 1)
                pairs.append(np.stack([members[:, i].ravel(), members[:, j].ravel()], axis=1))
            else:
                star = np.stack([np.repeat(members[:, 0], size - 1), members[:, 1:].ravel()], axis=1)
                chain = np.stack([members[:, :-1].ravel(), members[:, 1:].ravel()], axis=1)
                pairs += [star, chain]
    pairs = np.sort(np.concatenate(pairs), axis=1)
    unique = np.unique(pairs[:, 0] * len(keys) + pairs[:, 1])  # one int64 key per pair: a 1-d sort
    return np.stack([unique // len(keys), unique % len(keys)], axis=1)


def near_duplicate_clusters(pairs: np.ndarray, estimates: np.ndarray, threshold: float,
                            n: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Clusters of the verified pairs (estimated Jaccard >= threshold) among ``n`` candidate rows (ascending:
    earlier first). Returns (rows to drop, the row kept from each one's cluster, number of clusters)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    good = pairs[estimates >= threshold]
    graph = coo_matrix((np.ones(len(good), np.int8), (good[:, 0], good[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    keeper = np.full(labels.max() + 1 if n else 0, n, np.int64)
    np.minimum.at(keeper, labels, np.arange(n))
    row_keeper = keeper[labels]
    dropped = np.flatnonzero(row_keeper != np.arange(n))
    return dropped, row_keeper[dropped], len(np.unique(row_keeper[dropped]))


# --------------------------------------------------------------------------------------------------- the stage
def run_qc(cfg: QcConfig, stage: StageDir, upstream: str | None = None,
           references: References | None = None) -> dict:
    clock = StageClock()
    inputs = check_qc(cfg, references, upstream)  # a bad eval file or field fails here, before any work
    if not inputs.paths:
        raise QcError("qc.input: no samples to check (name qc.input, or run synthesize before qc)")
    try:
        _, files = expand_inputs(inputs.paths, SUPPORTED_SUFFIXES)
    except (FileNotFoundError, ValueError) as e:
        raise QcError(f"qc.input: {e}") from None
    spec = CorpusSpec(inputs.paths, cfg.text_field, cfg.id_field)
    near = cfg.near_dedup
    bands, rows_per_band = minhash.lsh_params(near.threshold, near.num_perm, 1 - near.false_negative_weight,
                                              near.false_negative_weight) if near.enabled else (0, 0)
    cpus = cluster_cpus()
    _, cut_blocks = reading_cpus(cpus)

    # pass 1: hashing, on the cluster; compact columns back. With as many files as CPUs or more, each file is read
    # and hashed in one task (no block crosses the object store); with fewer, reads are cut into blocks of
    # batch_size rows that hashing tasks share out.
    with clock.phase("hashing"):
        shared = ray.put(_shared_tables(cfg, inputs))
        cut = cut_blocks and len(files) < cpus
        with without_operator_reservations():
            facts = _collect(read_corpus(spec, num_cpus=READ_TASK_CPUS if cut else None,
                                         quarantine_dir=stage.child(QUARANTINE_PARTS),
                                         rows_per_block=cfg.batch_size if cut else None)
                             .map_batches(HashRows(cfg, bands, rows_per_band, shared), batch_size=cfg.batch_size,
                                          batch_format="pyarrow"))
        quarantine = gather_quarantine(stage, "samples")
        if facts is not None:
            facts = facts.take(pa.array(np.argsort(facts.column(corpus.ORDER).to_numpy(), kind="stable")))
        n = 0 if facts is None else facts.num_rows
        order = np.zeros(0, np.int64) if facts is None else facts.column(corpus.ORDER).to_numpy()

    decisions = Decisions(n)
    if n:
        ref_kind, ref_index = facts.column(REF_KIND).to_numpy(), facts.column(REF_INDEX).to_numpy()
        copied = np.flatnonzero(ref_kind > 0)
        decisions.drop(copied, "duplicate_of_reference", ref_index[copied],
                       facts.column(REF_JACCARD).to_numpy()[copied])
        if inputs.eval is not None:
            item = facts.column(EVAL_ITEM).to_numpy()
            hit = np.flatnonzero(item >= 0)
            decisions.drop(hit, "contaminated", item[hit], facts.column(EVAL_WORDS).to_numpy()[hit])

    if n and cfg.max_reference_similarity is not None and inputs.reference_texts:
        with clock.phase("reference_similarity"):
            alive = decisions.alive()
            similarity, nearest = _reference_similarity(cfg, spec, order, alive, inputs.reference_texts, cpus,
                                                        cut_blocks)
            close = similarity >= cfg.max_reference_similarity
            decisions.drop(alive[close], "similar_to_reference", nearest[close], similarity[close])

    with clock.phase("deduplication"):
        named, ids, near_stats = _deduplicate(cfg, spec, order, facts, decisions, bands)

    # writing: kept rows, and dropped rows with their reason and detail, read back from the input
    with clock.phase("writing"):
        data_uri, dropped_uri = stage.child("data"), stage.child("dropped")
        kept_rows = decisions.alive()
        gone = np.flatnonzero(decisions.reason > 0)
        details = _details(decisions, gone, cfg, inputs, named, ids)
        with without_operator_reservations():
            if len(kept_rows):
                (read_corpus(spec, only_rows=pa.table({corpus.ORDER: pa.array(order[kept_rows])}))
                    .map_batches(drop_internal_columns, batch_format="pyarrow", batch_size=None)
                    .write_parquet(data_uri))
            if len(gone):
                (read_corpus(spec, only_rows=pa.table({
                    corpus.ORDER: pa.array(order[gone]),
                    QC_REASON: pa.array([REASONS[r - 1] for r in decisions.reason[gone].tolist()], pa.string()),
                    QC_DETAIL: pa.array(details, pa.string())}))
                    .map_batches(drop_internal_columns, batch_format="pyarrow", batch_size=None)
                    .write_parquet(dropped_uri))
        written, written_dropped = count_parquet_rows(data_uri), count_parquet_rows(dropped_uri)
        ids_renamed = make_ids_unique([data_uri, dropped_uri], cfg.id_field)
        if (written, written_dropped) != (len(kept_rows), len(gone)):
            raise QcError(f"qc: wrote {written} kept and {written_dropped} dropped rows for {len(kept_rows)} and "
                          f"{len(gone)}: the input changed while qc ran ({', '.join(spec.paths)})")
    checked = clock.seconds()
    with clock.phase("diversity"):
        diversity, diversity_lines = kept_diversity(stage, cfg.text_field, inputs.reference_texts, cfg.diversity)
    counts = np.bincount(decisions.reason, minlength=len(REASONS) + 1)
    rows_in = n + len(quarantine)
    report = {
        "stage": "qc", "rows_in": rows_in, "rows_out": int(counts[0]), "rows_quarantined": len(quarantine),
        "rows_filtered": {reason: int(counts[i + 1]) for i, reason in enumerate(REASONS)},
        "acceptance_rate": acceptance_rate(int(counts[0]), rows_in), "ids_made_unique": ids_renamed,
        "exact_dedup": cfg.exact_dedup,
        "near_dedup": {**near.model_dump(), "bands": bands, "rows": rows_per_band, **near_stats},
        "references": len(inputs.reference_texts) if inputs.reference_texts else 0,
        "max_reference_similarity": cfg.max_reference_similarity,
        "decontaminate": None if inputs.eval is None else {
            "eval_files": list(cfg.decontaminate.eval_files), "eval_items": len(inputs.eval.sources),
            "ngram": cfg.decontaminate.ngram, "distinct_ngrams": int(len(np.unique(inputs.eval.hashes))),
            "short_items_min_words": SHORT_ITEM_MIN_WORDS, "short_items": int(len(inputs.eval.short_hashes))},
        "diversity": diversity,
        "docs_per_second": round(rows_in / max(checked, 1e-9), 1),
        **clock.timings(),
        "outputs": {"data": data_uri, "dropped": dropped_uri, "quarantine": stage.child("quarantine.jsonl")},
    }
    write_report(stage, report, render_markdown(report, diversity_lines))
    return report


def _deduplicate(cfg: QcConfig, spec: CorpusSpec, order: np.ndarray, facts: pa.Table | None, decisions: Decisions,
                 bands: int) -> tuple[np.ndarray, list[str], dict]:
    """Exact, then near-duplicates among the rows still in. Returns the rows a detail names (ascending), their ids,
    and the near-duplicate counts."""
    near = cfg.near_dedup
    stats = {"candidate_pairs": 0, "verified_pairs": 0, "clusters": 0}
    if facts is None:
        return np.zeros(0, np.int64), [], stats
    if cfg.exact_dedup:
        dup, keeper = exact_duplicates(facts.column(EXACT).to_numpy(), decisions.alive())
        decisions.drop(dup, "exact_duplicate", keeper)
    pairs = np.zeros((0, 2), np.int64)
    if near.enabled:
        alive = decisions.alive()
        keys = facts.column(BANDS).combine_chunks().flatten().to_numpy().reshape(-1, bands)[alive]
        pairs = alive[candidate_pairs(keys)]
        stats["candidate_pairs"] = len(pairs)
    candidates = np.unique(pairs)
    # the rows a detail names and the candidates (whose signatures verify the pairs): read back, only those rows
    exact_keepers = decisions.partner[decisions.reason == REASONS.index("exact_duplicate") + 1]
    named = np.union1d(candidates, exact_keepers).astype(np.int64)
    ids, signatures = _read_back_named(cfg, spec, order, named)
    if len(pairs):
        estimates = _pair_estimates(signatures, np.searchsorted(named, pairs))
        stats["verified_pairs"] = int((estimates >= near.threshold).sum())
        dropped, kept_from, stats["clusters"] = near_duplicate_clusters(
            np.searchsorted(candidates, pairs), estimates, near.threshold, len(candidates))
        slot = np.searchsorted(named, candidates)
        jaccard = minhash.estimated_jaccard(signatures[slot[dropped]], signatures[slot[kept_from]])
        decisions.drop(candidates[dropped], "near_duplicate", candidates[kept_from], jaccard)
    return named, ids, stats


def _reference_similarity(cfg: QcConfig, spec: CorpusSpec, order: np.ndarray, rows: np.ndarray,
                          references: list[str], cpus: int, cut_blocks: bool) -> tuple[np.ndarray, np.ndarray]:
    """(cosine to the closest reference, which one) for ``rows``, by an actor pool of embedding models: one
    single-threaded actor per CPU, sharing what reading leaves (as the embed stage does)."""
    if not len(rows):
        return np.zeros(0, np.float32), np.zeros(0, np.int32)
    reserved, _ = reading_cpus(cpus)
    batch = 64
    # blocks of up to 8 batches, smaller when there are few rows so that every actor gets some; no more actors than
    # blocks (each loads a model)
    per_block = min(batch * 8, max(batch, -(-len(rows) // cpus)))
    actors = max(1, min(cpus, -(-len(rows) // per_block)))
    with without_operator_reservations():
        table = _collect(read_corpus(spec, num_cpus=READ_TASK_CPUS, only_rows=pa.table({corpus.ORDER: order[rows]}),
                                     rows_per_block=per_block if cut_blocks else None)
                         .map_batches(NearestReference, fn_constructor_kwargs={
                             "model": cfg.diversity.model, "text_field": cfg.text_field, "references": references,
                             "keep_columns": [corpus.ORDER], "batch_size": batch, "torch_threads": 1},
                             compute=ActorPoolStrategy(size=actors), num_cpus=(cpus - reserved) / actors,
                             batch_size=per_block, batch_format="pyarrow"))
    slot = np.searchsorted(order[rows], table.column(corpus.ORDER).to_numpy())
    similarity, nearest = np.zeros(len(rows), np.float32), np.zeros(len(rows), np.int32)
    similarity[slot] = table.column(SIMILARITY).to_numpy()
    nearest[slot] = table.column(NEAREST).to_numpy()
    return similarity, nearest


class _IdsAndSignatures:
    """Ray Data map (tasks): ``_order``, id and MinHash signature of the rows read back."""

    def __init__(self, cfg: QcConfig):
        self.cfg = cfg

    def __call__(self, batch: pa.Table) -> pa.Table:
        near = self.cfg.near_dedup
        columns = {corpus.ORDER: batch.column(corpus.ORDER),
                   "id": batch.column(self.cfg.id_field).cast(pa.string())}
        if near.enabled:
            sig = minhash.minhash_texts(batch.column(self.cfg.text_field), near.num_perm, near.shingle_words,
                                        near.seed)
            columns[SIGNATURE] = pa.FixedSizeListArray.from_arrays(pa.array(sig.ravel()), near.num_perm)
        return pa.table(columns)


def _read_back_named(cfg: QcConfig, spec: CorpusSpec, order: np.ndarray,
                     rows: np.ndarray) -> tuple[list[str], np.ndarray | None]:
    """Ids (and signatures) of ``rows`` (ascending positions), in that order."""
    if not len(rows):
        return [], None
    with without_operator_reservations():
        # reads of one CPU: a few rows, and 0.25-CPU reads would start a new worker process per file (seconds)
        table = _collect(read_corpus(spec, only_rows=pa.table({corpus.ORDER: order[rows]}))
                         .map_batches(_IdsAndSignatures(cfg), batch_size=cfg.batch_size, batch_format="pyarrow"))
    if table is None or table.num_rows != len(rows):
        raise QcError(f"qc: read back {0 if table is None else table.num_rows} of {len(rows)} rows: the input "
                      f"changed while qc ran ({', '.join(spec.paths)})")
    table = table.take(pa.array(np.argsort(table.column(corpus.ORDER).to_numpy())))
    signatures = None
    if SIGNATURE in table.column_names:
        signatures = table.column(SIGNATURE).combine_chunks().flatten().to_numpy().reshape(len(rows), -1)
    return table.column("id").to_pylist(), signatures


def _pair_estimates(signatures: np.ndarray, slots: np.ndarray, chunk: int = 65536) -> np.ndarray:
    return np.concatenate([minhash.estimated_jaccard(signatures[slots[lo:lo + chunk, 0]],
                                                     signatures[slots[lo:lo + chunk, 1]])
                           for lo in range(0, len(slots), chunk)]) if len(slots) else np.zeros(0)


def _details(decisions: Decisions, rows: np.ndarray, cfg: QcConfig, inputs: QcInputs, named: np.ndarray,
             ids: list[str]) -> list[str]:
    """The human-readable why of each dropped row."""
    out = []
    for reason, partner, score in zip(decisions.reason[rows].tolist(), decisions.partner[rows].tolist(),
                                      decisions.score[rows].tolist()):
        name = REASONS[reason - 1]
        if name == "duplicate_of_reference":
            out.append(f"duplicate of reference {partner}" if np.isnan(score) else
                       f"near-duplicate of reference {partner} (estimated Jaccard {score:.2f})")
        elif name == "contaminated":
            file, line = inputs.eval.sources[partner]
            words = 0 if np.isnan(score) else int(score)
            if not words:
                out.append(f"{cfg.decontaminate.ngram}-gram shared with eval {file} line {line}")
            elif words < SHORT_ITEM_MIN_WORDS:
                out.append(f"whole text is the {words}-word eval item of {file} line {line}")
            else:
                out.append(f"{words}-word eval item shared with eval {file} line {line}")
        elif name == "similar_to_reference":
            out.append(f"embedding cosine {score:.3f} to reference {partner} (max_reference_similarity "
                       f"{cfg.max_reference_similarity})")
        else:
            partner_id = ids[int(np.searchsorted(named, partner))]
            out.append(f"duplicate of id {partner_id}" if name == "exact_duplicate" else
                       f"near-duplicate of id {partner_id} (estimated Jaccard {score:.2f})")
    return out


def render_markdown(report: dict, diversity_lines: list[str]) -> str:
    near = report["near_dedup"]
    rows = outcome_rows(report) + [
        ("near-duplicates", f"Jaccard >= {near['threshold']} on {near['shingle_words']}-word shingles, "
                            f"{near['num_perm']} permutations, LSH {near['bands']} bands x {near['rows']} rows; "
                            f"{near['candidate_pairs']:,} candidate pairs, {near['verified_pairs']:,} verified, "
                            f"{near['clusters']:,} clusters" if near["enabled"] else "off"),
        ("documents / second", report["docs_per_second"]), ("seconds", report["seconds"])]
    return "\n".join(["# qc — quality control", "", markdown_table(rows), "",
                      "Dropped rows, with `qc_reason` and `qc_detail`, are in `dropped/`.", "", *diversity_lines, ""])


def _qc_context(recipe) -> dict:
    """What qc reads when its section names no input (this run's synthesize output) and the references it
    compares with when it names none (synthesize's)."""
    from .synthesize import default_references

    references = default_references(recipe.synthesize) if recipe.synthesize is not None else None
    return {"upstream": paths.join(recipe.run_dir, "synthesize", "data"), "references": references}


class Qc(Stage):
    name, config, report = "qc", QcConfig, OutcomeReport
    help = ("Quality control: exact and near-duplicates, decontamination against evaluation sets, similarity to "
            "references.")

    def check_recipe(self, cfg: QcConfig, recipe) -> None:
        if cfg.input is None and recipe.synthesize is None:
            raise ValueError("qc.input: required unless the recipe has a synthesize section")

    def preflight(self, cfg: QcConfig, recipe) -> None:
        if cfg.input is not None:
            check_inputs("qc.input", cfg.input)
        check_qc(cfg, _qc_context(recipe)["references"])

    def upstream(self, cfg: QcConfig, recipe) -> dict[str, str]:
        return {} if cfg.input else {"qc.input": _qc_context(recipe)["upstream"]}

    def run(self, cfg: QcConfig, stage: StageDir, recipe) -> dict:
        return run_qc(cfg, stage, **_qc_context(recipe))

    def summary(self, r: OutcomeReport) -> str:
        return outcome_summary("qc", r)
