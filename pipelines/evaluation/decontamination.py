"""Which evaluation items did each model see in training? The decontamination report of ``evaluate``.

An evaluation item is what lm-eval scores: the prompt as the model sees it with its gold answer (``doc_to_text``,
lm-eval's target delimiter, the correct choice or the target; a perplexity task's document), as lm-eval builds it
from the task YAMLs ``evaluate`` writes (``<run>/evaluate/tasks/``), the first ``limit`` items as evaluate scores them.
Each string of the item's own row in the dataset (question, context, each choice, ...) is looked for on its own too,
as ``qc`` looks for each string of an evaluation file's row: a training text that copies a question rarely copies the
template's words around it.

An item overlaps a model's training data by ``qc``'s rule (``pipelines/synthesis/qc.py``, same hashes): a training
row shares a word ``ngram``-gram (13) with one of the item's texts, or contains one of its texts of
``SHORT_ITEM_MIN_WORDS`` to ngram - 1 words whole, or is a shorter text of it whole. Unlike qc, which drops a sample at
its first hit, every item a row overlaps is found (a row may hold many items). One rule is added: a gram (or short
text) found in several items of a task whose prompts differ is the task's template or shared boilerplate
(financial_phrasebank's 13-word question is in all 4,846 of its items, MMLU choice lists repeat), not evidence that
one of them leaked; such grams are ignored, and counted (``ignored_shared_ngrams``).

What a model was trained on follows the recipe (``training_sources``): a pretrain stage's model saw its stage's data
and replay text and every earlier stage's (cumulative); finetune adds the conversations it trained on
(``<run>/finetune/samples/train``), preference its pairs (``<run>/preference/pairs/train``), the soft prompt its
references. Replayed general text counts whole although only a share of it was sampled, and pretrain's held-out
blocks (drawn out of the first stage's data when no eval text is given) count too: an upper bound. The base model's
own training data is not known.

How it runs: the items are hashed once, in the driver (small), and put in the object store; each training source is
read once however many models saw it, by Ray Data read tasks (one per file) mapping batches of rows to the items
they overlap: plain text through ``read_corpus`` (malformed rows flow on marked, and are counted here, never
parsed twice), the conversations finetune and preference wrote (lists of turns, which ``read_corpus`` only takes
whole as a chat) through the same per-line and per-row parsers of ``pipelines/corpus.py``, file by file. Only the
first hit of each item per batch comes back to the driver, with row counts: memory is bounded by the items, never
by the training data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ...actors import minhash
from .. import paths
from ..corpus import (ORDER, PARQUET_SUFFIXES, QUARANTINE_REASON, SOURCE_FILE, SOURCE_LINE, SUPPORTED_SUFFIXES,
                      CorpusSpec, read_corpus, without_operator_reservations)
from ..synthesis.qc import SHORT_ITEM_MIN_WORDS, eval_grams

NGRAM = 13
EXAMPLES = 3  # per model and task
BATCH_ROWS = 1024  # training rows hashed at a time
SKIP_EXAMPLES = 3  # malformed rows named per source
_NO_HIT = np.iinfo(np.int64).max
_HITS_SCHEMA = pa.schema([("item", pa.int32()), ("order", pa.int64()), ("file", pa.string()), ("line", pa.int64()),
                          ("shared", pa.string()), ("rows", pa.int64()), ("skipped", pa.int64()),
                          ("reason", pa.string())])
_STATS, _SKIP = -1, -2  # ``item`` of a batch's counts row and of a malformed row named


# -------------------------------------------------------------------------------------------------------- the items
@dataclass(frozen=True)
class EvalItem:
    """One evaluated item: ``text`` as the model sees it with its gold answer; ``prompt``, the part before the
    answer (items with the same prompt are one item twice); ``fields``, the strings of its row in the dataset."""
    text: str
    prompt: str = ""
    fields: tuple[str, ...] = ()


def eval_items(task_yaml_paths: Union[str, Iterable[Union[str, dict]]],
               limit: Optional[int] = None) -> dict[str, list[EvalItem]]:
    """Each task's evaluated items (the first ``limit``, in lm-eval's order), from lm-eval task YAMLs: files, a folder
    of them (``<run>/evaluate/tasks``), or the config dicts themselves (``evaluate.task_configs``: no YAML read back
    from a run folder that may be remote). lm-eval builds each task (``tasks.user_task_config`` then
    ``ConfigurableTask``, as evaluate checks them) and renders each item; a task that cannot be built raises
    ``TaskFileError`` naming the file."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    from .tasks import TaskFileError, user_task_config

    datasets.disable_progress_bars()
    items: dict[str, list[EvalItem]] = {}
    for spec in _task_specs(task_yaml_paths):
        config, where = (dict(spec), f"task {spec.get('task')}") if isinstance(spec, dict) else (
            user_task_config(spec), f"task file {spec}")
        try:
            task = ConfigurableTask(config=dict(config))
            items[config["task"]] = [_item(task, doc) for _, doc in task.doc_iterator(limit=limit)]
        except Exception as e:  # lm-eval's complaint, the file named
            raise TaskFileError(f"{where}: lm-eval cannot render its items: {type(e).__name__}: {e}") from None
    return items


def _task_specs(specs) -> list[Union[str, dict]]:
    out: list[Union[str, dict]] = []
    for spec in [specs] if isinstance(specs, (str, os.PathLike, dict)) else specs:
        if isinstance(spec, dict):
            out.append(spec)
        elif os.path.isdir(spec):
            out += sorted(str(p) for p in Path(spec).iterdir() if p.suffix in (".yaml", ".yml"))
        else:
            out.append(str(spec))
    return out


def _item(task, doc: dict) -> EvalItem:
    kind = task.OUTPUT_TYPE
    target = task.doc_to_target(doc)
    if kind == "loglikelihood_rolling":  # the document is the item
        prompt, answer = "", _one(target)
    elif kind == "multiple_choice":
        choices = task.doc_to_choice(doc)
        text = task.doc_to_text(doc)
        if getattr(task, "multiple_input", False):  # the choices are contexts; the text picks the right one
            prompt, answer = _pick(choices, text), _one(target)
        else:
            prompt, answer = text, _pick(choices, target)
    else:
        prompt, answer = task.doc_to_text(doc), _one(target)
    prompt = prompt if isinstance(prompt, str) else _one(prompt)
    delimiter = task.config.target_delimiter if isinstance(task.config.target_delimiter, str) else " "
    text = f"{prompt}{delimiter}{answer}" if prompt else answer
    own = tuple(s for v in doc.values() for s in ([v] if isinstance(v, str) else v if isinstance(v, list) else [])
                if isinstance(s, str) and s.strip())
    return EvalItem(text, prompt or answer, own)


def _one(value) -> str:
    if isinstance(value, list):  # several golds: the first
        value = value[0] if value else ""
    return value if isinstance(value, str) else str(value)


def _pick(choices: list, gold) -> str:
    if isinstance(gold, list):
        gold = gold[0] if gold else ""
    if isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(choices):
        return str(choices[gold])
    return _one(gold)


# --------------------------------------------------------------------------------------------- the training data
@dataclass(frozen=True)
class TrainingSource:
    """Rows a model was trained on: ``files`` (JSONL/Parquet paths, folders or globs), the ``fields`` whose texts
    are joined into a row's text; ``turns``: the fields hold conversations (lists of {role, content} turns)."""
    description: str
    files: tuple[str, ...]
    fields: tuple[str, ...] = ("text",)
    turns: bool = False

    def __iter__(self):  # unpacks as (description, files, fields)
        return iter((self.description, list(self.files), list(self.fields)))

    @property
    def key(self) -> tuple:
        return tuple(_normal(f) for f in self.files), self.fields, self.turns


def training_sources(recipe, model_label: str) -> list[TrainingSource]:
    """What the model that ``evaluate`` names ``model_label`` was trained on, as far as this recipe says (the
    base model's own data is not known: empty). Models are found as evaluate finds them (its ``models``, else the
    recipe's), then traced by their folders: a pretrain stage's model, finetune's or preference's merged model, and
    the finetune, preference or softprompt adapter put on one."""
    from .evaluate import model_labels, models_of, recipe_models

    models = models_of(recipe.evaluate, recipe) if recipe.evaluate is not None else recipe_models(recipe)
    model = dict(zip(model_labels(models), models)).get(model_label)
    if model is None:
        return []
    sources = _model_sources(model.model, recipe, depth=0)
    if model.adapter:
        sources += _adapter_sources(model.adapter, recipe)
    return _distinct(sources)


def _model_sources(model: str, recipe, depth: int) -> list[TrainingSource]:
    from ..training.finetune import MODEL_DIR, base_model
    from ..training.preference import policy_model

    run = str(recipe.run_dir)
    if depth > 4 or not model:  # a recipe that names its own output as its input: nothing more is known
        return []
    if recipe.pretrain is not None:
        for i, s in enumerate(recipe.pretrain.stages):
            if _same(model, paths.join(run, "pretrain", s.name, "model")):
                return _pretrain_sources(recipe, i)
    if recipe.finetune is not None and _same(model, paths.join(run, "finetune", MODEL_DIR)):
        return _model_sources(base_model(recipe.finetune, recipe), recipe, depth + 1) + _finetune_sources(recipe)
    if recipe.preference is not None and _same(model, paths.join(run, "preference", MODEL_DIR)):
        return (_model_sources(policy_model(recipe.preference, recipe), recipe, depth + 1)
                + _preference_sources(recipe))
    return []


def _adapter_sources(adapter: str, recipe) -> list[TrainingSource]:
    from ..training.finetune import ADAPTER_DIR
    from ..training.softprompt import SOFT_PROMPT_DIR

    run = str(recipe.run_dir)
    if recipe.finetune is not None and _same(adapter, paths.join(run, "finetune", ADAPTER_DIR)):
        return _finetune_sources(recipe)
    if recipe.preference is not None and _same(adapter, paths.join(run, "preference", ADAPTER_DIR)):
        return _preference_sources(recipe)
    if recipe.softprompt is not None and _same(adapter, paths.join(run, "softprompt", SOFT_PROMPT_DIR)):
        sp = recipe.softprompt
        return [TrainingSource("softprompt references", tuple(sp.references), (sp.text_field,))]
    return []


def _pretrain_sources(recipe, last: int) -> list[TrainingSource]:
    """Stages 0..last: each one's data and its replay of other text (an earlier stage's data is already there)."""
    from ..training.pretrain import stage_data, stage_replay

    cfg, out = recipe.pretrain, []
    for i, s in enumerate(cfg.stages[:last + 1]):
        out += [TrainingSource(f"pretrain/{s.name} data", tuple(d.files), (d.text_field,))
                for d in stage_data(s, recipe)]
        out += [TrainingSource(f"pretrain/{s.name} replay ({r.share:.0%} of its tokens, sampled from all of it)",
                               tuple(r.files), (r.text_field,))
                for r in stage_replay(cfg, i, recipe) if r.files is not None]
    return out


def _finetune_sources(recipe) -> list[TrainingSource]:
    from ..training.finetune import SAMPLES_DIR

    return [TrainingSource("finetune samples (train)", (paths.join(str(recipe.run_dir), "finetune", SAMPLES_DIR,
                                                                    "train"),), ("prompt", "completion"), turns=True)]


def _preference_sources(recipe) -> list[TrainingSource]:
    from ..training.preference import PAIRS_DIR

    return [TrainingSource("preference pairs (train)", (paths.join(str(recipe.run_dir), "preference", PAIRS_DIR,
                                                                    "train"),), ("prompt", "chosen", "rejected"),
                           turns=True)]


def _normal(path: str) -> str:
    return path.rstrip("/") if paths.is_uri(path) else os.path.normpath(os.path.abspath(path))


def _same(a: str, b: str) -> bool:
    return _normal(str(a)) == _normal(str(b))


def _distinct(sources: list[TrainingSource]) -> list[TrainingSource]:
    seen, out = set(), []
    for s in sources:
        if s.key not in seen:
            seen.add(s.key)
            out.append(s)
    return out


# --------------------------------------------------------------------------------------------------- the hashing
@dataclass
class _ItemTable:
    """Every item's texts hashed once (qc's ``EvalGrams``, less the grams ambiguous within a task), and which
    (task, index) each item number is."""
    shared: dict  # what the map tasks look up (numpy arrays)
    owners: list[tuple[str, int]]
    ignored: dict[str, int]  # task -> grams and short texts ignored as shared by several items


def _item_table(items: dict[str, list], ngram: int) -> _ItemTable:
    texts, owners, sources, prompts = [], [], [], []
    for task, task_items in items.items():
        for i, item in enumerate(task_items):
            item = item if isinstance(item, EvalItem) else EvalItem(str(item), str(item))
            for text in dict.fromkeys((item.text, *item.fields)):  # each distinct text once
                texts.append(text)
                owners.append(len(sources))
            sources.append((task, i))
            prompts.append(item.prompt or item.text)
    grams = eval_grams(texts, owners, sources, ngram)
    number = {t: k for k, t in enumerate(items)}
    task_of = np.asarray([number[t] for t, _ in sources], np.int64)
    # items with the same (normalised) prompt are one item asked twice: they do not make a gram ambiguous
    _, same_prompt = np.unique(minhash.text_hashes(prompts) if prompts else np.zeros(0, np.uint64),
                               return_inverse=True)
    keep, ignored_at = _unambiguous(grams.hashes, grams.items, task_of, same_prompt)
    keep_short, ignored_short = _unambiguous(grams.short_hashes, grams.short_items, task_of, same_prompt)
    names = list(items)
    ignored = {t: 0 for t in names}
    for t in np.concatenate([ignored_at, ignored_short]).tolist():
        ignored[names[t]] += 1
    shared = {"hashes": grams.hashes[keep], "items": grams.items[keep],
              "short_hashes": grams.short_hashes[keep_short], "short_items": grams.short_items[keep_short],
              "short_first": grams.short_first, "short_widths": grams.short_widths, "ngram": ngram}
    return _ItemTable(shared, sources, ignored)


def _unambiguous(hashes: np.ndarray, items: np.ndarray, task_of: np.ndarray,
                 prompt_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(which entries to keep: their hash is found in one item of its task, or in items with the same prompt; the
    task of each distinct (hash, task) ignored)."""
    if not len(hashes):
        return np.ones(0, bool), np.zeros(0, np.int64)
    task, prompt = task_of[items], prompt_of[items]
    order = np.lexsort((prompt, task, hashes))
    h, t, p = hashes[order], task[order], prompt[order]
    new_group = np.r_[True, (h[1:] != h[:-1]) | (t[1:] != t[:-1])]
    group = np.cumsum(new_group) - 1
    new_prompt = new_group | np.r_[True, p[1:] != p[:-1]]
    prompts_in_group = np.bincount(group, weights=new_prompt.astype(np.float64))
    ambiguous = prompts_in_group[group] > 1
    keep = np.empty(len(hashes), bool)
    keep[order] = ~ambiguous
    return keep, t[new_group & ambiguous]


def _ranges(sorted_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions of each key's matches in ``sorted_keys``, the index in ``keys`` of each)."""
    lo = np.searchsorted(sorted_keys, keys, side="left")
    count = np.searchsorted(sorted_keys, keys, side="right") - lo
    which = np.repeat(np.arange(len(keys)), count)
    first = np.repeat(np.cumsum(count) - count, count)
    return lo[which] + np.arange(len(which)) - first, which


def row_hits(word_hashes: np.ndarray, offsets: np.ndarray, shared: dict
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every (row, item) overlap of a batch of rows given as word hashes and offsets (``minhash.word_hashes``):
    (row, item, first word, words) arrays, one entry per gram or short text found (qc's rule, all hits, not the
    first). Words are positions in the batch's word array."""
    ngram, counts = shared["ngram"], np.diff(offsets)
    grams, gram_offsets = minhash.window_hashes(word_hashes, offsets, ngram, salt=minhash.NGRAM_SALT)
    at, gram = _ranges(shared["hashes"], grams)
    row = np.searchsorted(gram_offsets, gram, side="right") - 1
    rows, items = [row], [shared["items"][at]]
    starts, widths = [offsets[:-1][row] + gram - gram_offsets[row]], [np.minimum(counts[row], ngram)]
    first = shared["short_first"]
    if len(shared["short_hashes"]) and len(word_hashes):  # short texts contained whole
        near = np.minimum(np.searchsorted(first, word_hashes), len(first) - 1)
        candidates = np.flatnonzero(first[near] == word_hashes)
        for width, begins, runs in minhash.run_hashes(word_hashes, offsets, candidates, shared["short_widths"],
                                                      salt=minhash.NGRAM_SALT):
            at, run = _ranges(shared["short_hashes"], runs)
            rows.append(np.searchsorted(offsets, begins[run], side="right") - 1)
            items.append(shared["short_items"][at])
            starts.append(begins[run])
            widths.append(np.full(len(run), width))
    return tuple(np.concatenate(a).astype(np.int64) for a in (rows, items, starts, widths))


def _hits_table(texts: list[str], files: list[str], lines: np.ndarray, orders: np.ndarray, shared: dict,
                skipped: list[tuple[str, int, str]], rows_read: int) -> pa.Table:
    """A batch's first hit of each item it overlaps (with the words shared), its counts and the malformed rows."""
    words = minhash.normalised_words(texts)
    row, item, start, width = row_hits(*minhash.word_hashes(words), shared)
    first = np.lexsort((start, orders[row], item))
    keep = first[np.r_[True, item[first][1:] != item[first][:-1]]] if len(first) else first
    flat = words.flatten()
    shared_words = [" ".join(flat.slice(int(s), int(w)).to_pylist()) for s, w in zip(start[keep], width[keep])]
    n, k = len(keep), len(skipped[:SKIP_EXAMPLES])
    return pa.table({
        "item": pa.array(np.r_[item[keep], [_STATS], [_SKIP] * k].astype(np.int32)),
        "order": pa.array(np.r_[orders[row[keep]], [0] * (1 + k)].astype(np.int64)),
        "file": pa.array([files[r] for r in row[keep]] + [None] + [s[0] for s in skipped[:k]], pa.string()),
        "line": pa.array(np.r_[lines[row[keep]], [0], [s[1] for s in skipped[:k]]].astype(np.int64)),
        "shared": pa.array(shared_words + [None] * (1 + k), pa.string()),
        "rows": pa.array([0] * n + [rows_read] + [0] * k, pa.int64()),
        "skipped": pa.array([0] * n + [len(skipped)] + [0] * k, pa.int64()),
        "reason": pa.array([None] * (n + 1) + [s[2] for s in skipped[:k]], pa.string())}, schema=_HITS_SCHEMA)


def _text_of(record: dict, fields: tuple[str, ...]) -> Optional[str]:
    """The row's text: its fields' strings (a string, a list of strings, a conversation's contents) joined."""
    parts = []
    for name in fields:
        value = record.get(name)
        for part in [value] if not isinstance(value, list) else value:
            if isinstance(part, dict):
                part = part.get("content")
            if isinstance(part, str) and part.strip():
                parts.append(part)
    return "\n".join(parts) if parts else None


class _CorpusHits:
    """Ray Data map over ``read_corpus``'s batches (plain text): malformed rows, marked by the reader, are counted.
    Its output is tagged with the source's number ``tag``."""

    def __init__(self, fields: tuple[str, ...], shared, tag: int):
        self.fields, self.shared, self.tag = fields, shared, tag

    def __call__(self, batch: pa.Table) -> pa.Table:
        import ray

        shared = ray.get(self.shared)
        bad = pc.is_valid(batch.column(QUARANTINE_REASON)).to_numpy(zero_copy_only=False)
        skipped = [(r[SOURCE_FILE], r[SOURCE_LINE], r[QUARANTINE_REASON])
                   for r in batch.filter(pa.array(bad)).select([SOURCE_FILE, SOURCE_LINE, QUARANTINE_REASON])
                   .to_pylist()]
        good = batch.filter(pa.array(~bad))
        if len(self.fields) == 1:
            texts = good.column(self.fields[0]).to_pylist()
        else:
            columns = [c for c in self.fields if c in good.column_names]
            texts = [_text_of(r, self.fields) or "" for r in good.select(columns).to_pylist()]
        return _tagged(_hits_table(texts, good.column(SOURCE_FILE).to_pylist(), good.column(SOURCE_LINE).to_numpy(),
                                   good.column(ORDER).to_numpy(), shared, skipped, batch.num_rows), self.tag)


class _FileHits:
    """Ray Data map over files (one a task): each file's rows parsed by ``pipelines/corpus.py``'s own readers and
    hashed ``BATCH_ROWS`` at a time; rows that cannot be parsed, or hold no text in ``fields``, are counted."""

    def __init__(self, filesystem, fields: tuple[str, ...], shared, tag: int):
        self.fs, self.fields, self.shared, self.tag = filesystem, fields, shared, tag

    def __call__(self, batch: pa.Table) -> pa.Table:
        import ray

        shared = ray.get(self.shared)
        out = [_HITS_SCHEMA.empty_table()]
        for index, path, key in zip(*(batch.column(c).to_pylist() for c in ("index", "path", "key"))):
            for texts, files, lines, orders, skipped, read in self._chunks(path, key, index):
                out.append(_hits_table(texts, files, lines, orders, shared, skipped, read))
        return _tagged(pa.concat_tables(out), self.tag)

    def _chunks(self, path: str, key: str, index: int):
        from ..corpus import _jsonl_records, _parquet_records, open_jsonl_stream

        parquet = path.endswith(PARQUET_SUFFIXES)
        handle = self.fs.open_input_file(path) if parquet else open_jsonl_stream(self.fs, path)
        texts, lines, skipped, read = [], [], [], 0
        with handle:
            for line, record, reason, _ in (_parquet_records(handle) if parquet else _jsonl_records(handle)):
                read += 1
                text = _text_of(record, self.fields) if reason is None else None
                if text is None:
                    skipped.append((key, line, reason or f"no text in {', '.join(self.fields)}"))
                else:
                    texts.append(text)
                    lines.append(line)
                if read >= BATCH_ROWS:
                    yield self._chunk(texts, lines, key, index, skipped, read)
                    texts, lines, skipped, read = [], [], [], 0
        if read:
            yield self._chunk(texts, lines, key, index, skipped, read)

    @staticmethod
    def _chunk(texts, lines, key, index, skipped, read):
        lines = np.asarray(lines, np.int64)
        return texts, [key] * len(texts), lines, (np.int64(index) << 32) | lines, skipped, read


def _tagged(table: pa.Table, tag: int) -> pa.Table:
    return table.append_column("source", pa.array(np.full(table.num_rows, tag, np.int32)))


# ---------------------------------------------------------------------------------------------------- the scanning
@dataclass
class _Scan:
    """One training source read: per item, the first row (smallest ``_order``) overlapping it."""
    source: TrainingSource
    first: np.ndarray  # int64 per item: the hit's order, _NO_HIT when none
    example: dict[int, dict] = field(default_factory=dict)
    rows: int = 0
    skipped: int = 0
    skipped_examples: list[dict] = field(default_factory=list)
    unread: Optional[str] = None
    path_of: dict[str, str] = field(default_factory=dict)  # file key (as the readers name it) -> path


def _hits_dataset(scan: _Scan, tag: int, shared_ref):
    """The source's hits as a Ray Data dataset (None when its files cannot be listed: ``scan.unread`` says why)."""
    import ray

    from ..paths import expand_inputs

    source = scan.source
    try:
        filesystem, files = expand_inputs(list(source.files), SUPPORTED_SUFFIXES)
    except (FileNotFoundError, ValueError) as e:
        scan.unread = str(e)
        return None
    scan.path_of = {f.key: f.path for f in files}
    if source.turns:
        listing = ray.data.from_items([{"index": i, "path": f.path, "key": f.key} for i, f in enumerate(files)],
                                      override_num_blocks=len(files))
        return listing.map_batches(_FileHits(filesystem, source.fields, shared_ref, tag), batch_size=1,
                                   batch_format="pyarrow")
    return read_corpus(CorpusSpec(list(source.files), source.fields[0])).map_batches(
        _CorpusHits(source.fields, shared_ref, tag), batch_size=BATCH_ROWS, batch_format="pyarrow")


def _scan_all(sources: list[TrainingSource], shared_ref, n_items: int) -> list[_Scan]:
    """Every source read once, all in one Ray Data pass (their datasets unioned); the driver keeps, per source and
    item, the first overlapping row."""
    scans = [_Scan(s, np.full(n_items, _NO_HIT, np.int64)) for s in sources]
    datasets = [d for d in (_hits_dataset(scan, tag, shared_ref) for tag, scan in enumerate(scans)) if d is not None]
    if not datasets:
        return scans
    hits = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
    skips: list[list[dict]] = [[] for _ in scans]
    # Ray Data's per-operator reservations would split 2 CPUs among a dozen operators (a read and a map per source),
    # none with the CPU its tasks ask for: tasks waited ~10 s for the budget before each pass (measured)
    with without_operator_reservations():
        for batch in hits.iter_batches(batch_format="pyarrow", batch_size=None):
            tags = batch.column("source").to_numpy()
            for tag in np.unique(tags).tolist():
                _take(scans[tag], batch.filter(pa.array(tags == tag)), skips[tag])
    for scan, skipped in zip(scans, skips):
        skipped.sort(key=lambda s: (s["file"] or "", s["line"]))
        scan.skipped_examples = [{**s, "file": scan.path_of.get(s["file"], s["file"])}
                                 for s in skipped[:SKIP_EXAMPLES]]
    return scans


def _take(scan: _Scan, batch: pa.Table, skips: list[dict]) -> None:
    item, order = batch.column("item").to_numpy(), batch.column("order").to_numpy()
    scan.rows += int(pc.sum(batch.column("rows")).as_py() or 0)
    scan.skipped += int(pc.sum(batch.column("skipped")).as_py() or 0)
    skips += batch.filter(pa.array(item == _SKIP)).select(["file", "line", "reason"]).to_pylist()
    found = np.flatnonzero(item >= 0)
    for k in found[order[found] < scan.first[item[found]]].tolist():
        i = int(item[k])
        if order[k] < scan.first[i]:  # the same item twice in one batch: the earlier row
            file = batch.column("file")[k].as_py()
            scan.first[i] = order[k]
            scan.example[i] = {"source": scan.source.description, "file": scan.path_of.get(file, file),
                               "line": int(batch.column("line")[k].as_py()),
                               "shared": batch.column("shared")[k].as_py()}


def overlap_report(items: dict[str, list], sources: dict[str, list[TrainingSource]],
                   ngram: int = NGRAM) -> list[dict]:
    """Per model and task: the items, how many overlap what the model was trained on (``overlapping``, None when
    nothing of its training data is known or could be read), their share, up to ``EXAMPLES`` examples (item index,
    training source, file and row, the words shared), and what was read: training rows (malformed ones included),
    rows skipped as malformed (with up to 3 named), sources that could not be read and why. ``items``:
    ``eval_items``'s (or plain texts); ``sources``: model label -> ``training_sources``. Each distinct source is read
    once (one Ray Data pass over all of them), whatever number of models saw it."""
    import ray

    table = _item_table(items, ngram)
    shared_ref = ray.put(table.shared)
    distinct = _distinct([s for model in sources.values() for s in model])
    scans = {scan.source.key: scan for scan in _scan_all(distinct, shared_ref, len(table.owners))}
    base = {}  # task -> first item number
    for number, (task, index) in enumerate(table.owners):
        base.setdefault(task, number - index)
    rows = []
    for model, model_sources in sources.items():
        mine = [scans[s.key] for s in _distinct(model_sources)]
        hit = np.zeros(len(table.owners), bool)
        for scan in mine:
            hit |= scan.first != _NO_HIT
        read = [s for s in mine if s.unread is None]
        for task, task_items in items.items():
            n, lo = len(task_items), base.get(task, 0)
            found = np.flatnonzero(hit[lo:lo + n])
            examples = []
            for i in found[:EXAMPLES].tolist():
                example = next(s.example[lo + i] for s in mine if lo + i in s.example)
                examples.append({"item": i, **example})
            known = bool(read)
            rows.append({
                "model": model, "task": task, "items": n, "overlapping": len(found) if known else None,
                "share": (len(found) / n if n else 0.0) if known else None, "examples": examples,
                "ignored_shared_ngrams": table.ignored.get(task, 0),
                "sources": [s.source.description for s in mine],
                "training_rows": sum(s.rows for s in read), "skipped_rows": sum(s.skipped for s in read),
                "skipped_examples": [{"source": s.source.description, **e} for s in read
                                     for e in s.skipped_examples][:SKIP_EXAMPLES],
                "unread": {s.source.description: s.unread for s in mine if s.unread is not None}})
    return rows


def contamination_json(rows: list[dict], ngram: int = NGRAM) -> dict:
    """What ``results.json`` holds under ``contamination``."""
    return {"rule": f"a training row shares a word {ngram}-gram with an item's text or one of its row's strings, or "
                    f"contains one of {SHORT_ITEM_MIN_WORDS}-{ngram - 1} words whole, or is a shorter one whole "
                    f"(qc's rule; grams shared by items with different prompts ignored)",
            "ngram": ngram, "short_item_min_words": SHORT_ITEM_MIN_WORDS, "rows": rows}


def markdown(rows: list[dict], ngram: int = NGRAM) -> str:
    """The report's section: a table of overlapping items per model and task, then examples and what was read."""
    if not rows:
        return ""
    models = list(dict.fromkeys(r["model"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    at = {(r["model"], r["task"]): r for r in rows}
    lines = ["## Decontamination: evaluation items in each model's training data", "",
             f"Items overlapping what the model was trained on (a shared word {ngram}-gram, or a short text of the "
             f"item contained whole: qc's rule), of the items scored. n/a: the model's training data is not known "
             f"(the base model).", "",
             "| task | " + " | ".join(models) + " |", "|" + "---|" * (1 + len(models))]
    for task in tasks:
        cells = []
        for model in models:
            r = at[(model, task)]
            cells.append("n/a" if r["overlapping"] is None else
                         f"{r['overlapping']:,} / {r['items']:,} ({r['share']:.1%})")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    ignored = {r["task"]: r["ignored_shared_ngrams"] for r in rows if r["ignored_shared_ngrams"]}
    if ignored:
        lines += ["", "Ignored as shared by items with different prompts (template text, repeated choices): "
                  + ", ".join(f"{t} {k:,}" for t, k in ignored.items()) + " n-grams or short texts."]
    examples: dict[tuple, tuple[dict, list[str]]] = {}  # the same hit, seen by several models, once
    for r in rows:
        for e in r["examples"]:
            key = (r["task"], e["item"], e["source"], e["file"], e["line"])
            examples.setdefault(key, (e, []))[1].append(r["model"])
    if examples:
        lines += ["", f"Examples (up to {EXAMPLES} per model and task: the item, the models, where in the training "
                  f"data, the words shared):", ""]
        lines += [f"- {task} item {item} ({', '.join(models)}): {source}, {file} row {line}: \"{_cut(e['shared'])}\""
                  for (task, item, source, file, line), (e, models) in examples.items()]
    lines += ["", "Read per model:", ""]
    for model in models:
        r = next(r for r in rows if r["model"] == model)
        if not r["sources"]:
            lines.append(f"- {model}: training data not known")
            continue
        note = f"- {model}: {r['training_rows']:,} training rows from {', '.join(r['sources'])}"
        if r["skipped_rows"]:
            first = r["skipped_examples"][0] if r["skipped_examples"] else None
            note += f"; {r['skipped_rows']:,} malformed rows skipped" + (
                f" (e.g. {first['file']} row {first['line']}: {first['reason']})" if first else "")
        for description, why in r["unread"].items():
            note += f"; not read: {description} ({why})"
        lines.append(note)
    return "\n".join(lines) + "\n"


def _cut(text: Optional[str], limit: int = 160) -> str:
    text = (text or "").replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 1] + "…"


__all__ = ["EvalItem", "TrainingSource", "eval_items", "training_sources", "overlap_report", "row_hits",
           "contamination_json", "markdown", "NGRAM"]
