"""Stage reports for people: ``report.json`` (the contract) rendered as ``report.md`` with plots."""

from __future__ import annotations

import io

import numpy as np

from .rundir import StageDir
from .stage import StageReport


def score_histogram_png(scores: np.ndarray, kept: np.ndarray, threshold: float | None, title: str) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    bins = np.linspace(0.0, 1.0, 41)
    ax.hist([scores[~kept], scores[kept]], bins=bins, stacked=True, color=["#9aa5b1", "#1f77b4"],
            label=[f"not kept ({int((~kept).sum()):,})", f"kept ({int(kept.sum()):,})"])
    if threshold is not None:
        ax.axvline(threshold, color="#d62728", linestyle="--", linewidth=1.2, label=f"threshold {threshold:.3f}")
    ax.set_yscale("log")
    ax.set_xlabel("domain_score = P(in-domain)")
    ax.set_ylabel("documents (log)")
    ax.set_title(title)
    ax.legend(loc="upper center", fontsize=8)
    return _png(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    return buf.getvalue()


def embedding_map_png(corpus_sample: np.ndarray, few_shots: np.ndarray, retrieved: np.ndarray, title: str) -> bytes:
    """Vectors projected onto the corpus sample's first two principal components: where the few-shots and what was
    retrieved for them sit in the corpus (the picture of TRAIT's Figure 3)."""
    basis = corpus_sample if len(corpus_sample) >= 3 else np.concatenate([corpus_sample, few_shots, retrieved])
    centre = basis.mean(axis=0)
    components = np.linalg.svd(basis - centre, full_matrices=False)[2][:2].T

    def project(x: np.ndarray) -> np.ndarray:
        return (x - centre) @ components if len(x) else np.zeros((0, 2))

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=110)
    for points, style in ((corpus_sample, dict(s=6, color="#b0b7bf", label=f"corpus sample ({len(corpus_sample):,})")),
                          (retrieved, dict(s=10, color="#1f77b4", label=f"retrieved ({len(retrieved):,})")),
                          (few_shots, dict(s=90, color="#d62728", marker="*", label=f"few-shots ({len(few_shots)})"))):
        xy = project(points)
        ax.scatter(xy[:, 0], xy[:, 1], alpha=0.8, linewidths=0, **style)
    ax.set_xlabel("principal component 1")
    ax.set_ylabel("principal component 2")
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    return _png(fig)


def similarity_histogram_png(corpus_sample: np.ndarray, retrieved: np.ndarray) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    low = float(min(corpus_sample.min(initial=1.0), retrieved.min(initial=1.0)))
    bins = np.linspace(min(low, 0.0), 1.0, 51)
    ax.hist(corpus_sample, bins=bins, density=True, alpha=0.6, color="#9aa5b1", label="corpus sample")
    ax.hist(retrieved, bins=bins, density=True, alpha=0.7, color="#1f77b4", label="retrieved")
    ax.set_xlabel("cosine similarity to the closest few-shot")
    ax.set_ylabel("density")
    ax.set_title("retrieve: score distributions")
    ax.legend(fontsize=8)
    return _png(fig)


def token_histogram_png(tokens: np.ndarray, max_tokens: int) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.4), dpi=110)
    ax.hist(tokens, bins=np.linspace(0, max_tokens, min(max_tokens, 40) + 1), color="#1f77b4")
    ax.axvline(max_tokens, color="#d62728", linestyle="--", linewidth=1.2, label=f"max_tokens {max_tokens}")
    ax.set_xlabel("completion tokens")
    ax.set_ylabel("completions")
    ax.set_title("generate: completion lengths")
    ax.legend(fontsize=8)
    return _png(fig)


def markdown_table(rows: list[tuple[str, object]]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {k} | {v:,} |" if isinstance(v, int) else f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def write_report(stage: StageDir, report: dict, markdown: str) -> None:
    """report.json and report.md; the report must keep the accounting contract (StageReport), or the stage lost or
    invented rows."""
    StageReport.model_validate(report)
    stage.write_json("report.json", report)
    stage.write_text("report.md", markdown)
