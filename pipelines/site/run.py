"""The run directory as the report page reads it: a local path or a pyarrow filesystem URI, its folders, files
and Parquet data, and the site's own files written back into it. A file the page cannot use raises ``Unreadable``,
whose message is the "not readable: reason" note the page shows in its place, so one bad file costs one note."""

from __future__ import annotations

import io
import json
import posixpath

import pyarrow.fs as pafs

from ..rundir import StageDir

SITE_DIR = "site"
INDEX = "index.html"
SOURCES = "sources.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def stage_names() -> list[str]:
    from ..stages import STAGES

    return [s.name for s in STAGES]


class Unreadable(Exception):
    """A file of the run that the page cannot use; the message is the reason shown."""


class Run:
    """Reads a run directory (a local path or a pyarrow filesystem URI) and writes the site into it."""

    def __init__(self, run_dir: str):
        self.uri = run_dir
        self.root = StageDir(run_dir)
        self.fs, self.path = self.root.fs_path

    def is_dir(self, *parts: str) -> bool:
        return self.fs.get_file_info(posixpath.join(self.path, *parts)).type == pafs.FileType.Directory

    def is_file(self, *parts: str) -> bool:
        return self.fs.get_file_info(posixpath.join(self.path, *parts)).type == pafs.FileType.File

    def listing(self, *parts: str) -> list[str]:
        """Names of the entries of a folder of the run (empty when there is none)."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(posixpath.join(self.path, *parts)))
        except (FileNotFoundError, OSError):
            return []
        return sorted(i.base_name for i in infos)

    def read_bytes(self, *parts: str) -> bytes:
        where = "/".join(parts)
        try:
            with self.fs.open_input_stream(posixpath.join(self.path, *parts)) as f:
                return f.read()
        except FileNotFoundError:
            raise Unreadable(f"{where}: missing") from None
        except OSError as e:
            raise Unreadable(f"{where}: {e}") from None

    def read_text(self, *parts: str) -> str:
        try:
            return self.read_bytes(*parts).decode("utf-8")
        except UnicodeDecodeError as e:
            raise Unreadable(f"{'/'.join(parts)}: not UTF-8 text ({e.reason} at byte {e.start})") from None

    def read_json(self, *parts: str):
        text = self.read_text(*parts)
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise Unreadable(f"{'/'.join(parts)}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") \
                from None

    def write(self, relative: str, data: bytes) -> None:
        folder, name = posixpath.split(relative)
        (StageDir(self.root.child(folder)) if folder else self.root).write_bytes(name, data)


def check_png(data: bytes, where: str) -> None:
    """A PNG a browser can show: its signature, and Pillow decoding it whole."""
    if not data.startswith(PNG_MAGIC):
        raise Unreadable(f"{where}: not a PNG image")
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except ImportError:  # Pillow comes with matplotlib; without it the signature has to do
        return
    except Exception as e:  # noqa: BLE001 - a broken image is reported, whatever broke it
        raise Unreadable(f"{where}: a broken PNG ({e})") from None


def parquet_folder(run: Run, *parts: str):
    import pyarrow.dataset as pads

    try:
        return pads.dataset(posixpath.join(run.path, *parts), filesystem=run.fs, format="parquet")
    except (FileNotFoundError, OSError) as e:
        raise Unreadable(f"{'/'.join(parts)}: {e}") from None


def _short(e: BaseException, limit: int = 300) -> str:
    text = f"{type(e).__name__}: {e}" if not isinstance(e, Unreadable) else str(e)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " ..."
