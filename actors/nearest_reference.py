"""A Ray Data actor that finds each row's closest reference sample by embedding cosine (QC's
``max_reference_similarity``): it holds the sentence-transformers model and the references' vectors, and returns
only the row's ``keep_columns`` with the similarity and the reference's position, never the text."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .embedding import load_sentence_model

SIMILARITY = "nearest_reference_similarity"
NEAREST = "nearest_reference"


class NearestReference:
    def __init__(self, model: str, text_field: str, references: list[str], keep_columns: list[str],
                 batch_size: int = 64, torch_threads: int | None = None):
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        self.model = load_sentence_model(model)
        self.text_field, self.keep_columns, self.batch_size = text_field, keep_columns, batch_size
        self.references = self._embed(references)

    def _embed(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False).astype(np.float32)

    def __call__(self, batch: pa.Table) -> pa.Table:
        similarity = self._embed(batch.column(self.text_field).to_pylist()) @ self.references.T
        kept = batch.select([c for c in self.keep_columns if c in batch.column_names])
        kept = kept.append_column(SIMILARITY, pa.array(similarity.max(axis=1), pa.float32()))
        return kept.append_column(NEAREST, pa.array(similarity.argmax(axis=1), pa.int32()))
