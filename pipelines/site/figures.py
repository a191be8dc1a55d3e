"""The figures each stage writes, in the order its section shows them, what each shows (its caption), and the
ones drawn here from the stage's data where the stage left none (select's domain scores, judge's ratings, a
training stage's loss), so that a section is never missing its picture when the data to draw it is there."""

from __future__ import annotations

from typing import Callable

import numpy as np

from .curves import _series, metrics
from .run import Run, Unreadable, parquet_folder


# The figures each stage writes, in the order the page shows them (any other PNG of the folder follows them).
STAGE_FIGURES = {
    "select": ["domain_scores.png"],
    "retrieve": ["embedding_map.png", "scores.png"],
    "generate": ["completion_tokens.png"],
    "synthesize": ["sample_tokens.png", "nearest_reference.png"],
    "qc": ["nearest_reference.png"],
    "judge": ["ratings.png", "nearest_reference.png"],
    "softprompt": ["loss.png"],
    "pretrain": ["loss.png", "perplexity.png"],
    "finetune": ["loss.png"],
    "preference": ["loss.png"],
    "evaluate": ["results.png"],
}


# What each figure shows, under it on the page (keyed by file name, or by stage and file name).
FIGURE_CAPTIONS = {
    ("select", "domain_scores.png"): "domain scores of the corpus: kept and not kept, and the threshold",
    ("retrieve", "embedding_map.png"): "the corpus, the few-shots and what was retrieved for them (PCA)",
    ("retrieve", "scores.png"): "similarity to the closest few-shot: the corpus against what was retrieved",
    "completion_tokens.png": "completion lengths",
    "sample_tokens.png": "tokens per kept sample",
    "nearest_reference.png": "how close the kept samples are to the references",
    "ratings.png": "the judge's ratings (kept ones in green)",
    ("pretrain", "loss.png"): "training loss over the stages, the boundary marked",
    ("pretrain", "perplexity.png"): "held-out perplexity: domain text (learning) and general text (forgetting)",
    "loss.png": "loss over optimizer steps",
    "results.png": "each model's primary metric per task, with its standard error",
}


def caption_of(stage: str, png: str) -> str:
    text = FIGURE_CAPTIONS.get((stage, png)) or FIGURE_CAPTIONS.get(png)
    return f"{text} — {png}" if text else png


def select_histogram(run: Run) -> bytes:
    from ..report import score_histogram_png

    dataset = parquet_folder(run, "select", "data")
    if "domain_score" not in dataset.schema.names:
        raise Unreadable("select/data: no domain_score column")
    scores = dataset.to_table(columns=["domain_score"]).column("domain_score").to_numpy(zero_copy_only=False)
    scores = scores[np.isfinite(scores.astype(np.float64))].astype(np.float64)
    return score_histogram_png(scores, np.ones(len(scores), bool), None,
                               "select: domain scores of the kept documents")


def judge_ratings(run: Run) -> bytes:
    from ..synthesis.judge import ratings_png

    report = run.read_json("judge", "report.json")
    if not isinstance(report.get("ratings"), dict):
        raise Unreadable("judge/report.json: no ratings")
    return ratings_png(report["ratings"], report.get("threshold") or "very poor")


def stage_loss(name: str) -> Callable[[Run], bytes]:
    def draw(run: Run) -> bytes:
        from ..training.hf_run import curve_png

        history = metrics(run, name, "metrics.jsonl")
        return curve_png([("training loss", _series(history, "loss")),
                          ("validation loss", _series(history, "eval_validation_loss"))], f"{name}: loss", "loss")
    return draw


# A figure a stage normally writes, drawn here from its data when the stage left none.
FALLBACK_FIGURES: dict[tuple[str, str], Callable[[Run], bytes]] = {
    ("select", "domain_scores.png"): select_histogram,
    ("judge", "ratings.png"): judge_ratings,
    **{(name, "loss.png"): stage_loss(name) for name in ("softprompt", "finetune", "preference")},
}
