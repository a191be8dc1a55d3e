"""What a run prints, and how much: the output mode and the progress shown while stages work.

- default: the stage runner's lines (a stage starting, finishing), progress, the summary and errors. Ray Data's
  console log is cut to warnings and errors (all of it still goes to ``ray-data.log`` in Ray's session folder), and
  workers' output stays in the workers' log files instead of being forwarded to the driver (a failure still comes
  back as the task's exception, a dead worker as Ray's error message). Progress: Ray Data's progress bars on a
  terminal; elsewhere (a log file, CI, a job's log) a line every so often, e.g.
  ``[embed] 45 s: 359 rows in, 128 done; 2 actors starting``.
- ``--verbose``: Ray's logs as Ray prints them (execution plans, Ray Data's progress dumps, workers' output).
- ``--quiet``: only the summary and errors.

In every mode the Hugging Face progress bars and tqdm bars of the workers are off (``worker_env``).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Iterator

from ..pipelines.stage import PROGRESS_ENV, progress_interval  # PROGRESS_ENV: read here by tests and users

MODES = ("quiet", "normal", "verbose")

# Progress lines off a terminal: the first after this long in a stage, then one at this interval
# ($DOMAINSYNTH_PROGRESS_SECONDS sets the interval, and the first line comes no later).
FIRST_PROGRESS_S = 15.0

# Library chatter in the workers (and the driver, unless verbose): model-loading bars, tqdm bars, advice.
WORKER_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false",
              "TRANSFORMERS_VERBOSITY": "error"}
# The driver keeps tqdm on: Ray Data draws its progress bars with it.
DRIVER_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}

_STAGE_LINE = re.compile(r"\[([\w.-]+)\]")
_current: Console | None = None


def current() -> Console:
    """The console of the command running in this process (a default one outside the CLI)."""
    return _current or Console()


class Console:
    def __init__(self, mode: str = "normal"):
        if mode not in MODES:
            raise ValueError(f"output mode {mode!r}: expected one of {', '.join(MODES)}")
        self.mode = mode
        self.every_s = progress_interval()
        self.first_s = min(FIRST_PROGRESS_S, self.every_s)
        self._lock = threading.Lock()
        self._stage: str | None = None  # the stage named by the runner's last line
        self._stage_started = self._next_line_at = 0.0
        self._dataset: str | None = None  # what Ray Data's running execution has done (a few words)

    # ------------------------------------------------------------------ what Ray is told (cluster/ray_runtime.py)
    @property
    def forward_worker_logs(self) -> bool:
        return self.mode == "verbose"

    @property
    def ray_logging_level(self) -> int:
        return logging.ERROR if self.mode == "quiet" else logging.WARNING

    def worker_env(self) -> dict[str, str]:
        """Environment variables for every Ray worker of the run; a value set in this process's environment wins."""
        names = [n for n in WORKER_ENV if not (self.mode == "verbose" and n == "TRANSFORMERS_VERBOSITY")]
        return {n: os.environ.get(n, WORKER_ENV[n]) for n in names}

    # -------------------------------------------------------------------------------------------------- printing
    def echo(self, line: str) -> None:
        """A line of the stage runner: shown unless quiet; its ``[stage]`` prefix names the stage progress is for."""
        match = _STAGE_LINE.match(line)
        with self._lock:
            now = time.monotonic()
            if match and match.group(1) != self._stage:
                self._stage, self._stage_started = match.group(1), now
            self._next_line_at = now + self.first_s
            if self.mode != "quiet":
                print(line, flush=True)

    def say(self, line: str) -> None:
        """A note of ours (a model being made): shown unless quiet."""
        if self.mode != "quiet":
            with self._lock:
                print(line, flush=True)

    def result(self, text: str) -> None:
        """The summary: shown in every mode."""
        with self._lock:
            print(text, flush=True)

    def error(self, text: str) -> None:
        with self._lock:
            print(text, file=sys.stderr, flush=True)

    def failed(self, error: BaseException, logs: str | None) -> None:
        """A stage that raised: its name, the error and where Ray's logs are."""
        where = f"[{self._stage}] " if self._stage else ""
        self.error(f"domainsynth: error: {where}{type(error).__name__}: {error}")
        self.error(f"domainsynth: Ray's logs (workers, Ray Data) are in {logs or 'the cluster (ray logs, dashboard)'}"
                   + ("" if self.mode == "verbose" else "; --verbose prints them and the full traceback"))

    # ----------------------------------------------------------------------------------------- a command's session
    @contextlib.contextmanager
    def session(self) -> Iterator[Console]:
        """This mode for the command's duration: Ray Data's console log and progress bars, Python warnings,
        library chatter in the driver. Everything is put back afterwards (tests run many commands in one process)."""
        global _current
        undo = contextlib.ExitStack()
        with undo:
            previous, _current = _current, self
            undo.callback(_restore_current, previous)
            if self.mode != "verbose":
                undo.enter_context(environment(DRIVER_ENV))
                undo.enter_context(_logger_below(logging.ERROR, "DeepSpeed"))  # "Setting accelerator to CPU"
                undo.enter_context(_ray_data_console(self.ray_logging_level))
            if self.mode == "quiet":
                undo.enter_context(warnings.catch_warnings())
                warnings.simplefilter("ignore")
            undo.enter_context(_data_context(self))
            yield self

    @property
    def progress_lines(self) -> bool:
        """Our own progress lines: off a terminal, by default (on a terminal Ray Data draws its bars)."""
        return self.mode == "normal" and not _isatty(sys.stdout)

    @contextlib.contextmanager
    def progress(self) -> Iterator[None]:
        """While stages run: a progress line now and then when ``progress_lines``."""
        if not self.progress_lines:
            yield
            return
        stop = threading.Event()
        ticker = threading.Thread(target=self._tick, args=(stop,), name="domainsynth-progress", daemon=True)
        with self._lock:
            self._next_line_at = time.monotonic() + self.first_s
        ticker.start()
        try:
            yield
        finally:
            stop.set()
            ticker.join(timeout=5)

    def _tick(self, stop: threading.Event) -> None:
        while not stop.wait(min(1.0, self.first_s)):
            with self._lock:
                now = time.monotonic()
                if self._stage is None or now < self._next_line_at:
                    continue
                self._next_line_at = now + self.every_s
                detail = f": {self._dataset}" if self._dataset else ""
                print(f"[{self._stage}] {now - self._stage_started:.0f} s{detail}", flush=True)

    def _dataset_progress(self, text: str | None) -> None:
        with self._lock:
            self._dataset = text


def _restore_current(previous: Console | None) -> None:
    global _current
    _current = previous


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# ------------------------------------------------------------------------------------------- the driver's settings
@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` where the environment says nothing else, until the block ends."""
    added = [name for name in values if name not in os.environ]
    os.environ.update({name: values[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


@contextlib.contextmanager
def _logger_below(level: int, name: str) -> Iterator[None]:
    """Drop a library logger's records under ``level`` (a filter: the library sets its own level on import)."""
    logger = logging.getLogger(name)

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= level

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


@contextlib.contextmanager
def _ray_data_console(level: int) -> Iterator[None]:
    """Ray Data's console handler shows ``level`` and above; its log file keeps everything. A user's own Ray Data
    logging configuration (RAY_DATA_LOGGING_CONFIG) is left as it is."""
    handlers = []
    if "RAY_DATA_LOGGING_CONFIG" not in os.environ:
        importlib.import_module("ray.data")  # configures the "ray.data" logger on import
        handlers = [h for h in logging.getLogger("ray.data").handlers
                    if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    levels = [h.level for h in handlers]
    for h in handlers:
        h.setLevel(max(h.level, level))
    try:
        yield
    finally:
        for h, previous in zip(handlers, levels):
            h.setLevel(previous)


@contextlib.contextmanager
def _data_context(console: Console) -> Iterator[None]:
    """Ray Data's progress display: none when quiet; our callback feeding the progress lines off a terminal."""
    import ray.data

    context = ray.data.DataContext.get_current()
    bars = context.enable_progress_bars
    callbacks = list(context.custom_execution_callback_classes)
    if console.mode == "quiet":
        context.enable_progress_bars = False
    if console.progress_lines and DatasetProgress is not None:
        context.custom_execution_callback_classes.append(DatasetProgress)
    try:
        yield
    finally:
        context.enable_progress_bars = bars
        context.custom_execution_callback_classes[:] = callbacks


# ------------------------------------------------------------------------------------ progress from Ray Data's executor
def describe_execution(topology) -> str | None:
    """A few words on a running Ray Data execution: rows taken in by its first operator, rows that reached its last
    one, actors still starting. ``topology`` lists the operators upstream first."""
    ops = [op for op in topology if op.input_dependencies]  # the input buffer has none
    if not ops:
        return None
    rows_in = ops[0].metrics.rows_task_outputs_generated
    parts = []
    if rows_in:
        parts.append(f"{rows_in:,} rows in" + (f", {ops[-1].metrics.num_row_inputs_received:,} done"
                                               if len(ops) > 1 else ""))
    starting = sum(getattr(op.metrics, "num_pending_actors", 0) or 0 for op in ops)
    if starting:
        parts.append(f"{starting} actor{'s' if starting > 1 else ''} starting")
    return "; ".join(parts) or None


try:
    # Ray Data runs the callbacks of DataContext.custom_execution_callback_classes in the executor's thread: this
    # reads the operators' counters where they are kept, and the progress line shows the latest reading.
    from ray.data._internal.execution.execution_callback import ExecutionCallback

    class DatasetProgress(ExecutionCallback):
        READ_EVERY_S = 0.5

        def __init__(self):
            self._read_at = 0.0

        def on_execution_step(self, executor) -> None:
            now = time.monotonic()
            if _current is None or now - self._read_at < self.READ_EVERY_S:
                return
            self._read_at = now
            try:
                text = describe_execution(executor._topology)
            except Exception:  # noqa: BLE001  (another Ray's internals: the progress line shows the time alone)
                text = None
            _current._dataset_progress(text)

        def after_execution_succeeds(self, executor) -> None:
            if _current is not None:
                _current._dataset_progress(None)

        def after_execution_fails(self, executor, error) -> None:
            self.after_execution_succeeds(executor)

except ImportError:  # a Ray without execution callbacks: the progress line shows the time alone
    DatasetProgress = None
