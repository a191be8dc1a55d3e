"""Which texts stand for each group of the data map: the recipe's inputs that live outside the run directory
(remembered in ``site/sources.json``), rows of the run's Parquet folders and evaluate's task items, each a small
seeded sample read on this process, so that a corpus of billions of rows costs a few reads and a rewrite draws
the same points."""

from __future__ import annotations

from typing import Optional

import numpy as np

from .. import paths
from .run import Run, Unreadable, parquet_folder

MAP_SEED = 0


def sources_of(recipe) -> dict:
    """Inputs of the recipe that the data map draws and the run directory does not hold: the general corpus, the
    in-domain examples (select's in-domain set, CRAFT's few-shots, DOMINO's references, TRAIT's examples) and the
    evaluation items QC decontaminates against (the downstream tasks, where the run has no evaluate stage)."""
    def entry(specs, fields, what: str) -> dict:
        return {"paths": list(specs), "fields": [f for f in fields if f] or None, "what": what}

    general, in_domain, downstream = [], [], []
    select = getattr(recipe, "select", None)
    if select is not None:
        general.append(entry(select.corpus, [select.text_field], "select.corpus"))
        in_domain.append(entry(select.in_domain, [select.in_domain_text_field or select.text_field],
                               "select.in_domain"))
    pretrain = getattr(recipe, "pretrain", None)
    if not general and pretrain is not None and pretrain.general:
        general.append(entry(pretrain.general, [pretrain.general_text_field], "pretrain.general"))
    embed = getattr(recipe, "embed", None)
    if not general and embed is not None and embed.corpus:
        general.append(entry(embed.corpus, [embed.text_field], "embed.corpus"))
    retrieve = getattr(recipe, "retrieve", None)
    if retrieve is not None:
        in_domain.append(entry(retrieve.few_shots, [retrieve.few_shot_field], "retrieve.few_shots"))
    softprompt = getattr(recipe, "softprompt", None)
    if softprompt is not None:
        in_domain.append(entry(softprompt.references, [softprompt.text_field], "softprompt.references"))
    synthesize = getattr(recipe, "synthesize", None)
    if synthesize is not None:
        if synthesize.references:
            in_domain.append(entry(synthesize.references, synthesize.reference_fields or [],
                                   "synthesize.references"))
        elif synthesize.method == "trait":
            in_domain.append(entry(synthesize.trait.examples, [synthesize.trait.problem_field],
                                   "synthesize.trait.examples"))
        elif synthesize.method == "craft" and retrieve is None:
            in_domain.append(entry(synthesize.craft.few_shots, [], "synthesize.craft.few_shots"))
    qc = getattr(recipe, "qc", None)
    if qc is not None and qc.decontaminate is not None:
        downstream.append(entry(qc.decontaminate.eval_files, qc.decontaminate.eval_fields or [],
                                "qc.decontaminate.eval_files"))
    return {"general": general, "in_domain": in_domain, "downstream": downstream}


def record_text(record: dict, fields: Optional[list[str]] = None) -> Optional[str]:
    """A row's text: the named fields joined, else ``text`` / ``Text``, else every string (and list of strings)
    field joined (an evaluation item: the question and its choices)."""
    if not isinstance(record, dict):
        return None

    def strings(value) -> list[str]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            return [v for v in value if isinstance(v, str)]
        return []

    if fields:
        parts = [s for f in fields for s in strings(record.get(f))]
    else:
        named = next((k for k in ("text", "Text") if isinstance(record.get(k), str)), None)
        parts = [record[named]] if named else [s for k, v in record.items() if not k.startswith("_")
                                               for s in strings(v)]
    text = "\n".join(p for p in parts if p.strip())
    return text or None


def sample_file_texts(specs: list[str], fields: Optional[list[str]], n: int, seed: int = MAP_SEED) -> list[str]:
    """Up to ``n`` texts of a file set (JSONL, JSONL.GZ, Parquet; local or URIs), read on this process: from up to 8
    files picked at random, the head of each (a corpus of billions of rows costs a few reads), then a seeded
    sample. Malformed lines are passed over."""
    from ..corpus import (PARQUET_SUFFIXES, SUPPORTED_SUFFIXES, _jsonl_records, _parquet_records,
                         open_jsonl_stream)
    from ..paths import expand_inputs

    fs, files = expand_inputs(specs, SUPPORTED_SUFFIXES)
    rng = np.random.default_rng(seed)
    chosen = [files[i] for i in sorted(rng.permutation(len(files))[:8])]
    per_file = max(2 * n // len(chosen) + 1, 50)
    texts: list[str] = []
    for f in chosen:
        parquet = f.path.endswith(PARQUET_SUFFIXES)
        handle = fs.open_input_file(f.path) if parquet else open_jsonl_stream(fs, f.path)
        taken = 0
        with handle:
            for _, record, reason, _ in (_parquet_records(handle) if parquet else _jsonl_records(handle)):
                text = record_text(record, fields) if reason is None else None
                if text:
                    texts.append(text)
                    taken += 1
                    if taken >= per_file:
                        break
    return _pick(texts, n, rng)


def _pick(items: list, n: int, rng: np.random.Generator) -> list:
    if len(items) <= n:
        return list(items)
    return [items[i] for i in sorted(rng.choice(len(items), size=n, replace=False))]


def sample_rows(run: Run, folder: tuple[str, ...], columns: list[str], n: int, seed: int = MAP_SEED) -> list[dict]:
    """Up to ``n`` rows (only ``columns`` that exist) of a Parquet folder of the run, a seeded sample."""
    import pyarrow as pa

    dataset = parquet_folder(run, *folder)
    names = [c for c in columns if c in dataset.schema.names]
    if not names:
        raise Unreadable(f"{'/'.join(folder)}: none of the columns {', '.join(columns)}")
    try:
        total = dataset.count_rows()
        if not total:
            return []
        picks = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
        return dataset.take(pa.array(picks), columns=names).to_pylist()
    except (pa.ArrowInvalid, OSError) as e:
        raise Unreadable(f"{'/'.join(folder)}: {e}") from None


def task_items(run: Run, n: int) -> tuple[list[str], str]:
    """Items of evaluate's tasks (``evaluate/tasks/*.yaml``, their test split), as lm-eval shows them to a model
    (``doc_to_text`` rendered); held-out perplexity text is not a task item and is left out."""
    import yaml
    from jinja2.sandbox import SandboxedEnvironment

    env = SandboxedEnvironment()
    per_task: list[list[str]] = []
    names = []
    for name in run.listing("evaluate", "tasks"):
        if not name.endswith((".yaml", ".yml")):
            continue
        config = yaml.safe_load(run.read_text("evaluate", "tasks", name)) or {}
        if config.get("output_type") == "loglikelihood_rolling":
            continue
        files = ((config.get("dataset_kwargs") or {}).get("data_files") or {})
        split = config.get("test_split") or config.get("validation_split") or "test"
        chosen = files.get(split) if isinstance(files, dict) else files
        if not chosen:
            continue
        chosen = [chosen] if isinstance(chosen, str) else list(chosen)
        records = _sample_records(chosen, 4 * n)
        template = config.get("doc_to_text")
        texts = []
        for record in records:
            rendered = None
            if isinstance(template, str) and "{{" in template:
                try:
                    rendered = env.from_string(template).render(**record).strip()
                except Exception:  # noqa: BLE001 - a template this page cannot render: the row's strings instead
                    rendered = None
            texts.append(rendered or record_text(record))
        texts = [t for t in texts if t]
        if texts:
            per_task.append(texts)
            names.append(config.get("task") or name.rsplit(".", 1)[0])
    return _spread(per_task, n), "evaluate's tasks: " + ", ".join(names)


def _sample_records(specs: list[str], n: int) -> list[dict]:
    """Up to ``n`` records of data files (``.json`` as JSON Lines, as lm-eval's json loader reads them too)."""
    from ..corpus import PARQUET_SUFFIXES, _jsonl_records, _parquet_records, open_jsonl_stream

    records: list[dict] = []
    for spec in specs:
        fs, path = paths.resolve(spec)
        parquet = path.endswith(PARQUET_SUFFIXES)
        handle = fs.open_input_file(path) if parquet else open_jsonl_stream(fs, path)
        with handle:
            for _, record, reason, _ in (_parquet_records(handle) if parquet else _jsonl_records(handle)):
                if reason is None and isinstance(record, dict):
                    records.append(record)
                    if len(records) >= n:
                        return records
    return records


def _spread(lists: list[list[str]], n: int, seed: int = MAP_SEED) -> list[str]:
    """Up to ``n`` items drawn evenly from each list (a short list's share goes to the others)."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    remaining = [list(x) for x in lists if x]
    while remaining and len(out) < n:
        share = max(1, (n - len(out)) // len(remaining))
        short = [x for x in remaining if len(x) <= share]
        if short:
            for x in short:
                out += x
            remaining = [x for x in remaining if len(x) > share]
            continue
        for x in remaining:
            out += _pick(x, min(share, n - len(out)), rng)
        break
    return out[:n]


def _from_entries(entries: list[dict], n: int) -> tuple[list[str], str]:
    lists, names = [], []
    for e in entries:
        lists.append(sample_file_texts(e["paths"], e.get("fields"), n))
        names.append(e.get("what") or ", ".join(e["paths"]))
    return _spread(lists, n), ", ".join(names)
