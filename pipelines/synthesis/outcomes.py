"""Kept and dropped rows of a filtering stage (synthesize, judge): every row carries ``drop_reason`` (null when it
is kept) and ``drop_detail``; kept rows go to ``<stage>/data/``, dropped ones, with their reason, to
``<stage>/dropped/``, so that users can see why each row was kept or dropped."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from ray.data import Dataset

from ..corpus import drop_internal_columns, without_operator_reservations
from ..rundir import StageDir, count_parquet_rows, gather_quarantine
from ..stage import StageReport
from ..unique_ids import make_ids_unique

DROP_REASON, DROP_DETAIL = "drop_reason", "drop_detail"


def _kept(batch: pa.Table) -> pa.Table:
    return drop_internal_columns(batch.filter(pc.is_null(batch.column(DROP_REASON)))).drop_columns(
        [DROP_REASON, DROP_DETAIL])


def _dropped(batch: pa.Table) -> pa.Table:
    return drop_internal_columns(batch.filter(pc.is_valid(batch.column(DROP_REASON))))


def write_outcomes(rows: Dataset, stage: StageDir) -> tuple[int, dict[str, int]]:
    """Write ``rows`` (already computed: pass a materialized dataset) split into data/ and dropped/; returns the
    number kept and the number dropped by reason."""
    rows.map_batches(_kept, batch_format="pyarrow", batch_size=None).write_parquet(stage.child("data"))
    rows.map_batches(_dropped, batch_format="pyarrow", batch_size=None).write_parquet(stage.child("dropped"))
    return count_parquet_rows(stage.child("data")), dropped_by_reason(stage.child("dropped"))


def finish_outcomes(rows: Dataset, stage: StageDir, input_name: str, id_field: str = "id"
                    ) -> tuple[int, dict[str, int], int, int, int]:
    """Run ``rows`` (generation included) and write them split; returns kept, dropped by reason, quarantined, rows
    in (their sum) and the number of ids made unique (unique_ids' rule, across kept and dropped)."""
    with without_operator_reservations():  # per-operator reservations would hold the engine pool to a share
        kept, dropped = write_outcomes(rows.materialize(), stage)
    quarantined = len(gather_quarantine(stage, input_name))
    renamed = make_ids_unique([stage.child("data"), stage.child("dropped")], id_field)
    return kept, dropped, quarantined, kept + sum(dropped.values()) + quarantined, renamed


def kept_diversity(stage: StageDir, field: str, reference_texts: list[str] | None, cfg) -> tuple[dict | None, list]:
    """The diversity of the kept rows' ``field`` (``cfg``: a DiversityConfig) and the report.md lines that show it
    (the table, and the closeness-to-references histogram written beside it)."""
    from .diversity import diversity_markdown, measure_diversity, nearest_reference_png

    diversity = measure_diversity(sample_column(stage.child("data"), field, cfg.sample), reference_texts, cfg)
    if not diversity:
        return None, []
    lines = [diversity_markdown(diversity), ""]
    if diversity.get("nearest_reference"):
        stage.write_bytes("nearest_reference.png", nearest_reference_png(diversity["nearest_reference"]["values"]))
        lines.append("![similarity to the closest reference](nearest_reference.png)")
    return diversity, lines


def dropped_by_reason(uri: str) -> dict[str, int]:
    return dict(sorted((str(reason), n) for reason, n in value_counts(uri, DROP_REASON).items()))


def value_counts(uri: str, column: str) -> dict:
    """How many rows of a Parquet folder hold each value of ``column`` (nulls as None); {} without the folder."""
    fs, path = StageDir(uri).fs_path
    try:
        values = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=[column]).column(column)
    except (FileNotFoundError, KeyError, pa.ArrowInvalid):
        return {}
    counts = values.value_counts()
    return {v["values"].as_py(): v["counts"].as_py() for v in counts}


def sample_column(uri: str, column: str, n: int, seed: int = 0) -> list:
    """Up to ``n`` values of ``column`` from a Parquet folder, a seeded random sample (read in one process: for
    report measures on a few thousand rows)."""
    fs, path = StageDir(uri).fs_path
    try:
        dataset = pads.dataset(path, filesystem=fs, format="parquet")
        total = dataset.count_rows()
    except (FileNotFoundError, pa.ArrowInvalid):
        return []
    if not total or not n:
        return []
    picks = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    return dataset.take(pa.array(picks), columns=[column]).column(column).to_pylist()


def outcome_rows(report: dict) -> list[tuple[str, object]]:
    """Markdown table rows: in, kept, dropped by reason, quarantined, acceptance rate."""
    rows = [("rows in", f"{report['rows_in']:,}"), ("kept", f"{report['rows_out']:,}")]
    rows += [(f"dropped: {reason}", f"{count:,}") for reason, count in report["rows_filtered"].items()]
    rows += [("quarantined (see quarantine.jsonl)", f"{report['rows_quarantined']:,}"),
             ("acceptance rate", f"{report['acceptance_rate']:.1%}"),
             ("ids made unique (ID#k)", f"{report['ids_made_unique']:,}")]
    return rows


def acceptance_rate(kept: int, rows_in: int) -> float:
    return round(kept / rows_in, 4) if rows_in else 0.0


class OutcomeReport(StageReport):
    """The report of a stage that keeps or drops each row (synthesize, qc, judge)."""
    acceptance_rate: float


def outcome_summary(label: str, r: OutcomeReport) -> str:
    dropped = ", ".join(f"{n:,} {reason.replace('_', ' ')}" for reason, n in r.rows_filtered.items() if n)
    return (f"{label}: kept {r.rows_out:,} of {r.rows_in:,} ({r.acceptance_rate:.0%}); dropped {dropped or 'none'}; "
            f"quarantined {r.rows_quarantined:,}")
