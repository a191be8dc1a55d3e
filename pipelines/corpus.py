"""Corpus input through Ray Data: JSONL, JSONL.GZ and Parquet from files, directories, globs and URIs.

Every row keeps all of its input fields and gains provenance columns. A row that cannot be used (bad JSON, not an
object, missing / non-string / empty text) is not dropped: it flows on with ``_quarantine_reason`` set and its text
null, so that the stage can write it to ``quarantine.jsonl`` with file, line and reason.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import zlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
import pyarrow.parquet as pq
import ray
from ray.data.datasource import FileBasedDatasource

from .paths import InputFile, expand_inputs
from .resources import retry_limits_allowed
from .rundir import write_quarantine_part

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
# Limits on one JSONL row (docs/recipes.md, "Input limits"); a row past one is quarantined, never parsed.
# Nesting: Arrow's C++ JSON reader crashes its process somewhere between 10^4 and 10^5 levels and Python's json
# recurses past ~10^3, while real documents nest a few levels.
MAX_JSON_DEPTH = 64
# Length: a line is held in memory whole; a file without newlines must not be.
MAX_LINE_BYTES = 16 * 1024**2
READ_CHUNK_BYTES = 1 << 20  # at most MAX_LINE_BYTES: only a line crossing chunks can be over-long
BLOCK_BYTES = 64 * 1024**2  # a block is cut early when its lines reach this, whatever ROWS_PER_BLOCK says
# A read task that dies (not raises: a crashed worker process) is retried this often, then the stage fails; Ray
# Data's default, unbounded retries, would turn a row that crashes a parser into a run that never ends.
READ_TASK_RETRIES = 3
# CPUs a read task asks for beside model-holding actor pools: parsing is light (Arrow's C++ JSON reader), and a
# pool that held every CPU would leave no room for a read task and stall the pipeline.
READ_TASK_CPUS = 0.25
# CPUs of the task that cuts a read's output into small blocks (``rows_per_block``): Ray Data's default, which its
# streaming repartition keeps. What a stage reading that way leaves free beside its actor pool:
SPLIT_TASK_CPUS = 1.0


def reading_cpus(cluster_cpus: int) -> tuple[float, bool]:
    """(CPUs a stage leaves for reading beside its actor pool, whether to cut the read into small blocks). With one
    CPU there is room for one actor only, which needs no cutting (and could not leave a CPU for it)."""
    if cluster_cpus < 2:
        return READ_TASK_CPUS, False
    return READ_TASK_CPUS + SPLIT_TASK_CPUS, True


@dataclass(frozen=True)
class CorpusSpec:
    paths: list[str]
    text_field: str = "text"
    id_field: str = "id"
    # What the text field must hold: "text" (a non-blank string) or "messages" (a conversation: a list of
    # {role, content} turns ending with the assistant's; finetune's chat samples).
    text_kind: str = "text"


class CorpusDatasource(FileBasedDatasource):
    """Streams rows out of each file in blocks of ``ROWS_PER_BLOCK``, validating the text field as it goes."""

    _FILE_EXTENSIONS = [s.lstrip(".") for s in SUPPORTED_SUFFIXES]

    def __init__(self, files: list[InputFile], filesystem, text_field: str, id_field: str,
                 wanted_rows: ray.ObjectRef | None = None, wanted_files: set[int] | None = None,
                 quarantine_dir: str | None = None, text_kind: str = "text"):
        """``wanted_rows``: optionally, a reference to {file index: table of ``line`` numbers and columns to attach},
        with ``wanted_files`` its keys; only those files are opened and only those rows parsed, and they come back
        with the attached columns (the select stage's writing pass reads back the rows it chose, with their scores).
        Files keep their index in ``files`` either way.

        ``quarantine_dir``: when set, malformed rows do not flow on; each read task writes its file's to
        ``quarantine_dir/<file index>.jsonl`` (rewritten whole if the task is retried) and yields only usable rows."""
        self._file_keys = {f.path: (i, f.key) for i, f in enumerate(files)}
        if wanted_files is not None:
            files = [f for i, f in enumerate(files) if i in wanted_files]
        super().__init__([f.path for f in files], filesystem=filesystem)
        self._text_field = text_field
        self._id_field = id_field
        self._text_kind = text_kind
        self._wanted_rows = wanted_rows
        self._quarantine_dir = quarantine_dir

    def _open_input_source(self, filesystem, path: str, **open_args):
        if path.endswith(PARQUET_SUFFIXES):  # Parquet needs random access, not a stream
            return filesystem.open_input_file(path)
        if path.endswith(".gz"):
            return GunzipStream(filesystem.open_input_stream(path, compression=None))
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        file_index, key = self._lookup(path)
        blocks = _FileBlocks(file_index, key, self._text_field, self._id_field, self._text_kind)
        if self._wanted_rows is None:
            stream = blocks.parquet(f) if path.endswith(PARQUET_SUFFIXES) else blocks.jsonl(f)
            if self._quarantine_dir is None:
                yield from stream
            else:
                yield from self._set_aside_malformed(stream, file_index)
            return
        wanted = ray.get(self._wanted_rows).get(file_index)
        if wanted is None:
            return
        lines = wanted.column("line").to_numpy()
        attached = [c for c in wanted.column_names if c != "line"]
        for block in blocks.parquet(f, lines) if path.endswith(PARQUET_SUFFIXES) else blocks.jsonl(f, lines):
            position = pc.index_in(block.column(SOURCE_LINE), value_set=wanted.column("line"))
            for name in attached:
                block = block.append_column(name, wanted.column(name).take(position))
            yield block

    def _set_aside_malformed(self, stream: Iterator[pa.Table], file_index: int) -> Iterator[pa.Table]:
        bad: list[dict] = []
        for block in stream:
            valid = pc.is_null(block.column(QUARANTINE_REASON))
            rejected = block.filter(pc.invert(valid)).select([SOURCE_FILE, SOURCE_LINE, QUARANTINE_REASON, RAW])
            bad += [{"file": r[SOURCE_FILE], "line": r[SOURCE_LINE], "reason": r[QUARANTINE_REASON],
                     "raw": r[RAW]} for r in rejected.to_pylist()]
            yield block.filter(valid)
        write_quarantine_part(self._quarantine_dir, f"{file_index:06d}.jsonl", bad)

    def _lookup(self, path: str) -> tuple[int, str]:
        if path in self._file_keys:
            return self._file_keys[path]
        for known, value in self._file_keys.items():  # Ray may hand back the path with a scheme prefix
            if path.endswith(known) or known.endswith(path):
                return value
        raise KeyError(path)


class _FileBlocks:
    """Turns the rows of one file into blocks with provenance columns.

    The fast path hands a whole block to Arrow's C++ JSON reader and validates the text field with vectorised kernels.
    A block Arrow refuses (a malformed line, a field whose type changes between rows, invalid UTF-8, a text field that
    is not a string) is parsed again line by line in Python, which can say which line is wrong and why.
    """

    def __init__(self, file_index: int, key: str, text_field: str, id_field: str, text_kind: str = "text"):
        self.file_index, self.key = file_index, key
        self.text_field, self.id_field, self.text_kind = text_field, id_field, text_kind

    def jsonl(self, f, wanted=None) -> Iterator[pa.Table]:
        wanted = None if wanted is None else set(wanted.tolist())
        lines: list[bytes | None] = []  # None: a line set aside before parsing (its reason in ``problems``)
        numbers: list[int] = []
        problems: dict[int, tuple[str, str | None]] = {}  # position in the block -> (reason, raw preview)
        size = 0
        for number, (line, problem) in enumerate(_iter_lines(f), 1):
            if wanted is not None and number not in wanted:
                continue  # skipped before any parsing: the select stage's writing pass parses only the rows it keeps
            if problem is None:
                if not line.strip():
                    continue  # blank lines are not rows
                size += len(line)
                # Inline, the cheap bound on the nesting depth: most lines never pay for the exact count.
                if line.count(b"[") + line.count(b"{") > MAX_JSON_DEPTH:
                    problem = _nesting_problem(line)
            if problem is not None:
                problems[len(lines)] = problem
                line = None
            lines.append(line)
            numbers.append(number)
            if len(lines) >= ROWS_PER_BLOCK or size >= BLOCK_BYTES:
                yield self._jsonl_block(lines, numbers, problems)
                lines, numbers, problems, size = [], [], {}, 0
        if lines:
            yield self._jsonl_block(lines, numbers, problems)

    def _jsonl_block(self, lines: list[bytes | None], numbers: list[int],
                     problems: dict[int, tuple[str, str | None]]) -> pa.Table:
        if not problems:
            data = b"\n".join(lines)
            try:
                table = pajson.read_json(io.BytesIO(data), read_options=pajson.ReadOptions(
                    use_threads=False, block_size=len(data) + 1))
                table.validate(full=True)  # Arrow's JSON reader does not check UTF-8 itself
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                table = None
            if table is not None and table.num_rows == len(lines):
                block = self._finish(table, numbers, lambda i: lines[i][:RAW_PREVIEW_CHARS].decode("utf-8", "replace"))
                if block is not None:
                    return block
        builder = _BlockBuilder(self.file_index, self.key, self.text_field, self.id_field, self.text_kind)
        for i, (number, line) in enumerate(zip(numbers, lines)):
            if i in problems:
                builder.add(number, None, *problems[i])
            else:
                builder.add(number, *parse_json_line(line))
        return builder.flush()

    def parquet(self, f, wanted=None) -> Iterator[pa.Table]:
        """The "line" of a Parquet row is its 1-based position in the file. A file that cannot be read (corrupt,
        truncated, not Parquet) yields the rows before the break and one quarantined row where it broke."""
        first = 1
        try:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=ROWS_PER_BLOCK):
                positions = np.arange(first, first + batch.num_rows)
                first += batch.num_rows
                if wanted is not None:
                    keep = np.isin(positions, wanted)
                    positions, batch = positions[keep], batch.filter(pa.array(keep))
                if batch.num_rows:
                    yield self._parquet_block(pa.Table.from_batches([batch]), positions.tolist())
        except (OSError, pa.ArrowException) as e:
            if wanted is None:  # the read-back of chosen rows never chooses the broken row
                builder = _BlockBuilder(self.file_index, self.key, self.text_field, self.id_field, self.text_kind)
                builder.add(first, None, f"unreadable Parquet from row {first} on: {e}", None)
                yield builder.flush()

    def _parquet_block(self, table: pa.Table, positions: list[int]) -> pa.Table:
        block = self._finish(table, positions, lambda i: json.dumps(
            table.slice(i, 1).to_pylist()[0], ensure_ascii=False, default=str)[:RAW_PREVIEW_CHARS])
        if block is None:
            builder = _BlockBuilder(self.file_index, self.key, self.text_field, self.id_field, self.text_kind)
            for position, record in zip(positions, table.to_pylist()):
                builder.add(position, record, None, None)
            block = builder.flush()
        return block

    def _finish(self, table: pa.Table, numbers: list[int], raw_line) -> pa.Table | None:
        """Validate the text field and add ids and provenance, all vectorised; None when the text or id column has a
        type only the row-by-row path can describe."""
        n = table.num_rows
        if self.text_kind != "text":
            return None  # a conversation is checked turn by turn, row by row
        table = table.combine_chunks()
        if self.text_field in table.column_names:
            text = table.column(self.text_field)
            if pa.types.is_large_string(text.type) or pa.types.is_null(text.type):
                text = text.cast(pa.string())
            if not pa.types.is_string(text.type):
                return None
        else:
            text = pa.chunked_array([pa.nulls(n, pa.string())])
        missing = pc.is_null(text)
        blank = pc.or_(pc.equal(pc.utf8_length(text), 0), pc.utf8_is_space(text))
        null_reason = pa.scalar(None, pa.string())
        reasons = pc.if_else(missing, pa.scalar(f"missing text field {self.text_field!r}"),
                             pc.if_else(blank, pa.scalar(f"empty text in field {self.text_field!r}"), null_reason))
        valid = pc.is_null(reasons)

        ids = table.column(self.id_field) if self.id_field in table.column_names else None
        if ids is not None:
            if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)
                    or pa.types.is_integer(ids.type) or pa.types.is_null(ids.type)):
                return None
            ids = ids.cast(pa.string())
        if ids is None or ids.null_count:
            derived = pa.array([f"{self.key}:{number}" for number in numbers], pa.string())
            ids = derived if ids is None else pc.coalesce(ids, derived)

        bad_rows = np.flatnonzero(~valid.to_numpy(zero_copy_only=False))
        raw = [None] * n
        for i in bad_rows.tolist():
            raw[i] = raw_line(i)

        def put(t: pa.Table, name: str, column) -> pa.Table:
            if name in t.column_names:
                return t.set_column(t.column_names.index(name), name, column)
            return t.append_column(name, column)

        table = put(table, self.id_field, ids)
        table = put(table, self.text_field, pc.if_else(valid, text, null_reason))
        line_numbers = pa.array(numbers, pa.int64())
        # A stage's output read as a corpus (retrieve on select's rows) already has provenance columns: this read's
        # own replace them, as the row-by-row path does (the row id stays the stable link to the original).
        table = put(table, SOURCE_FILE, pa.array([self.key] * n, pa.string()))
        table = put(table, SOURCE_LINE, line_numbers)
        table = put(table, ORDER, pc.add(line_numbers, self.file_index << 32))
        table = put(table, QUARANTINE_REASON, reasons)
        return put(table, RAW, pa.array(raw, pa.string()))


def parse_json_line(raw_line: bytes) -> tuple[Any, str | None, str | None]:
    """(record, reason, raw) for one non-blank JSONL line: the record when it is a usable JSON object, else None and
    why (invalid UTF-8 or JSON, nested too deep, a lone surrogate, not an object)."""
    try:
        text = raw_line.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"invalid UTF-8: {e.reason} at byte {e.start}", raw_line[:RAW_PREVIEW_CHARS].decode("utf-8", "replace")
    problem = _nesting_problem(raw_line)
    if problem is not None:
        return None, *problem
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON: {e.msg} at column {e.colno}", text[:RAW_PREVIEW_CHARS]
    if not isinstance(record, dict):
        return None, f"not a JSON object (got {type(record).__name__})", text[:RAW_PREVIEW_CHARS]
    if has_lone_surrogate(raw_line, record):
        return None, LONE_SURROGATE, text[:RAW_PREVIEW_CHARS]
    return record, None, text


LONE_SURROGATE = "lone UTF-16 surrogate escape (e.g. \\ud800): not valid Unicode"


def has_lone_surrogate(raw_line: bytes, record: Any) -> bool:
    """Whether a parsed JSON line holds half of a UTF-16 pair. JSON may escape one ("\\ud800"); Python decodes it
    into a string that no UTF-8 writer (Arrow, Parquet, a tokenizer) accepts, so such a row is refused everywhere
    (the endpoint refuses it too) rather than mangled. Only lines holding such an escape are walked."""
    return bool(_SURROGATE_ESCAPE.search(raw_line)) and _has_lone_surrogate(record)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string, escapes included (unrolled: fast)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def _nesting_problem(line: bytes) -> tuple[str, str] | None:
    """(reason, raw preview) when a JSON line nests deeper than MAX_JSON_DEPTH; counted without parsing. The count of
    opening brackets bounds the depth, so only lines with many of them are scanned (outside strings)."""
    if line.count(b"[") + line.count(b"{") <= MAX_JSON_DEPTH:
        return None
    depth = deepest = 0
    for bracket in _JSON_STRING.sub(b'""', line).translate(None, _NOT_BRACKETS):
        depth += 1 if bracket in b"[{" else -1
        deepest = max(deepest, depth)
    if deepest <= MAX_JSON_DEPTH:
        return None
    return (f"JSON nested {deepest} levels deep (the limit is {MAX_JSON_DEPTH})",
            line[:RAW_PREVIEW_CHARS].decode("utf-8", "replace"))


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


class GunzipStream:
    """A gzip file undone as its bytes stream in. Arrow's own decompressing stream, on finding a file truncated, drops
    the last megabyte it had decompressed; this one hands out every complete byte before the break and then raises
    OSError, as it does for a corrupt file. Several members one after another (as gzip and bgzip write them) are
    read in turn; no read returns more than ``size`` bytes, however well the input compresses."""

    CHUNK = 1 << 20

    def __init__(self, raw):
        self._raw = raw
        self._gzip = zlib.decompressobj(wbits=31)
        self._compressed = b""  # read from the file, not yet decompressed
        self._inside_member = False

    def read(self, size: int = -1) -> bytes:
        limit = size if size and size > 0 else self.CHUNK
        while True:
            data, self._compressed = self._compressed or self._raw.read(self.CHUNK), b""
            if not data:
                if self._inside_member:
                    raise OSError("truncated gzip: the file ends inside a compressed member")
                return b""
            try:
                out = self._gzip.decompress(data, limit)
            except zlib.error as e:
                raise OSError(f"corrupt gzip: {e}") from None
            self._compressed = self._gzip.unconsumed_tail
            self._inside_member = not self._gzip.eof
            if self._gzip.eof:  # a member ended: what follows is the next one
                self._compressed, self._gzip = self._gzip.unused_data, zlib.decompressobj(wbits=31)
            if out:
                return out

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> "GunzipStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_jsonl_stream(filesystem, path: str):
    """A JSONL or JSONL.GZ file as a stream of its (decompressed) bytes."""
    if path.endswith(".gz"):
        return GunzipStream(filesystem.open_input_stream(path, compression=None))
    return filesystem.open_input_stream(path, compression=None)


@contextlib.contextmanager
def open_lines(filesystem, path: str) -> Iterator[Iterator[tuple[int, bytes]]]:
    """(line number, raw line) of a small JSONL/JSONL.GZ file (few-shots, references), streamed. A line over the
    limits or a file that breaks off raises ValueError naming the file and line."""
    with open_jsonl_stream(filesystem, path) as f:
        yield _lines_or_fail(f, path)


def _lines_or_fail(f, path: str) -> Iterator[tuple[int, bytes]]:
    for number, (line, problem) in enumerate(_iter_lines(f), 1):
        if problem is None:
            problem = _nesting_problem(line)
        if problem is not None:
            raise ValueError(f"{path}, line {number}: {problem[0]}")
        yield number, line


def _jsonl_records(f) -> Iterator[tuple[int, Any, str | None, str | None]]:
    """(line, record, reason, raw) for each non-blank line; blank lines are not rows."""
    for line_number, (raw_line, problem) in enumerate(_iter_lines(f), 1):
        if problem is not None:
            yield line_number, None, *problem
        elif raw_line.strip():
            yield line_number, *parse_json_line(raw_line)


def _iter_lines(f, chunk_size: int = READ_CHUNK_BYTES) -> Iterator[tuple[bytes | None, tuple[str, None] | None]]:
    """The lines of a stream as (line, None), or (None, (reason, None)) for a line that cannot be had: one longer
    than MAX_LINE_BYTES (dropped as it streams, never held whole), or the place where the stream breaks off (a
    truncated or corrupt gzip); the lines before a break are all yielded, and nothing after it."""
    pending: list[bytes] = []  # the line that goes on past the last chunk, in pieces (no quadratic joins)
    pending_bytes, overlong = 0, False
    too_long = (f"line longer than {MAX_LINE_BYTES:,} bytes (the limit)", None)
    while True:
        try:
            chunk = f.read(chunk_size)
        except OSError as e:
            yield None, (f"the file breaks off here ({e}); the lines before were read", None)
            return
        if not chunk:
            break
        parts = chunk.split(b"\n")
        if len(parts) == 1:  # no line ends in this chunk
            if not overlong:
                pending.append(chunk)
                pending_bytes += len(chunk)
                if pending_bytes > MAX_LINE_BYTES:
                    pending, pending_bytes, overlong = [], 0, True
            continue
        if overlong:
            yield None, too_long
        else:
            first = b"".join(pending) + parts[0] if pending else parts[0]
            yield (None, too_long) if len(first) > MAX_LINE_BYTES else (first, None)
        for line in parts[1:-1]:
            yield line, None
        pending, pending_bytes, overlong = [parts[-1]], len(parts[-1]), False
    if overlong:
        yield None, too_long
    elif pending_bytes:
        yield b"".join(pending), None


def _parquet_records(f) -> Iterator[tuple[int, Any, str | None, str | None]]:
    """Rows of a Parquet file; the "line" of a row is its 1-based position in the file. A file that breaks off ends
    with one record saying where."""
    row_number = 0
    try:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=ROWS_PER_BLOCK):
            for record in batch.to_pylist():
                row_number += 1
                yield row_number, record, None, None
    except (OSError, pa.ArrowException) as e:
        yield row_number + 1, None, f"unreadable Parquet from row {row_number + 1} on: {e}", None


ROLES = ("system", "user", "assistant")


def messages_problem(record: dict, field: str) -> str | None:
    """Why ``record`` holds no usable conversation in ``field`` (turns of ``role`` and ``content``, a user's turn
    among them, the assistant's last), or None when it does."""
    turns = record.get(field)
    if turns is None:
        return f"missing messages field {field!r}"
    if not isinstance(turns, list) or not turns:
        return f"messages field {field!r} is not a list of turns (got {type(turns).__name__})"
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            return f"{field}[{k}]: not a turn with a role ({', '.join(ROLES)}) and a string content"
    if turns[-1]["role"] != "assistant" or not turns[-1]["content"].strip():
        return f"{field}: the last turn is not a non-empty assistant's turn (the response to learn)"
    if not any(t["role"] == "user" for t in turns[:-1]):
        return f"{field}: no user turn before the assistant's"
    return None


def text_problem(record: dict, text_field: str, text_kind: str = "text") -> str | None:
    """Why ``record`` has no usable text (or conversation, for ``text_kind`` messages), or None when it has."""
    if text_kind == "messages":
        return messages_problem(record, text_field)
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

    def __init__(self, file_index: int, key: str, text_field: str, id_field: str, text_kind: str = "text"):
        self.file_index, self.key = file_index, key
        self.text_field, self.id_field, self.text_kind = text_field, id_field, text_kind
        self._reset()

    def _reset(self):
        self.records: list[dict] = []
        self.meta: list[tuple[int, str | None, str | None]] = []

    @property
    def size(self) -> int:
        return len(self.records)

    def add(self, line: int, record: dict | None, reason: str | None, raw: str | None) -> None:
        if record is not None and reason is None:
            reason = text_problem(record, self.text_field, self.text_kind)
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


def read_corpus(spec: CorpusSpec, num_cpus: float | None = None, only_rows: pa.Table | None = None,
                quarantine_dir: str | None = None, rows_per_block: int | None = None) -> ray.data.Dataset:
    """The corpus as a Ray Data dataset; ``num_cpus`` per read task.

    ``only_rows``: read back just the rows whose ``_order`` (as an earlier read numbered them) is in this table,
    parsing nothing else, and attach its other columns to them. ``quarantine_dir``: malformed rows are written there
    by the read tasks instead of flowing on. ``rows_per_block``: blocks of at most this many rows, for costly
    per-row work downstream (Ray Data hands whole blocks to actors, and a read task's output is merged into blocks
    of up to 128 MiB: a small file would otherwise be one block, worked on by one actor while the others wait).
    """
    filesystem, files = expand_inputs(spec.paths, SUPPORTED_SUFFIXES)
    if only_rows is None:
        datasource = CorpusDatasource(files, filesystem, spec.text_field, spec.id_field,
                                      quarantine_dir=quarantine_dir, text_kind=spec.text_kind)
        n_files = len(files)
    else:
        order = only_rows.column(ORDER).to_numpy()
        by_position = only_rows.drop_columns([ORDER]).append_column("line", pa.array(order & 0xFFFFFFFF))
        file_index = order >> 32
        wanted = {int(i): by_position.filter(pa.array(file_index == i)).sort_by("line")
                  for i in np.unique(file_index)}
        if not wanted:
            return ray.data.from_items([])
        datasource = CorpusDatasource(files, filesystem, spec.text_field, spec.id_field, ray.put(wanted), set(wanted),
                                      text_kind=spec.text_kind)
        n_files = len(wanted)
    # One read task per file: the datasource already streams each file in blocks, and Ray Data's splitting of read
    # outputs into many smaller blocks (to reach its default parallelism) only adds per-block costs downstream
    # (and one output file per block when writing).
    with retry_limits_allowed():
        dataset = ray.data.read_datasource(datasource, num_cpus=num_cpus, override_num_blocks=n_files,
                                           ray_remote_args={"max_retries": READ_TASK_RETRIES})
    if rows_per_block is None:
        return dataset
    # Ray Data's streaming repartition cuts the blocks; it fuses with a map before it into one task, which keeps the
    # repartition's resources (SPLIT_TASK_CPUS): stages that read this way leave that much free beside their actor
    # pools (see reading_cpus), or the task would never be scheduled.
    with retry_limits_allowed():
        cut = dataset.map_batches(_unchanged, batch_size=rows_per_block, batch_format="pyarrow",
                                  max_retries=READ_TASK_RETRIES)
    return cut.repartition(target_num_rows_per_block=rows_per_block)


def _unchanged(batch: pa.Table) -> pa.Table:
    return batch


def estimate_rows(paths: list[str]) -> int:
    """Rows in a file set, estimated from file sizes and the rows per byte of the first file (its Parquet footer, or
    the lines in the head of a JSONL file): enough to size samples and blocks without reading everything."""
    fs, files = expand_inputs(paths, SUPPORTED_SUFFIXES)
    sizes = [fs.get_file_info(f.path).size or 0 for f in files]
    first = files[0].path
    if first.endswith(PARQUET_SUFFIXES):
        with fs.open_input_file(first) as f:
            rows = pq.ParquetFile(f).metadata.num_rows
        return int(rows * sum(sizes) / max(sizes[0], 1))
    with fs.open_input_stream(first, compression=None) as raw:
        head = raw.read(1 << 22)
    consumed = len(head)
    if first.endswith(".gz"):  # lines per *compressed* byte, from a partial decompression of the head
        try:
            head = zlib.decompressobj(wbits=31).decompress(head)
        except zlib.error:  # a corrupt file: its read quarantines it; the estimate only sizes a sample
            pass
    lines = max(head.count(b"\n"), 1)
    return int(sum(sizes) * lines / max(consumed, 1))


def first_record(paths: list[str]) -> dict | None:
    """The first usable record of a file set (in file order), read on the driver: enough to tell a file's format."""
    filesystem, files = expand_inputs(paths, SUPPORTED_SUFFIXES)
    for f in files:
        parquet = f.path.endswith(PARQUET_SUFFIXES)
        handle = filesystem.open_input_file(f.path) if parquet else open_jsonl_stream(filesystem, f.path)
        with handle:
            for _, record, reason, _ in (_parquet_records(handle) if parquet else _jsonl_records(handle)):
                if reason is None:
                    return record
    return None


def read_texts_locally(spec: CorpusSpec, limit: int | None = None) -> tuple[list[str], list[dict]]:
    """Texts of a small file set (the in-domain examples) read on the driver, plus its quarantine records."""
    filesystem, files = expand_inputs(spec.paths, SUPPORTED_SUFFIXES)
    texts, bad = [], []
    for i, f in enumerate(files):
        if f.path.endswith(PARQUET_SUFFIXES):
            handle = filesystem.open_input_file(f.path)
            records = _parquet_records(handle)
        else:
            handle = open_jsonl_stream(filesystem, f.path)
            records = _jsonl_records(handle)
        with handle:
            for line, record, reason, raw in records:
                if reason is None:
                    reason = text_problem(record, spec.text_field, spec.text_kind)
                    raw = None if reason is None else json.dumps(record, ensure_ascii=False, default=str)[:RAW_PREVIEW_CHARS]
                if reason is None:
                    texts.append(record[spec.text_field])
                else:
                    bad.append({"file": f.key, "line": line, "reason": reason, "raw": raw})
                if limit is not None and len(texts) >= limit:
                    return texts, bad
    return texts, bad


@contextlib.contextmanager
def without_operator_reservations():
    """Ray Data reserves a share of the cluster for each operator of a pipeline, so that its stages do not starve
    each other. Two passes lose by it: a read-back pass (read only the chosen rows, then write) fuses into one
    operator, which is then held to half of the CPUs (measured in select: 2.9 s -> 1.8 s for 2M documents on 2 CPUs
    without); and an engine actor pool beside light read and write tasks gets too small a share to grow to the
    actors that fit (generate on 2 CPUs: one engine actor instead of two)."""
    context = ray.data.DataContext.get_current()
    previous = context.op_resource_reservation_enabled
    context.op_resource_reservation_enabled = False
    try:
        yield
    finally:
        context.op_resource_reservation_enabled = previous


def column_total(dataset: ray.data.Dataset, column: str) -> int:
    """The sum of an integer column: a map and a take, not ``Dataset.sum``, whose hash aggregation starts aggregator
    actors (seconds on a small machine, for one number)."""
    def block_total(batch: pa.Table) -> pa.Table:
        return pa.table({"total": [int(pc.sum(batch.column(column)).as_py() or 0)]})

    return sum(row["total"] for row in dataset.map_batches(block_total, batch_format="pyarrow",
                                                           batch_size=None).take_all())


def drop_internal_columns(batch: pa.Table) -> pa.Table:
    """Output rows keep their provenance (``_source_file``, ``_source_line``), not the reader's bookkeeping."""
    return batch.drop_columns([c for c in (ORDER, QUARANTINE_REASON, RAW) if c in batch.column_names])
