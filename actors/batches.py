"""Helpers shared by the Ray Data batch actors (batches are pyarrow Tables so every input field rides along)."""

from __future__ import annotations


import numpy as np
import pyarrow as pa


def append_score_column(batch: pa.Table, text_field: str, column: str, score_texts) -> pa.Table:
    """Score the non-null texts of ``batch`` with ``score_texts`` and append the scores as ``column``."""
    n = batch.num_rows
    scores = np.full(n, np.nan, dtype=np.float32)
    if text_field in batch.column_names and n:
        texts = batch.column(text_field).to_pylist()
        present = [i for i, t in enumerate(texts) if isinstance(t, str)]
        if present:
            scores[present] = score_texts([texts[i] for i in present])
    return batch.append_column(column, pa.array(scores, mask=np.isnan(scores), type=pa.float32()))
