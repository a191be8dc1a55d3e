"""The shape every stage has (after HF datatrove's blocks): a config model, a check before any work, a run that
writes the stage's folder, a typed report, and a one-line summary. ``pipelines/stages.py`` lists them in run order;
the recipe's sections, the runner, preflight, the CLI's summary and the recipe reference come from that list.

A stage's report follows one accounting contract, ``rows_in = rows_out + sum(rows_filtered) + rows_quarantined``,
and times itself with one helper (``StageClock``: total seconds and seconds by phase).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, ClassVar, Iterator, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .rundir import StageDir

if TYPE_CHECKING:
    from .recipe import Recipe


class StageReport(BaseModel):
    """What every ``report.json`` holds; a stage's own report adds its fields (declared or not)."""
    model_config = ConfigDict(extra="allow")
    stage: str
    rows_in: int = Field(ge=0)
    rows_out: int = Field(ge=0)
    rows_filtered: dict[str, int] = Field(default_factory=dict, description="Rows dropped, by reason.")
    rows_quarantined: int = Field(0, ge=0, description="Malformed rows, listed in quarantine.jsonl.")
    ids_made_unique: int = Field(0, ge=0, description="Rows whose id was taken by another row and became ID#k.")
    seconds: float = Field(ge=0)
    phases: dict[str, float] = Field(default_factory=dict, description="Seconds by phase (StageClock).")
    outputs: dict[str, str] = Field(default_factory=dict, description="Where the stage's outputs are.")
    skipped_files: dict[str, list[dict]] = Field(default_factory=dict, description="Files of input folders not read.")

    @model_validator(mode="after")
    def _rows_add_up(self) -> "StageReport":
        total = self.rows_out + sum(self.rows_filtered.values()) + self.rows_quarantined
        if total != self.rows_in:
            raise ValueError(f"{self.stage}: row accounting broken: rows_in={self.rows_in} but "
                             f"out+filtered+quarantined={total}")
        return self


class StageClock:
    """A stage's timing: ``seconds()`` since it started, and ``with clock.phase("name"):`` for each phase (a phase
    entered twice adds up)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self._phases: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self._phases[name] = self._phases.get(name, 0.0) + time.perf_counter() - began

    def phase_seconds(self, name: str) -> float:
        return self._phases.get(name, 0.0)

    def seconds(self) -> float:
        return round(time.perf_counter() - self.started, 3)

    def timings(self) -> dict:
        """``seconds`` and ``phases``, for the report."""
        return {"seconds": self.seconds(), "phases": {k: round(v, 3) for k, v in self._phases.items()}}


class Stage:
    """One stage of a run. Subclasses set ``name``, ``config`` (the recipe section's model) and ``report``, and
    implement ``run`` and ``summary``; ``check_recipe`` and ``preflight`` are optional."""
    name: ClassVar[str]
    config: ClassVar[type[BaseModel]]
    report: ClassVar[type[StageReport]] = StageReport
    help: ClassVar[str] = ""  # the recipe reference's one-line description of the section
    kept_on_retry: ClassVar[tuple[str, ...]] = ()  # entries of the stage's folder a rerun keeps (checkpoints)

    def check_recipe(self, cfg, recipe: "Recipe") -> None:
        """Requirements on other sections, checked when the recipe is validated (raise ValueError naming the
        field); e.g. embed needs a corpus unless select runs before it."""

    def preflight(self, cfg, recipe: "Recipe") -> None:
        """Everything that can fail before any work starts: inputs readable, models there, templates render."""

    def upstream(self, cfg, recipe: "Recipe") -> dict[str, str]:
        """``{field: folder}``: the earlier stages' ``data`` folders this stage reads when a field naming its input
        is unset (the runner stops before a stage whose upstream kept no rows, saying which one emptied it)."""
        return {}

    def run(self, cfg, stage: StageDir, recipe: "Recipe") -> dict:
        raise NotImplementedError

    def summary(self, report: StageReport) -> str:
        """The summary's line for this stage (the CLI adds where its data and report are)."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------- progress from inside a stage
_progress_sink: Optional[Callable[[str], None]] = None
# Seconds between progress lines ($DOMAINSYNTH_PROGRESS_SECONDS sets it): the console's, and a stage's own.
PROGRESS_EVERY_S = 30.0
PROGRESS_ENV = "DOMAINSYNTH_PROGRESS_SECONDS"


def progress_interval() -> float:
    try:
        return max(float(os.environ.get(PROGRESS_ENV) or PROGRESS_EVERY_S), 0.1)
    except ValueError:
        return PROGRESS_EVERY_S


@contextmanager
def progress_to(sink: Callable[[str], None]) -> Iterator[None]:
    """While the runner runs stages: a stage's ``progress`` lines go to ``sink`` (the CLI's console)."""
    global _progress_sink
    previous, _progress_sink = _progress_sink, sink
    try:
        yield
    finally:
        _progress_sink = previous


def progress(line: str) -> None:
    """A progress line of a long stage (``[stage] ...``), shown as the runner's own lines are."""
    (_progress_sink or print)(line)


# ------------------------------------------------------------------------------ checks that stages' preflights share
def check_inputs(field: str, specs: list[str]) -> None:
    """Each spec names readable files, and at least one of them has bytes."""
    from .corpus import SUPPORTED_SUFFIXES
    from .paths import expand_inputs

    try:
        fs, files = expand_inputs(specs, SUPPORTED_SUFFIXES)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"{field}: {e}") from None
    # Empty files are caught here, before any work; stopping at the first file with bytes keeps this to one look-up
    # on an object store. (Files of blank or malformed lines are found by the stage.)
    if not any(fs.get_file_info(f.path).size for f in files):
        raise ValueError(f"{field}: the input is empty: {', '.join(specs)} holds only empty files")


def check_model(field: str, model: str) -> None:
    """A model given as a path must be there; a model this project makes (``smollm2``) is made now, once, in the
    model cache (its package missing is an error naming the install command); anything else is taken for a Hugging
    Face id (resolved by the engine, on the cluster)."""
    from ..actors import smollm2

    if smollm2.is_named(model):
        try:
            smollm2.smollm2_folder()
        except smollm2.ModelUnavailable as e:
            raise FileNotFoundError(f"{field}: {e}") from None
        return
    if not (os.path.isabs(model) or model.startswith(("./", "../", "~"))):
        return
    folder = os.path.expanduser(model)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{field}: no model folder at {model!r}")
    if not os.path.isfile(os.path.join(folder, "config.json")):  # what every Hugging Face model folder holds
        raise FileNotFoundError(f"{field}: {model!r} holds no model (expected a Hugging Face model folder with a "
                                f"config.json)")


def check_soft_prompt(field: str, path: Optional[str]) -> None:
    from ..actors.soft_prompt import load_soft_prompt

    if not path:
        return
    try:
        load_soft_prompt(path)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"{field}: {e}") from None


def check_file(field: str, path: str) -> None:
    from .paths import resolve

    fs, resolved = resolve(path)
    if fs.get_file_info(resolved).type.name != "File":
        raise FileNotFoundError(f"{field}: no file at {path!r}")
