"""The data map, TRAIT's Figure 3 for this run: the general corpus, the in-domain examples, the selected documents,
the synthetic samples and the downstream-task items, embedded with the run's embedding model (or the embed stage's
stored vectors) and drawn in two dimensions, so one picture shows whether the method's data reaches the tasks
that the in-domain examples leave uncovered. Draws ``site/embedding_map.png``; returns what it shows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from ..report import _png, _pyplot
from .run import SITE_DIR, Run, Unreadable, _short
from .samples import MAP_SEED, _from_entries, record_text, sample_rows, task_items

MAP_POINTS = 200  # at most this many points of each group on the data map
MAP_TEXT_CHARS = 2000  # a text's first characters embedded for the map (the model reads 128-256 tokens of it)
MAP_MAX_SEQ_LENGTH = 128  # tokens embedded when the run has no embed stage to take the setting from
SYNTHETIC_STAGES = ("judge", "qc", "synthesize", "generate")  # the last of them that ran holds the synthetic set


@dataclass
class MapGroup:
    key: str
    label: str
    color: str
    marker: str
    size: float
    texts: list[str] = field(default_factory=list)
    vectors: Optional[np.ndarray] = None
    source: str = ""
    note: str = ""  # why the group is missing, when it was looked for and could not be read

    @property
    def points(self) -> int:
        return len(self.vectors) if self.vectors is not None else len(self.texts)


# Drawing order, bottom to top; colours after TRAIT's Figure 3 (general light blue, in-domain purple, downstream
# grey, the method's data green).
MAP_GROUPS = (
    ("general", "general corpus", "#9ecae1", "o", 7),
    ("selected", "selected documents", "#ff7f0e", "o", 9),
    ("downstream", "downstream-task items", "#636363", "x", 16),
    ("in_domain", "in-domain examples", "#7b3294", "D", 14),
    ("synthetic", "synthetic samples", "#1a9850", "^", 20),
)


def map_groups(run: Run, sources: dict, present: list[str],
               points: int = MAP_POINTS) -> tuple[list[MapGroup], dict]:
    """The groups of the data map, each with its texts (or the embed stage's stored vectors; at most ``points``
    of each), and the embedding model's settings ({model, max_seq_length})."""
    groups = {key: MapGroup(key, label, color, marker, size) for key, label, color, marker, size in MAP_GROUPS}
    embed_report: dict = {}
    if "embed" in present:
        try:
            embed_report = run.read_json("embed", "report.json")
        except Unreadable:
            embed_report = {}
    model = {"model": embed_report.get("model") or "all-MiniLM-L6-v2",
             "max_seq_length": embed_report.get("max_seq_length") or MAP_MAX_SEQ_LENGTH}
    stored_for = _embedded_group(run, embed_report) if embed_report else None

    def collect(group: MapGroup, how: Callable[[], tuple[list[str], str]]) -> None:
        try:
            group.texts, group.source = how()
        except Unreadable as e:
            group.note = f"not readable: {e}"
        except Exception as e:  # noqa: BLE001 - one group's failure leaves the others on the map
            group.note = f"not readable: {type(e).__name__}: {e}"

    # Stored vectors: embed's corpus is select's output (selected documents) or the general corpus itself.
    if stored_for is not None:
        try:
            rows = sample_rows(run, ("embed", "data"), ["embedding"], points)
            if rows:
                groups[stored_for].vectors = np.asarray([r["embedding"] for r in rows], np.float32)
                groups[stored_for].source = "the embed stage's vectors (embed/data)"
        except Exception as e:  # noqa: BLE001 - the group is read from its texts instead, where the run has them
            groups[stored_for].note = f"not readable: embed/data: {_short(e)}"
    if groups["selected"].vectors is None and "select" in present:
        fields = [f for e in sources.get("general") or [] if e.get("what") == "select.corpus"
                  for f in e.get("fields") or []]
        collect(groups["selected"], lambda: ([record_text(r, fields) or record_text(r) for r in sample_rows(
            run, ("select", "data"), [*fields, "text", "Text", "content"], points)], "select/data"))
    for key in ("general", "in_domain", "downstream"):
        if groups[key].vectors is not None:
            continue
        entries = sources.get(key) or []
        if key == "downstream" and "evaluate" in present and run.is_dir("evaluate", "tasks"):
            collect(groups[key], lambda: task_items(run, points))
            if groups[key].texts:
                continue
        if entries:
            collect(groups[key], lambda entries=entries: _from_entries(entries, points))
    synthetic = next((s for s in SYNTHETIC_STAGES if s in present and run.is_dir(s, "data")), None)
    if synthetic is not None:
        collect(groups["synthetic"], lambda: ([t for t in (record_text(r, ["text"]) or record_text(r) for r in
                                                           sample_rows(run, (synthetic, "data"),
                                                                       ["text", "completion", "instruction",
                                                                        "output"], points)) if t],
                                              f"{synthetic}/data"))
    for g in groups.values():
        g.texts = [t for t in g.texts if t]
    return [groups[key] for key, *_ in MAP_GROUPS], model


def _embedded_group(run: Run, embed_report: dict) -> Optional[str]:
    """Which group the embed stage's vectors are: ``selected`` when it embedded this run's select output, else the
    general corpus (CRAFT's retrieval corpus)."""
    corpus = (embed_report.get("corpus") or {}).get("paths") or []
    if not corpus:
        return None
    # As the recipe named it (a relative run_dir stays relative): by its end, not resolved from here.
    if all(p.partition("?")[0].rstrip("/").endswith("select/data") for p in corpus):
        return "selected"
    return "general"


def embed_texts_here(texts: list[str], model: str, max_seq_length: Optional[int]) -> np.ndarray:
    """Normalised vectors with the project's embedding code, in this process (the page is written with or without a
    Ray cluster)."""
    from ...actors.embedding import encode, load_sentence_model

    return encode(load_sentence_model(model, max_seq_length, device="cpu"), texts, batch_size=64).astype(np.float32)


def project_2d(vectors: np.ndarray, seed: int = MAP_SEED) -> tuple[np.ndarray, str]:
    """2-D coordinates: t-SNE (scikit-learn, fixed seed, PCA start, on the first 50 principal components) for 30
    points or more, else PCA."""
    if len(vectors) >= 30:
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE

        reduced = PCA(n_components=min(50, *vectors.shape), random_state=seed).fit_transform(vectors)
        perplexity = float(min(30, (len(vectors) - 1) / 3))
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, learning_rate="auto",
                  max_iter=500).fit_transform(reduced)
        return xy, "t-SNE"
    centred = vectors - vectors.mean(axis=0)
    if len(vectors) < 2:
        return np.zeros((len(vectors), 2)), "PCA"
    components = np.linalg.svd(centred, full_matrices=False)[2][:2].T
    xy = centred @ components
    return (np.pad(xy, ((0, 0), (0, 2 - xy.shape[1]))) if xy.shape[1] < 2 else xy), "PCA"


def data_map(run: Run, sources: dict, present: list[str], points: int = MAP_POINTS) -> dict:
    """Draws ``site/embedding_map.png`` and returns what it shows (written as ``site/embedding_map.json``)."""
    groups, model = map_groups(run, sources, present, points)
    shown = [g for g in groups if g.points]
    info = {"model": model["model"], "groups": {}, "missing": {g.label: g.note for g in groups if g.note and
                                                               not g.points}}
    if not shown:
        info["method"] = None
        return info
    to_embed = [t[:MAP_TEXT_CHARS] for g in shown if g.vectors is None for t in g.texts]
    fresh = embed_texts_here(to_embed, model["model"], model["max_seq_length"]) if to_embed else None
    at = 0
    for g in shown:
        if g.vectors is None:
            g.vectors, at = fresh[at:at + len(g.texts)], at + len(g.texts)
    dims = {g.vectors.shape[1] for g in shown}
    if len(dims) > 1:  # stored vectors of another model than the one loaded here: drop them, say why
        kept_dim = fresh.shape[1] if fresh is not None else max(dims)
        for g in shown:
            if g.vectors.shape[1] != kept_dim:
                info["missing"][g.label] = f"its vectors have {g.vectors.shape[1]} dimensions, the others {kept_dim}"
        shown = [g for g in shown if g.vectors.shape[1] == kept_dim]
    xy, method = project_2d(np.concatenate([g.vectors for g in shown]))
    info["method"] = method
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.6, 6.0), dpi=110)
    at = 0
    for g in shown:
        points = xy[at:at + g.points]
        at += g.points
        edges = {"linewidths": 1.0} if g.marker == "x" else {"linewidths": 0.3, "edgecolors": "white"}
        ax.scatter(points[:, 0], points[:, 1], s=g.size, c=g.color, marker=g.marker, alpha=0.8,
                   label=f"{g.label} ({g.points:,})", **edges)
        info["groups"][g.label] = {"points": g.points, "source": g.source}
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"The run's data in embedding space ({method} of {model['model']} vectors)", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False, markerscale=1.6)
    run.write(f"{SITE_DIR}/embedding_map.png", _png(fig))
    return info
