"""The run-directory contract: ``<run>/<stage>/{data/*.parquet, report.json, report.md, quarantine.jsonl}`` and a
completion marker written last. Works for local paths and pyarrow filesystem URIs alike."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow.fs as pafs

from . import paths

MARKER = "_COMPLETE.json"
QUARANTINE_PARTS = "_quarantine"  # per-task quarantine files, merged into quarantine.jsonl when the stage ends


class StageError(RuntimeError):
    """A stage cannot go on (bad input found only once it ran, an impossible setting); the message says why."""


@dataclass(frozen=True)
class StageDir:
    uri: str  # as the user wrote it (local path or URI); used for Ray Data reads and writes

    @property
    def fs_path(self) -> tuple[pafs.FileSystem, str]:
        return paths.resolve(self.uri)

    def child(self, *parts: str) -> str:
        return paths.join(self.uri, *parts)

    def sibling(self, *parts: str) -> str:
        """A path in another stage's folder of the same run (``<run>/<parts...>``)."""
        return paths.join(paths.parent(self.uri), *parts)

    def write_bytes(self, name: str, data: bytes) -> None:
        fs, root = self.fs_path
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(f"{root}/{name}") as f:
            f.write(data)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, obj) -> None:
        self.write_text(name, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")

    def write_jsonl(self, name: str, rows) -> None:
        self.write_text(name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    def read_json(self, name: str):
        fs, root = self.fs_path
        try:
            with fs.open_input_stream(f"{root}/{name}") as f:
                return json.loads(f.read().decode("utf-8"))
        except (FileNotFoundError, OSError, json.JSONDecodeError):
            return None

    def read_text(self, name: str) -> str | None:
        fs, root = self.fs_path
        try:
            with fs.open_input_stream(f"{root}/{name}") as f:
                return f.read().decode("utf-8")
        except (FileNotFoundError, OSError):
            return None

    def exists(self, name: str) -> bool:
        fs, root = self.fs_path
        return fs.get_file_info(f"{root}/{name}").type != pafs.FileType.NotFound

    def clear(self, keep: tuple[str, ...] = ()) -> None:
        """Remove whatever an interrupted attempt left, so the stage is redone from scratch; the entries named in
        ``keep`` stay (a training stage's checkpoints, which the rerun resumes from)."""
        fs, root = self.fs_path
        if fs.get_file_info(root).type == pafs.FileType.Directory:
            if keep:
                self._delete_all_but(keep)
            else:
                fs.delete_dir_contents(root)
        fs.create_dir(root, recursive=True)

    def remove(self, keep: tuple[str, ...] = ()) -> None:
        """Remove the stage's folder and everything in it (a failed stage leaves nothing behind), but the entries
        named in ``keep``."""
        fs, root = self.fs_path
        if fs.get_file_info(root).type != pafs.FileType.Directory:
            return
        if keep and any(self.exists(name) for name in keep):
            self._delete_all_but(keep)
        else:
            fs.delete_dir(root)

    def _delete_all_but(self, keep: tuple[str, ...]) -> None:
        fs, root = self.fs_path
        for info in fs.get_file_info(pafs.FileSelector(root)):
            if info.base_name not in keep:
                self.delete(info.base_name)

    def delete(self, name: str) -> None:
        fs, root = self.fs_path
        target = f"{root}/{name}"
        info = fs.get_file_info(target)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(target)
        elif info.type == pafs.FileType.File:
            fs.delete_file(target)

    def completed_with(self, fingerprint: str) -> bool:
        marker = self.read_json(MARKER)
        return bool(marker) and marker.get("fingerprint") == fingerprint

    def mark_complete(self, fingerprint: str) -> None:
        self.write_json(MARKER, {"fingerprint": fingerprint})


def write_quarantine_part(parts_uri: str, name: str, rows: list[dict]) -> None:
    """One task's quarantined rows, as ``parts_uri/name`` (a retried task rewrites its own part: no duplicates)."""
    fs, root = paths.resolve(parts_uri)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/{name}") as out:
        out.write("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows).encode())


def gather_quarantine(stage: StageDir, input_name: str) -> list[dict]:
    """The tasks' quarantine parts, merged into ``quarantine.jsonl`` in part-name order (each row tagged with the
    input it came from), and removed."""
    fs, root = StageDir(stage.child(QUARANTINE_PARTS)).fs_path
    rows: list[dict] = []
    if fs.get_file_info(root).type == pafs.FileType.Directory:
        for part in sorted(fs.get_file_info(pafs.FileSelector(root)), key=lambda i: i.path):
            with fs.open_input_stream(part.path) as f:
                rows += [json.loads(line) for line in f.read().decode().splitlines() if line]
    stage.write_jsonl("quarantine.jsonl", [{"input": input_name, **r} for r in rows])
    stage.delete(QUARANTINE_PARTS)
    return rows


def read_file_bytes(path: str) -> bytes:
    fs, p = paths.resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def count_parquet_rows(uri: str) -> int:
    """Rows in a folder of Parquet files (from the footers); 0 when there is none."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    fs, path = paths.resolve(uri)
    try:
        return pads.dataset(path, filesystem=fs, format="parquet").count_rows()
    except (FileNotFoundError, pa.ArrowInvalid):
        return 0
