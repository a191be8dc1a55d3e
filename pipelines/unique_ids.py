"""Unique row ids in a stage's output (the run-directory contract: ids are given, or FILE:LINE, and unique).

Inputs are free to repeat an id (two shards both numbered from 0, a file appended to itself). The rule, applied to
what a stage wrote:

- Rows that come from the same input row share its id on purpose (the ``n`` completions of one prompt); ids are
  compared across *input rows*, known by their provenance (``_source_file`` and ``_source_line``, else ``_order``;
  a folder without either counts each output row as its own).
- Of the input rows sharing an id, the first in input order (file, then line) keeps it; the k-th becomes
  ``ID#k`` (k = 2, 3, ...; the next free k when ``ID#k`` is taken already).

The count of renamed rows goes in the stage's report as ``ids_made_unique``. Only files holding a renamed row are
rewritten, so a run without duplicates reads two columns and writes nothing.
"""

from __future__ import annotations

import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import paths
from .corpus import ORDER, SOURCE_FILE, SOURCE_LINE

_FILE, _ROW = "__file", "__row"


def make_ids_unique(folders: list[str], id_field: str) -> int:
    """Apply the rule to the Parquet files of ``folders`` (e.g. ``data`` and ``dropped``: ids are unique across
    both); returns the number of rows renamed."""
    files = [(fs, path) for folder in folders for fs, path in _parquet_files(folder)]
    listing = _ids_and_sources(files, id_field)
    if listing is None:
        return 0
    renames = _renames(listing)  # (file, row) -> new id
    for file_index, rows in _by_file(renames).items():
        fs, path = files[file_index]
        _rewrite_ids(fs, path, id_field, rows)
    return len(renames)


def _parquet_files(folder: str) -> list[tuple[pafs.FileSystem, str]]:
    fs, root = paths.resolve(folder)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return [(fs, i.path) for i in sorted(infos, key=lambda i: i.path)
            if i.type == pafs.FileType.File and i.path.endswith(".parquet")
            and not posixpath.basename(i.path).startswith((".", "_"))]


def _ids_and_sources(files, id_field: str) -> pa.Table | None:
    """One table of every output row: id, where it came from (``source``: one string per input row) and where it is
    (file index, row number)."""
    parts = []
    for index, (fs, path) in enumerate(files):
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            names = set(parquet.schema_arrow.names)
            if id_field not in names:
                return None  # not a table of rows with ids (nothing to make unique)
            wanted = [c for c in (SOURCE_FILE, SOURCE_LINE) if c in names] if SOURCE_LINE in names else (
                [ORDER] if ORDER in names else [])
            table = parquet.read(columns=[id_field, *wanted])
        n = table.num_rows
        if SOURCE_LINE in wanted:
            source = pc.binary_join_element_wise(
                table.column(SOURCE_FILE).cast(pa.string()) if SOURCE_FILE in wanted else pa.nulls(n, pa.string()),
                table.column(SOURCE_LINE).cast(pa.string()), "\x00")
        elif wanted:
            source = table.column(ORDER).cast(pa.string())
        else:  # each output row is its own source
            source = pa.array([f"{index}\x00{i}" for i in range(n)], pa.string())
        parts.append(pa.table({"id": table.column(id_field).cast(pa.string()), "source": source,
                               _FILE: pa.array(np.full(n, index, np.int32)), _ROW: pa.array(np.arange(n))}))
    return pa.concat_tables(parts) if parts else None


def _renames(listing: pa.Table) -> dict[tuple[int, int], str]:
    """(file, row) -> new id for every row of a non-first input row sharing an id."""
    # Rows whose id occurs more than once, found by counting dictionary codes (Acero's group_by would do it too, at
    # tens of MB of thread-pool memory for a few thousand rows); only those rows are looked at one by one.
    ids = listing.column("id").combine_chunks().dictionary_encode()
    codes = ids.indices.to_numpy(zero_copy_only=False)
    repeated = np.bincount(codes, minlength=len(ids.dictionary))[codes] > 1
    if not repeated.any():
        return {}
    involved = listing.filter(pa.array(repeated))
    groups = {id_: sources for id_, sources in _sources_in_order(involved).items() if len(sources) > 1}
    if not groups:
        return {}
    taken = set(ids.dictionary.to_pylist())
    new_id_of: dict[tuple[str, str], str] = {}
    for id_, group in groups.items():
        k = 1
        for source in group[1:]:
            k += 1
            while f"{id_}#{k}" in taken:
                k += 1
            new_id_of[(id_, source)] = f"{id_}#{k}"
            taken.add(new_id_of[(id_, source)])
    return {(f, r): new_id_of[(i, s)] for i, s, f, r in zip(*(involved.column(c).to_pylist()
                                                              for c in ("id", "source", _FILE, _ROW)))
            if (i, s) in new_id_of}


def _sources_in_order(involved: pa.Table) -> dict[str, list[str]]:
    """Each shared id's distinct sources in input order (file, then line as a number)."""
    groups: dict[str, set[str]] = {}
    for id_, source in zip(involved.column("id").to_pylist(), involved.column("source").to_pylist()):
        groups.setdefault(id_, set()).add(source)
    return {id_: sorted(sources, key=_input_order) for id_, sources in groups.items()}


def _input_order(source: str) -> tuple:
    head, _, tail = source.rpartition("\x00")
    return (head, int(tail)) if tail.lstrip("-").isdigit() else (head, 0, tail)


def _by_file(renames: dict[tuple[int, int], str]) -> dict[int, dict[int, str]]:
    out: dict[int, dict[int, str]] = {}
    for (file_index, row), new_id in renames.items():
        out.setdefault(file_index, {})[row] = new_id
    return out


def _rewrite_ids(fs: pafs.FileSystem, path: str, id_field: str, rows: dict[int, str]) -> None:
    """Replace the ids of ``rows`` in one Parquet file (written beside it, then moved over it)."""
    with fs.open_input_file(path) as f:
        table = pq.read_table(f)
    ids = table.column(id_field).cast(pa.string()).to_pylist()
    for row, new_id in rows.items():
        ids[row] = new_id
    table = table.set_column(table.column_names.index(id_field), id_field, pa.array(ids, pa.string()))
    folder, name = posixpath.split(path)
    temporary = posixpath.join(folder, f".renaming-{name}")  # hidden: readers skip it if a crash leaves it
    with fs.open_output_stream(temporary) as out:
        pq.write_table(table, out)
    fs.move(temporary, path)
