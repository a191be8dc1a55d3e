"""Local paths and pyarrow filesystem URIs (s3://, gs://, hdfs://...) behind one small interface."""

from __future__ import annotations

import fnmatch
import posixpath
from dataclasses import dataclass

import pyarrow.fs as pafs

GLOB_CHARS = set("*?[")


def is_uri(path: str) -> bool:
    return "://" in path


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """A filesystem and the path inside it, for a local path or a URI."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    import os

    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    if is_uri(base):
        return base.rstrip("/") + "/" + "/".join(p.strip("/") for p in parts)
    import os

    return os.path.join(base, *parts)


@dataclass(frozen=True)
class InputFile:
    path: str  # inside ``filesystem``
    key: str  # short stable name used in derived row ids and quarantine records


def expand_inputs(specs: list[str], suffixes: tuple[str, ...]) -> tuple[pafs.FileSystem, list[InputFile]]:
    """Expand files, directories and globs into a sorted list of input files with stable keys.

    Raises ``FileNotFoundError`` naming the spec that matched nothing, and ``ValueError`` for a file whose format
    is not one of ``suffixes`` or for inputs spread over different filesystems.
    """
    filesystem = None
    found: list[str] = []
    for spec in specs:
        fs, path = resolve(spec)
        if filesystem is not None and type(fs) is not type(filesystem):
            raise ValueError(f"all inputs must live on one filesystem; {spec!r} differs from the first input")
        filesystem = fs
        matches = _expand_one(fs, path, suffixes)
        if not matches:
            raise FileNotFoundError(f"no input files match {spec!r} (looked for {', '.join(suffixes)})")
        for m in matches:
            if not m.endswith(suffixes):
                raise ValueError(f"{m!r}: unsupported input format; expected one of {', '.join(suffixes)}")
        found.extend(matches)
    files = sorted(set(found))
    root = posixpath.commonpath(files) if len(files) > 1 else posixpath.dirname(files[0])
    if root in files:  # a single file: key it by its name
        root = posixpath.dirname(root)
    return filesystem, [InputFile(path=f, key=posixpath.relpath(f, root) if root else f) for f in files]


def is_glob(path: str) -> bool:
    return any(c in GLOB_CHARS for c in path)


def glob_base(pattern: str) -> str:
    """The folders of a glob before its first wildcard: data/*/x.jsonl -> data."""
    parts = pattern.split("/")
    return "/".join(parts[:next(i for i, p in enumerate(parts) if is_glob(p))]) or "/"


def glob_matches(fs: pafs.FileSystem, pattern: str) -> list[str]:
    """The files a glob names, as the stages read them: ``*`` crosses folders, hidden and ``_`` files are skipped."""
    return [c for c in _list_files(fs, glob_base(pattern)) if fnmatch.fnmatch(c, pattern)]


def _expand_one(fs: pafs.FileSystem, path: str, suffixes: tuple[str, ...]) -> list[str]:
    if is_glob(path):
        return glob_matches(fs, path)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [path]
    if info.type == pafs.FileType.Directory:
        return [f for f in _list_files(fs, path) if f.endswith(suffixes)]
    return []


def _list_files(fs: pafs.FileSystem, base: str) -> list[str]:
    info = fs.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        return []
    selector = pafs.FileSelector(base, recursive=True)
    return [
        i.path for i in fs.get_file_info(selector)
        if i.type == pafs.FileType.File and not posixpath.basename(i.path).startswith((".", "_"))
    ]
