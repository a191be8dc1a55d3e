"""How varied the kept samples are, and how close they stay to the references: the measures the synthesize, qc and
judge reports share.

- distinct-1/2/3: distinct word n-grams / all word n-grams over the sample (normalised words, as deduplication sees
  them); low values mean the generator repeats itself.
- mean pairwise embedding distance (1 - cosine) over the sample: 0 when every sample says the same thing.
- nearest-reference similarity: each sample's highest cosine to any reference (mean, median, max, and the values for
  a histogram); values near 1 mean samples paraphrase the references instead of adding to them.

The embeddings are computed in one Ray task (one CPU), so the driver loads no model.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from ...actors.minhash import normalised_words
from ..report import _png, _pyplot, markdown_table
from ..schema import ModelRef, Strict


class DiversityConfig(Strict):
    """How reports measure the diversity of what is kept."""
    sample: int = Field(2000, ge=0, description="Rows (at most) embedded for the diversity measures; 0 = off.")
    model: ModelRef = Field("all-MiniLM-L6-v2", description="sentence-transformers id or path.")


def distinct_n(words: list[list[str]], n: int) -> float | None:
    """Distinct n-grams / n-grams over all texts (None when no text has n words)."""
    grams = [tuple(w[i:i + n]) for w in words for i in range(len(w) - n + 1)]
    return round(len(set(grams)) / len(grams), 4) if grams else None


def _embedding_measures(texts: list[str], references: list[str] | None, model: str) -> dict:
    from ..curation.embed import (
        embed_texts,  # one Ray task, one model load for samples and references
    )

    vectors = embed_texts(texts + list(references or []), model).astype(np.float64)
    vectors, reference_vectors = vectors[:len(texts)], vectors[len(texts):]
    n = len(vectors)
    out: dict = {"mean_pairwise_distance": None, "nearest_reference": None}
    if n >= 2:
        # mean over pairs i != j of v_i . v_j, from the sum vector: O(n) instead of the n x n matrix
        total = vectors.sum(axis=0)
        mean_cos = (total @ total - (vectors * vectors).sum()) / (n * (n - 1))
        out["mean_pairwise_distance"] = round(float(1.0 - mean_cos), 4)
    if references:
        nearest = (vectors @ reference_vectors.T).max(axis=1)
        out["nearest_reference"] = {
            "references": len(references), "mean": round(float(nearest.mean()), 4),
            "median": round(float(np.median(nearest)), 4), "max": round(float(nearest.max()), 4),
            "values": [round(float(v), 4) for v in nearest]}
    return out


def measure_diversity(texts: list[str], reference_texts: list[str] | None, cfg: DiversityConfig) -> dict | None:
    """The diversity measures of at most ``cfg.sample`` of ``texts`` (a seeded sample); None when ``cfg.sample`` is
    0 or there are no texts. ``nearest_reference`` is None without references; its ``values`` (one per sampled
    text) are there for ``nearest_reference_png``."""
    if not cfg.sample or not texts:
        return None
    if len(texts) > cfg.sample:
        picks = np.sort(np.random.default_rng(0).choice(len(texts), size=cfg.sample, replace=False))
        texts = [texts[i] for i in picks]
    words = normalised_words(texts).to_pylist()
    measures = _embedding_measures(list(texts), list(reference_texts or []) or None, cfg.model)
    return {"sample": len(texts), "model": cfg.model,
            **{f"distinct_{n}": distinct_n(words, n) for n in (1, 2, 3)}, **measures}


def diversity_markdown(d: dict) -> str:
    near = d.get("nearest_reference")
    rows = [("texts measured", d["sample"]), ("distinct-1 / 2 / 3",
                                              f"{d['distinct_1']} / {d['distinct_2']} / {d['distinct_3']}"),
            ("mean pairwise embedding distance (1 - cosine)", d["mean_pairwise_distance"])]
    if near:
        rows.append((f"similarity to the closest of {near['references']:,} references (mean / median / max)",
                     f"{near['mean']} / {near['median']} / {near['max']}"))
    rows.append(("embedding model", d["model"]))
    return "\n".join(["## Diversity", "", markdown_table(rows)])


def nearest_reference_png(similarities) -> bytes:
    values = np.asarray(similarities, dtype=np.float64)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.4), dpi=110)
    ax.hist(values, bins=np.linspace(min(0.0, float(values.min(initial=0.0))), 1.0, 41), color="#1f77b4")
    if len(values):
        ax.axvline(float(np.median(values)), color="#d62728", linestyle="--", linewidth=1.2,
                   label=f"median {np.median(values):.3f}")
        ax.legend(fontsize=8)
    ax.set_xlabel("cosine similarity to the closest reference")
    ax.set_ylabel("samples")
    ax.set_title(f"closeness to the references ({len(values):,} samples)")
    return _png(fig)
