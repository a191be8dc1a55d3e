"""Batch generation: the Ray Data actor that holds an engine and turns a batch of prompt rows into completion rows.

A row that cannot be generated (its prompt too long for the context, an engine error on it alone) is handed to
``on_failure`` with its reason and left out; the rest of the batch goes on. When every row of a batch fails, the
engine is asked for one token of a one-word prompt: if that fails too, the engine itself is broken (a lost device,
a model that cannot run) and ``EngineBroken`` fails the stage instead of quarantining every row. When the actor's
process dies, Ray Data restarts it and runs the batch again (up to the pool's ``max_restarts``), so rows are
retried, not lost; ``on_failure`` must therefore be idempotent.
"""

from __future__ import annotations

import json
import logging
from typing import Callable, Optional

import numpy as np
import pyarrow as pa

from .engines import Completion, SamplingParams, load_engine
from .soft_prompt import load_soft_prompt

logger = logging.getLogger(__name__)
# Columns the actor adds to each output row (one row per completion).
OUTPUT_COLUMNS = ("choice", "completion", "finish_reason", "prompt_tokens", "completion_tokens")


PROBE_PROMPT = "Hello"


class EngineBroken(RuntimeError):
    """The engine fails on a one-word prompt as well as on every row: the fault is the engine's, not the rows'."""


class GenerateBatch:
    def __init__(self, model: str, params: dict, prompt_field: str, on_failure: Callable[[list[dict]], None],
                 engine: str = "transformers", engine_options: Optional[dict] = None, chat: bool = False,
                 system_prompt: Optional[str] = None, soft_prompt: Optional[str] = None,
                 failure_columns: tuple[str, ...] = (), schema_column: Optional[str] = None,
                 seed_column: Optional[str] = None):
        self.engine = load_engine(model, engine, **(engine_options or {}))
        self.params = SamplingParams.model_validate(params)
        self.prefix = load_soft_prompt(soft_prompt) if soft_prompt else None
        self.engine.check_prefix(self.prefix)
        self.prompt_field, self.chat, self.system_prompt = prompt_field, chat, system_prompt
        self.on_failure, self.failure_columns = on_failure, failure_columns
        self.schema_column, self.seed_column = schema_column, seed_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts = [self._prompt(text) for text in batch.column(self.prompt_field).to_pylist()]
        results: list[list[Completion] | str] = [self._too_long(p) or [] for p in prompts]
        for params, rows in self._calls(batch, [i for i, r in enumerate(results) if not r]):
            try:
                for i, row in zip(rows, self.engine.generate([prompts[i] for i in rows], params, self.prefix)):
                    results[i] = row
            except Exception:  # one bad row must not sink its batch: try each alone, set aside those that fail
                logger.warning("a batch of %d prompts failed; generating them one by one", len(rows), exc_info=True)
                for i in rows:
                    try:
                        results[i] = self.engine.generate([prompts[i]], params, self.prefix)[0]
                    except Exception as e:
                        results[i] = f"generation failed: {type(e).__name__}: {e}"
        failed = [i for i, r in enumerate(results) if isinstance(r, str)]
        if failed and len(failed) == len(results) and not any(r.startswith("prompt too long") for r in results):
            self._check_engine_works(results[failed[0]])
        if failed:
            rows = batch.select(list(self.failure_columns)).take(failed).to_pylist() if self.failure_columns else \
                [{} for _ in failed]
            self.on_failure([{**row, "reason": results[i], "prompt": prompts[i][:500]}
                             for row, i in zip(rows, failed)])
        return self._completion_rows(batch, results)

    def _check_engine_works(self, row_error: str) -> None:
        """Raise EngineBroken when the engine cannot answer a one-word prompt either (after every row failed)."""
        probe = SamplingParams(temperature=0.0, max_tokens=1)
        try:
            self.engine.generate([self._prompt(PROBE_PROMPT)], probe, self.prefix)
        except Exception as e:
            raise EngineBroken(f"the engine fails on every row and on a one-word probe prompt: {type(e).__name__}: "
                               f"{e} (the rows' error: {row_error})") from e

    def _calls(self, batch: pa.Table, rows: list[int]) -> list[tuple[SamplingParams, list[int]]]:
        """The engine calls for ``rows``: one, unless rows carry their own JSON schema (``schema_column``, a JSON
        string; rows sharing one go together). With a seed and ``seed_column``, a call's seed is offset by its
        rows' smallest value there, so that batches of identical prompts (DOMINO's) do not repeat each other."""
        if not rows:
            return []
        schemas = batch.column(self.schema_column).to_pylist() if self.schema_column else [None] * len(batch)
        offsets = batch.column(self.seed_column).to_pylist() if self.seed_column else None
        groups: dict[str | None, list[int]] = {}
        for i in rows:
            groups.setdefault(schemas[i], []).append(i)
        calls = []
        for schema, members in groups.items():
            update = {"json_schema": json.loads(schema)} if schema else {}
            if offsets is not None and self.params.seed is not None:
                update["seed"] = self.params.seed + int(min(offsets[i] for i in members))
            calls.append((self.params.model_copy(update=update), members))
        return calls

    def _prompt(self, text: str) -> str:
        if not self.chat:
            return text
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return self.engine.chat_prompt(messages + [{"role": "user", "content": text}])

    def _too_long(self, prompt: str) -> str | None:
        overflow = self.engine.context_overflow(prompt, self.params, self.prefix)
        return f"prompt too long: {overflow}" if overflow else None

    @staticmethod
    def _completion_rows(batch: pa.Table, results: list) -> pa.Table:
        """Each input row repeated once per completion, with the completion's columns appended."""
        done = [(i, j, c) for i, row in enumerate(results) if isinstance(row, list) for j, c in enumerate(row)]
        out = batch.take(pa.array(np.asarray([i for i, _, _ in done], dtype=np.int64)))
        choice = np.asarray([j for _, j, _ in done], dtype=np.int64)
        completions = [c for _, _, c in done]
        columns = {"choice": pa.array(choice), "completion": pa.array([c.text for c in completions], pa.string()),
                   "finish_reason": pa.array([c.finish_reason for c in completions], pa.string()),
                   "prompt_tokens": pa.array([c.prompt_tokens for c in completions], pa.int64()),
                   "completion_tokens": pa.array([c.completion_tokens for c in completions], pa.int64())}
        for name in OUTPUT_COLUMNS:
            if name in out.column_names:  # an input field of the same name: ours wins, theirs is kept renamed
                out = out.rename_columns([f"input_{c}" if c == name else c for c in out.column_names])
            out = out.append_column(name, columns[name])
        return out
