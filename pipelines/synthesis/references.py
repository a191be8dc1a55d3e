"""Reference samples: the handful of human-written examples that synthetic data is compared with (the CRAFT
few-shots, TRAIT's task examples, DOMINO's reference set). QC drops samples that copy one, reports measure how close
what is kept stays to them. They are small, so they are read here, in one process; a bad line is an error naming
file, line and reason."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from ..paths import expand_inputs


@dataclass(frozen=True)
class References:
    """Where the references are and which of their fields, joined by a newline, make a reference's text (None:
    ``text``, else ``Text`` as in CRAFT's files)."""
    paths: list[str]
    fields: Optional[list[str]] = None


def references_of(cfg, fallback: "References | None" = None) -> "References | None":
    """A stage's own references (its ``references`` and ``reference_fields``), else ``fallback``."""
    return References(cfg.references, cfg.reference_fields) if cfg.references else fallback


def read_records(specs: list[str], what: str) -> list[tuple[str, int, dict]]:
    """Every row of JSONL/Parquet ``specs`` as (file, line, record); ``what`` names the recipe field in errors."""
    import pyarrow.parquet as pq

    from ..corpus import (
        LONE_SURROGATE,
        PARQUET_SUFFIXES,
        SUPPORTED_SUFFIXES,
        has_lone_surrogate,
        open_lines,
    )

    try:
        fs, files = expand_inputs(specs, SUPPORTED_SUFFIXES)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"{what}: {e}") from None
    records = []
    for file in files:
        if file.path.endswith(PARQUET_SUFFIXES):
            with fs.open_input_file(file.path) as f:
                records += [(file.key, i + 1, r) for i, r in enumerate(pq.read_table(f).to_pylist())]
            continue
        with open_lines(fs, file.path) as lines:
            for number, line in lines:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{what}: {file.key}, line {number}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{what}: {file.key}, line {number}: expected a JSON object, got "
                                     f"{type(record).__name__}")
                if has_lone_surrogate(line, record):
                    raise ValueError(f"{what}: {file.key}, line {number}: {LONE_SURROGATE}")
                records.append((file.key, number, record))
    if not records:
        raise ValueError(f"{what}: no rows in {', '.join(specs)}")
    return records


def load_reference_texts(refs: References, what: str) -> list[str]:
    texts = []
    fields = refs.fields
    for file, line, record in read_records(refs.paths, what):
        if fields is None:
            fields = ["text"] if "text" in record else ["Text"]
        parts = [record.get(f) for f in fields]
        bad = [f for f, v in zip(fields, parts) if not isinstance(v, str) or not v.strip()]
        if bad:
            raise ValueError(f"{what}: {file}, line {line}: field {bad[0]!r} is missing or not a non-empty string "
                             f"(fields: {', '.join(record) or 'none'})")
        texts.append("\n".join(parts))
    return texts
