"""Corpus input through Ray Data: JSONL, JSONL.GZ and Parquet from files, directories, globs and URIs.

Every row keeps all of its input fields and gains provenance columns. A row that cannot be used (bad JSON, not an
object, missing / non-string / empty text) is not dropped: it flows on with ``_quarantine_reason`` set and its text
null, so that the stage can write it to ``quarantine.jsonl`` with file, line and reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.datasource import FileBasedDatasource

from .paths import InputFile, expand_inputs

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES

# Provenance columns every stage keeps (names start with "_" so they never clash with a corpus field).
SOURCE_FILE = "_source_file"
SOURCE_LINE = "_source_line"
ORDER = "_order"  # (file index << 32) | line: a global, stable order for deterministic tie-breaks
QUARANTINE_REASON = "_quarantine_reason"
RAW = "_raw"  # the offending line, truncated, on quarantined rows only
PROVENANCE_COLUMNS = (SOURCE_FILE, SOURCE_LINE, ORDER, QUARANTINE_REASON, RAW)
RAW_PREVIEW_CHARS = 500
ROWS_PER_BLOCK = 4096


@dataclass(frozen=True)
class CorpusSpec:
    paths: list[str]
    text_field: str = "text"
    id_field: str = "id"


class CorpusDatasource(FileBasedDatasource):
    """Streams rows out of each file in blocks of ``ROWS_PER_BLOCK``, validating the text field as it goes."""

    _FILE_EXTENSIONS = [s.lstrip(".") for s in SUPPORTED_SUFFIXES]

    def __init__(self, files: list[InputFile], filesystem, text_field: str, id_field: str):
        super().__init__([f.path for f in files], filesystem=filesystem)
        self._file_keys = {f.path: (i, f.key) for i, f in enumerate(files)}
        self._text_field = text_field
        self._id_field = id_field

    def _open_input_source(self, filesystem, path: str, **open_args):
        if path.endswith(PARQUET_SUFFIXES):  # Parquet needs random access, not a stream
            return filesystem.open_input_file(path)
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        file_index, key = self._lookup(path)
        builder = _BlockBuilder(file_index, key, self._text_field, self._id_field)
        records = _parquet_records(f, self._text_field) if path.endswith(PARQUET_SUFFIXES) else _jsonl_records(f)
        for line_number, record, reason, raw in records:
            builder.add(line_number, record, reason, raw)
            if builder.size >= ROWS_PER_BLOCK:
                yield builder.flush()
        if builder.size:
            yield builder.flush()

    def _lookup(self, path: str) -> tuple[int, str]:
        if path in self._file_keys:
            return self._file_keys[path]
        for known, value in self._file_keys.items():  # Ray may hand back the path with a scheme prefix
            if path.endswith(known) or known.endswith(path):
                return value
        raise KeyError(path)


def _jsonl_records(f) -> Iterator[tuple[int, Any, str | None, str | None]]:
    """(line, record, reason, raw) for each non-blank line; blank lines are not rows."""
    line_number = 0
    for raw_line in _iter_lines(f):
        line_number += 1
        if not raw_line.strip():
            continue
        try:
            text = raw_line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield line_number, None, f"invalid UTF-8: {e.reason} at byte {e.start}", raw_line[:RAW_PREVIEW_CHARS].decode("utf-8", "replace")
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            yield line_number, None, f"invalid JSON: {e.msg} at column {e.colno}", text[:RAW_PREVIEW_CHARS]
            continue
        if not isinstance(record, dict):
            yield line_number, None, f"not a JSON object (got {type(record).__name__})", text[:RAW_PREVIEW_CHARS]
            continue
        yield line_number, record, None, text


def _iter_lines(f, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    pending = b""
    while True:
        chunk = f.read(chunk_size)
        if not chunk:
            break
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        yield from lines
    if pending:
        yield pending


def _parquet_records(f, text_field: str) -> Iterator[tuple[int, Any, str | None, str | None]]:
    """Rows of a Parquet file; the "line" of a row is its 1-based position in the file."""
    row_number = 0
    for batch in pq.ParquetFile(f).iter_batches(batch_size=ROWS_PER_BLOCK):
        for record in batch.to_pylist():
            row_number += 1
            yield row_number, record, None, None


def text_problem(record: dict, text_field: str) -> str | None:
    """Why ``record`` has no usable text, or None when it has."""
    if text_field not in record or record[text_field] is None:
        return f"missing text field {text_field!r}"
    value = record[text_field]
    if not isinstance(value, str):
        return f"text field {text_field!r} is not a string (got {type(value).__name__})"
    if not value.strip():
        return f"empty text in field {text_field!r}"
    return None


class _BlockBuilder:
    """Collects rows of one file and turns them into a pyarrow block with the union of their fields."""

    def __init__(self, file_index: int, key: str, text_field: str, id_field: str):
        self.file_index, self.key = file_index, key
        self.text_field, self.id_field = text_field, id_field
        self._reset()

    def _reset(self):
        self.records: list[dict] = []
        self.meta: list[tuple[int, str | None, str | None]] = []

    @property
    def size(self) -> int:
        return len(self.records)

    def add(self, line: int, record: dict | None, reason: str | None, raw: str | None) -> None:
        if record is not None and reason is None:
            reason = text_problem(record, self.text_field)
            if reason is not None:
                raw = json.dumps(record, ensure_ascii=False, default=str)[:RAW_PREVIEW_CHARS]
                record = None
            else:
                raw = None
        if record is None:
            record = {}
        given_id = record.get(self.id_field)
        record[self.id_field] = str(given_id) if given_id is not None else f"{self.key}:{line}"
        self.records.append(record)
        self.meta.append((line, reason, raw))

    def flush(self) -> pa.Table:
        columns: dict[str, list] = {}
        for record in self.records:
            for name in record:
                columns.setdefault(name, None)
        arrays = {name: _to_arrow([r.get(name) for r in self.records]) for name in columns}
        lines = [m[0] for m in self.meta]
        arrays[SOURCE_FILE] = pa.array([self.key] * len(lines), pa.string())
        arrays[SOURCE_LINE] = pa.array(lines, pa.int64())
        arrays[ORDER] = pa.array([(self.file_index << 32) | line for line in lines], pa.int64())
        arrays[QUARANTINE_REASON] = pa.array([m[1] for m in self.meta], pa.string())
        arrays[RAW] = pa.array([m[2] for m in self.meta], pa.string())
        if self.text_field not in arrays:
            arrays[self.text_field] = pa.nulls(len(lines), pa.string())
        self._reset()
        return pa.table(arrays)


def _to_arrow(values: list) -> pa.Array:
    """An Arrow column for ``values``; a field whose type varies between rows is kept as JSON text."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else json.dumps(v, ensure_ascii=False, default=str) for v in values],
                        pa.string())


def read_corpus(spec: CorpusSpec, num_cpus: float | None = None) -> ray.data.Dataset:
    """The corpus as a Ray Data dataset; ``num_cpus`` per read task (parsing is light next to model scoring)."""
    filesystem, files = expand_inputs(spec.paths, SUPPORTED_SUFFIXES)
    return ray.data.read_datasource(CorpusDatasource(files, filesystem, spec.text_field, spec.id_field),
                                    num_cpus=num_cpus)


def read_texts_locally(spec: CorpusSpec, limit: int | None = None) -> tuple[list[str], list[dict]]:
    """Texts of a small file set (the in-domain examples) read on the driver, plus its quarantine records."""
    filesystem, files = expand_inputs(spec.paths, SUPPORTED_SUFFIXES)
    texts, bad = [], []
    for i, f in enumerate(files):
        if f.path.endswith(PARQUET_SUFFIXES):
            handle = filesystem.open_input_file(f.path)
            records = _parquet_records(handle, spec.text_field)
        else:
            compression = "gzip" if f.path.endswith(".gz") else None
            handle = filesystem.open_input_stream(f.path, compression=compression)
            records = _jsonl_records(handle)
        with handle:
            for line, record, reason, raw in records:
                if reason is None:
                    reason = text_problem(record, spec.text_field)
                    raw = None if reason is None else json.dumps(record, ensure_ascii=False, default=str)[:RAW_PREVIEW_CHARS]
                if reason is None:
                    texts.append(record[spec.text_field])
                else:
                    bad.append({"file": f.key, "line": line, "reason": reason, "raw": raw})
                if limit is not None and len(texts) >= limit:
                    return texts, bad
    return texts, bad
