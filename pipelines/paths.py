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
    """``base/part/...``; a URI's query (``s3://bucket/run?endpoint_override=host:9000``) stays at the end."""
    if is_uri(base):
        base, mark, query = base.partition("?")
        return base.rstrip("/") + "/" + "/".join(p.strip("/") for p in parts) + mark + query
    import os

    return os.path.join(base, *parts)


def parent(path: str) -> str:
    """The folder holding ``path`` (a URI keeps its query)."""
    if is_uri(path):
        base, mark, query = path.partition("?")
        return base.rstrip("/").rsplit("/", 1)[0] + mark + query
    import os

    return os.path.dirname(os.path.abspath(path.rstrip("/")))


@dataclass(frozen=True)
class InputFile:
    path: str  # inside ``filesystem``
    key: str  # short stable name used in derived row ids and quarantine records


def expand_inputs(specs: list[str], suffixes: tuple[str, ...]) -> tuple[pafs.FileSystem, list[InputFile]]:
    """Expand files, directories and globs into a sorted list of input files with stable keys.

    Raises ``FileNotFoundError`` naming the spec that matched nothing, and ``ValueError`` for a file whose format
    is not one of ``suffixes`` or for inputs spread over different filesystems.
    """
    filesystem, files, _ = expand_inputs_and_skipped(specs, suffixes)
    return filesystem, files


def expand_inputs_and_skipped(specs: list[str], suffixes: tuple[str, ...]
                              ) -> tuple[pafs.FileSystem, list[InputFile], list[dict]]:
    """``expand_inputs``, plus the files that directories and globs hold but are not read, each as
    ``{"path", "reason"}``: hidden ones (a name in the path starts with ``.`` or ``_``) and, in a directory, files of
    another format."""
    filesystem = None
    found: list[str] = []
    skipped: list[dict] = []
    for spec in specs:
        fs, path = resolve(spec)
        if filesystem is not None and type(fs) is not type(filesystem):
            raise ValueError(f"all inputs must live on one filesystem; {spec!r} differs from the first input")
        filesystem = fs
        matches, passed_over = _expand_one(fs, path, suffixes)
        skipped += passed_over
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
    keyed = [InputFile(path=f, key=posixpath.relpath(f, root) if root else f) for f in files]
    return filesystem, keyed, sorted({s["path"]: s for s in skipped}.values(), key=lambda s: s["path"])


def is_glob(path: str) -> bool:
    return any(c in GLOB_CHARS for c in path)


def glob_base(pattern: str) -> str:
    """The folders of a glob before its first wildcard: data/*/x.jsonl -> data."""
    parts = pattern.split("/")
    return "/".join(parts[:next(i for i, p in enumerate(parts) if is_glob(p))]) or "/"


def glob_matches(fs: pafs.FileSystem, pattern: str) -> list[str]:
    """The files a glob names, as the stages read them: ``*`` crosses folders, hidden and ``_`` files are skipped."""
    return _glob_matches(fs, pattern)[0]


def _glob_matches(fs: pafs.FileSystem, pattern: str) -> tuple[list[str], list[dict]]:
    visible, hidden = _list_files(fs, glob_base(pattern))
    return ([c for c in visible if fnmatch.fnmatch(c, pattern)],
            [{"path": c, "reason": HIDDEN} for c in hidden if fnmatch.fnmatch(c, pattern)])


HIDDEN = "hidden (a name in its path starts with '.' or '_')"


def _expand_one(fs: pafs.FileSystem, path: str, suffixes: tuple[str, ...]) -> tuple[list[str], list[dict]]:
    """(files to read, files passed over with the reason) for one input spec."""
    if is_glob(path):
        return _glob_matches(fs, path)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [path], []
    if info.type == pafs.FileType.Directory:
        visible, hidden = _list_files(fs, path)
        other_format = f"not {', '.join(suffixes)}"
        return ([f for f in visible if f.endswith(suffixes)],
                [{"path": f, "reason": HIDDEN} for f in hidden]
                + [{"path": f, "reason": other_format} for f in visible if not f.endswith(suffixes)])
    return [], []


def _list_files(fs: pafs.FileSystem, base: str) -> tuple[list[str], list[str]]:
    """(visible, hidden) files under ``base``, recursively; hidden: a file or folder name below ``base`` starts with
    ``.`` or ``_`` (as Ray Data and Hadoop skip them: ``.git/``, ``_SUCCESS``, half-written ``.tmp`` files)."""
    info = fs.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        return [], []
    visible, hidden = [], []
    for i in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if i.type != pafs.FileType.File:
            continue
        below = posixpath.relpath(i.path, base).split("/")
        (hidden if any(part.startswith((".", "_")) for part in below) else visible).append(i.path)
    return visible, hidden
