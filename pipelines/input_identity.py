"""What a stage's fingerprint knows of its inputs: every file the recipe's input fields name, identified cheaply.

A file is identified by its path and size, plus
- a SHA-256 of its content when it is small (at most ``SMALL_FILE_BYTES``), so that touching it without a change does
  not redo the stage and an edit that keeps its size does; at most ``HASH_BUDGET_FILES`` files and
  ``HASH_BUDGET_BYTES`` bytes are read per stage (the first ones in path order), so a corpus of many small objects on
  S3 is not downloaded;
- its modification time otherwise (what one listing of a folder, or a HEAD of an object, gives: pyarrow's
  filesystems expose no ETag).

Files in the run's own stage folders (``<run_dir>/<stage>/``: another stage's output, such as ``qc.input`` set to
``RUN_DIR/synthesize/data``) are left out, as is anything else inside ``run_dir`` that a folder or glob outside it
happens to reach: they are covered by the upstream stage's fingerprint, and counting them would redo a stage on
every rerun. Local model folders (``embed.model``, ``generate.model``, ...) count by the size and modification time of
their top-level files (config.json, weights, tokenizer), read from one listing; a Hugging Face id counts by its name
only (in the stage's settings).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import posixpath
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from . import paths

if TYPE_CHECKING:
    from .recipe import Recipe

SMALL_FILE_BYTES = 4 * 1024 * 1024
HASH_BUDGET_FILES = 1000
HASH_BUDGET_BYTES = 64 * 1024 * 1024
_CHUNK = 1024 * 1024


def stage_inputs_digest(recipe: "Recipe", stage: str) -> str:
    """A short hash of the identity of every input of ``stage`` (see the module's docstring)."""
    return hashlib.sha256(json.dumps(stage_inputs(recipe, stage), sort_keys=True).encode()).hexdigest()[:16]


def stage_inputs(recipe: "Recipe", stage: str) -> list[dict]:
    """``[{"field", "spec", "files": [[path, size, "sha256:..." | "mtime_ns:..."], ...]}]`` for each input path the
    recipe sets for ``stage``, and each local model folder it names, in the schema's order."""
    from .recipe import Recipe
    from .schema import section_paths

    outputs = _RunFolders(recipe)
    budget = {"files": HASH_BUDGET_FILES, "bytes": HASH_BUDGET_BYTES, "seen": {}}
    found = []
    for place, role, value in section_paths(recipe.model_dump(mode="json"), Recipe, stage):
        specs = [value] if isinstance(value, str) else value
        specs = [s[len(role.prefix):] for s in specs if isinstance(s, str) and s.startswith(role.prefix)]
        for spec in specs:
            if role.kind == "input" and not outputs.is_stage_output(spec):
                found.append({"field": place, "spec": spec, "files": _spec_files(spec, outputs, budget)})
            elif role.kind == "model" and not paths.is_uri(spec) and os.path.isdir(os.path.expanduser(spec)):
                found.append({"field": place, "spec": spec, "files": _model_files(spec)})
    return found


class _RunFolders:
    """Where the run writes: ``run_dir`` and its stage folders, as (filesystem type, path inside it)."""

    def __init__(self, recipe: "Recipe"):
        from .recipe import STAGE_ORDER

        fs, root = paths.resolve(recipe.run_dir) if recipe.run_dir else (None, None)
        self.fs_type = type(fs)
        self.root = root.rstrip("/") if root else None
        self.stages = [f"{self.root}/{s}" for s in STAGE_ORDER] if root else []

    def _inside(self, fs: pafs.FileSystem, path: str, folders: list[str]) -> bool:
        return type(fs) is self.fs_type and any(path == f or path.startswith(f + "/") for f in folders)

    def is_stage_output(self, spec: str) -> bool:
        fs, path = paths.resolve(spec)
        return self._inside(fs, path.rstrip("/"), self.stages)

    def left_out(self, fs: pafs.FileSystem, spec_path: str, file: str) -> bool:
        """A file found under a spec that is not this stage's input proper: in a stage folder, or in the run
        directory when the spec itself lies outside it."""
        if self._inside(fs, file, self.stages):
            return True
        return self.root is not None and not self._inside(fs, spec_path, [self.root]) and \
            self._inside(fs, file, [self.root])


def _spec_files(spec: str, outputs: _RunFolders, budget: dict) -> list:
    """The identity of each file one spec names (a file, a folder's visible files, a glob's matches), or
    ``[["missing", spec]]`` when it names nothing (the stage then fails with its own message)."""
    fs, path = paths.resolve(spec)
    try:
        if paths.is_glob(path):  # one listing of the folders before the first wildcard, as the stages expand it
            base = paths.glob_base(path)
            infos = [i for i in _listing(fs, base) if fnmatch.fnmatch(i.path, path)]
        else:
            info = fs.get_file_info(path)
            base = path
            infos = [info] if info.type == pafs.FileType.File else _listing(fs, path)
    except (OSError, ValueError) as e:
        return [["unreadable", spec, type(e).__name__]]
    infos = sorted((i for i in infos if not outputs.left_out(fs, base.rstrip("/"), i.path)), key=lambda i: i.path)
    return [_identity(fs, i, budget) for i in infos] or [["missing", spec]]


def _listing(fs: pafs.FileSystem, base: str) -> list[pafs.FileInfo]:
    """The visible files under ``base``, recursively, from one listing (their sizes and times come with it); as the
    stages read folders, a file or folder name below ``base`` starting with ``.`` or ``_`` is skipped."""
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return []
    return [i for i in fs.get_file_info(pafs.FileSelector(base, recursive=True))
            if i.type == pafs.FileType.File
            and not any(part.startswith((".", "_")) for part in posixpath.relpath(i.path, base).split("/"))]


def _identity(fs: pafs.FileSystem, info: pafs.FileInfo, budget: dict) -> list:
    """[path, size, "sha256:..."] for a small file while the stage's budget lasts, else [path, size, "mtime_ns:..."];
    a file two specs name is looked at once."""
    seen = budget["seen"]
    if info.path not in seen:
        seen[info.path] = _look_at(fs, info, budget)
    return seen[info.path]


def _look_at(fs: pafs.FileSystem, info: pafs.FileInfo, budget: dict) -> list:
    size = info.size
    if size is not None and size <= SMALL_FILE_BYTES and budget["files"] > 0 and budget["bytes"] >= size:
        budget["files"] -= 1
        budget["bytes"] -= size
        try:
            digest = hashlib.sha256()
            with fs.open_input_stream(info.path) as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
            return [info.path, size, "sha256:" + digest.hexdigest()]
        except OSError:
            pass
    return [info.path, size, f"mtime_ns:{info.mtime_ns}"]


def _model_files(model: str) -> list:
    """A local model folder's top-level files (config.json, weights, tokenizer) by size and modification time."""
    folder = os.path.abspath(os.path.expanduser(model))
    try:
        files = []
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if not entry.name.startswith(".") and entry.is_file():
                st = entry.stat()
                files.append([entry.name, st.st_size, f"mtime_ns:{st.st_mtime_ns}"])
        return files
    except OSError as e:
        return [["unreadable", model, type(e).__name__]]
