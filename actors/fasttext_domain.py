"""TRAIT step 1, the domain classifier: a fastText model of in-domain vs general text.

Training runs in a fresh process (a Ray task with ``max_calls=1``) because the fastText wheel returns NaN losses
when one process trains twice. Scoring runs in Ray Data actors that load the model once per worker.
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


IN_DOMAIN_LABEL = "__label__in"
GENERAL_LABEL = "__label__out"
# fastText reads its input line by line; only the head of a long document is needed to tell its domain.
MAX_CHARS = 6000
_PUNCTUATION = r"""([.,;:!?()\[\]"'])"""


def normalise_text(texts: list[str] | pa.Array) -> pa.Array:
    """The text as the classifier sees it: lower case, punctuation split from words, all on one line (vectorised with
    Arrow; nulls stay null). The select stage also hashes it for exact dedup, so it is computed once per document."""
    t = pc.replace_substring_regex(pc.utf8_lower(pa.array(texts, pa.string())), _PUNCTUATION, r" \1 ")
    return pc.utf8_trim_whitespace(pc.replace_substring_regex(t, r"\s+", " "))


def classifier_input(normalised: pa.Array) -> list[str]:
    return pc.utf8_slice_codeunits(normalised, 0, MAX_CHARS).to_pylist()


@dataclass(frozen=True)
class FastTextParams:
    """Training knobs, tuned on the bundled data (docs/recipes.md has the table): balanced classes and bigrams matter;
    more epochs or a higher learning rate memorise the in-domain documents that hide among the sampled negatives."""

    epoch: int = 5
    lr: float = 0.1
    word_ngrams: int = 2
    dim: int = 32
    bucket: int = 262_144
    min_count: int = 2
    # Upsample positives so both classes carry equal weight; a few hundred positives against thousands of negatives
    # otherwise push every score towards "general".
    balance_classes: bool = True
    validation_fraction: float = 0.1
    seed: int = 13
    threads: int = 1


@dataclass
class TrainedClassifier:
    model_bytes: bytes
    metrics: dict


def _write_training_file(path: str, positives: list[str], negatives: list[str], params: FastTextParams) -> None:
    rng = random.Random(params.seed)
    pos = list(positives)
    if params.balance_classes and pos and len(negatives) > len(pos):
        pos = pos * (len(negatives) // len(pos)) + rng.sample(pos, len(negatives) % len(pos))
    lines = [f"{IN_DOMAIN_LABEL} {t}" for t in classifier_input(normalise_text(pos))]
    lines += [f"{GENERAL_LABEL} {t}" for t in classifier_input(normalise_text(negatives))]
    rng.shuffle(lines)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def _validation_metrics(model, positives: list[str], negatives: list[str]) -> dict:
    if not positives or not negatives:
        return {}
    pos_scores = predict_in_domain_probability(model, positives)
    neg_scores = predict_in_domain_probability(model, negatives)
    tp = int((pos_scores >= 0.5).sum())
    fp = int((neg_scores >= 0.5).sum())
    return {
        "validation_positives": len(positives),
        "validation_negatives": len(negatives),
        "precision_at_0.5": tp / max(tp + fp, 1),
        "recall_at_0.5": tp / len(positives),
    }


def train_classifier(positives: list[str], negatives: list[str], params: FastTextParams) -> TrainedClassifier:
    """Train in *this* process; callers run it in a fresh one (see ``pipelines.select``)."""
    import fasttext

    rng = random.Random(params.seed)
    pos, neg = list(positives), list(negatives)
    rng.shuffle(pos)
    rng.shuffle(neg)
    n_val_pos = int(len(pos) * params.validation_fraction)
    n_val_neg = int(len(neg) * params.validation_fraction)
    val_pos, train_pos = pos[:n_val_pos], pos[n_val_pos:]
    val_neg, train_neg = neg[:n_val_neg], neg[n_val_neg:]
    with tempfile.TemporaryDirectory() as tmp:
        train_path = os.path.join(tmp, "train.txt")
        _write_training_file(train_path, train_pos, train_neg, params)
        model = fasttext.train_supervised(
            input=train_path,
            epoch=params.epoch,
            lr=params.lr,
            wordNgrams=params.word_ngrams,
            dim=params.dim,
            bucket=params.bucket,
            minCount=params.min_count,
            thread=params.threads,
            seed=params.seed,
            verbose=0,
        )
        metrics = {"train_positives": len(train_pos), "train_negatives": len(train_neg), **asdict(params)}
        metrics.update(_validation_metrics(model, val_pos, val_neg))
        model_path = os.path.join(tmp, "model.bin")
        model.save_model(model_path)
        with open(model_path, "rb") as f:
            return TrainedClassifier(model_bytes=f.read(), metrics=metrics)


def load_model(model_bytes: bytes):
    import fasttext

    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(model_bytes)
        f.flush()
        return fasttext.load_model(f.name)


def predict_in_domain_probability(model, texts: list[str]) -> np.ndarray:
    """P(in-domain) for each text, in [0, 1]."""
    return predict_normalised(model, classifier_input(normalise_text(texts)))


def predict_normalised(model, lines: list[str]) -> np.ndarray:
    """P(in-domain) for texts already passed through ``normalise_text`` and ``classifier_input``."""
    if not lines:
        return np.zeros(0, dtype=np.float32)
    # k=1: with two labels, P(in) is the top probability or its complement.
    labels, probs = model.predict(lines, k=1)
    top = np.fromiter((p[0] if len(p) else 0.0 for p in probs), dtype=np.float32, count=len(lines))
    is_in = np.fromiter((bool(l) and l[0] == IN_DOMAIN_LABEL for l in labels), dtype=bool, count=len(lines))
    return np.clip(np.where(is_in, top, 1.0 - top), 0.0, 1.0)


class FastTextDomainScorer:
    """Ray Data actor: adds ``domain_score`` = P(in-domain) to each batch; rows without text get null."""

    def __init__(self, model_bytes: bytes, text_field: str):
        self.model = load_model(model_bytes)
        self.text_field = text_field

    def score_normalised(self, normalised: pa.Array) -> pa.Array:
        """Domain scores for an array of ``normalise_text`` output; nulls stay null."""
        present = pc.is_valid(normalised)
        scores = np.full(len(normalised), np.nan, dtype=np.float32)
        idx = np.flatnonzero(present.to_numpy(zero_copy_only=False))
        if len(idx):
            scores[idx] = predict_normalised(self.model, classifier_input(normalised.take(pa.array(idx))))
        return pa.array(scores, mask=np.isnan(scores), type=pa.float32())

    def __call__(self, batch: pa.Table) -> pa.Table:
        normalised = normalise_text(batch.column(self.text_field).combine_chunks())
        return batch.append_column("domain_score", self.score_normalised(normalised))
