"""TRAIT step 2 — task-oriented passages: problems of different downstream tasks are grouped, and the LLM writes,
for each group, a paragraph solving each problem and an enlightenment paragraph on what they share.

Grouping follows the paper's two kinds of domain:
- entity-centred (ads, finance): problems that share one entity (``entity_field``: a query, a product, a company);
- knowledge-centred (math): problems that rest on the same knowledge, found as embedding neighbours (the
  similarity of what they ask, not of their surface alone; ``min_similarity`` bounds how far a neighbour may be).
Within a group, problems of tasks not yet in it are preferred, so a passage mixes tasks. The passage is assembled
from the original problems and the LLM's paragraphs, so a problem is never rewritten on the way.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Optional

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from ..schema import IdField, InputPaths, ModelRef, Strict
from .prompts import PromptTemplate, check_renders, copied_placeholder, load_template
from .references import read_records

if TYPE_CHECKING:
    from .synthesize import SynthesizeConfig


class TraitConfig(Strict):
    """TRAIT: problems of different downstream tasks grouped by a shared entity or shared knowledge; one passage per
    group (the problems, a paragraph solving each, an enlightenment paragraph on what they share)."""
    examples: InputPaths = Field(description="Downstream-task problems (JSONL/Parquet), one per row.")
    problem_field: str = Field("question", description="Field holding the problem.")
    answer_field: Optional[str] = Field("answer", description="Field with the reference answer; null = none.")
    task_field: Optional[str] = Field("task", description="Field naming each problem's task (a passage mixes "
                                                          "tasks); null = all one task.")
    id_field: IdField = "id"
    grouping: Literal["entity", "knowledge"] = Field(
        "knowledge", description="entity: problems sharing entity_field's value; knowledge: embedding neighbours.")
    entity_field: Optional[str] = Field(None, description="entity grouping: the field holding the shared entity.")
    group_size: int = Field(3, ge=2, le=8, description="Problems per passage (at most).")
    min_group_size: int = Field(2, ge=1, description="A group with fewer problems makes no passage.")
    min_similarity: float = Field(0.3, ge=-1, le=1, description="knowledge: cosine similarity a problem needs to "
                                                                "join a group.")
    embedding_model: ModelRef = Field("all-MiniLM-L6-v2", description="knowledge grouping and documents: "
                                                                 "sentence-transformers id or path.")
    documents: Optional[InputPaths] = Field(None, description="Optional reference documents (e.g. retrieve's output): "
                                                            "each group's prompt gets the closest one.")
    document_field: str = Field("text", description="Field holding a document's text.")
    max_document_chars: int = Field(2000, gt=0, description="A longer document is cut to this in the prompt.")
    max_problem_chars: int = Field(2000, gt=0, description="A longer problem is cut to this in the prompt.")
    min_solution_chars: int = Field(20, ge=1, description="Shortest solution paragraph kept.")
    min_enlightenment_chars: int = Field(40, ge=1, description="Shortest enlightenment paragraph kept.")

    @model_validator(mode="after")
    def _entity_needs_a_field(self) -> "TraitConfig":
        if self.grouping == "entity" and not self.entity_field:
            raise ValueError("grouping entity needs entity_field (the field holding the shared entity)")
        if self.min_group_size > self.group_size:
            raise ValueError(f"min_group_size ({self.min_group_size}) is above group_size ({self.group_size})")
        return self

TEMPLATE_VARIABLES = {"problems", "entity", "document", "json_format"}
REQUIRED_VARIABLES = {"problems"}
JSON_FORMAT = '{"solutions": ["<paragraph solving problem 1>", "..."], "enlightenment": "<paragraph>"}'


@dataclass
class Problem:
    id: str
    problem: str
    answer: str | None
    task: str | None
    entity: str | None
    file: str
    line: int


@dataclass
class Grouping:
    groups: list[list[int]] = field(default_factory=list)  # positions in the problem list
    ungrouped: dict[str, int] = field(default_factory=dict)  # problems left out, by reason


def load_problems(cfg: TraitConfig) -> list[Problem]:
    """The downstream-task examples; a row without its problem text is an error naming file and line."""
    problems = []
    for file, line, record in read_records(cfg.examples, "synthesize.trait.examples"):
        where = f"synthesize.trait.examples: {file}, line {line}"
        text = record.get(cfg.problem_field)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: field {cfg.problem_field!r} is missing or not a non-empty string (fields: "
                             f"{', '.join(record) or 'none'}); set synthesize.trait.problem_field")

        def optional(name: str | None) -> str | None:
            value = record.get(name) if name else None
            return None if value is None or str(value).strip() == "" else str(value)

        problems.append(Problem(id=str(record.get(cfg.id_field, f"{file}:{line}")), problem=text,
                                answer=optional(cfg.answer_field), task=optional(cfg.task_field),
                                entity=optional(cfg.entity_field), file=file, line=line))
    return problems


def _sizes(n: int, group_size: int) -> list[int]:
    """``n`` problems cut into as few groups of at most ``group_size`` as possible, sizes differing by one at most."""
    count = -(-n // group_size)
    return [n // count + (1 if i < n % count else 0) for i in range(count)]


def _task_interleaved(members: list[int], problems: list[Problem]) -> list[int]:
    """One problem of each task in turn, so that consecutive problems (and so each group) mix tasks."""
    by_task: dict[str | None, list[int]] = defaultdict(list)
    for m in members:
        by_task[problems[m].task].append(m)
    queues = list(by_task.values())
    order = []
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop(0))
    return order


def group_by_entity(problems: list[Problem], cfg: TraitConfig) -> Grouping:
    grouping = Grouping()
    by_entity: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(problems):
        if p.entity is None:
            grouping.ungrouped["no_entity"] = grouping.ungrouped.get("no_entity", 0) + 1
        else:
            by_entity[p.entity.strip().lower()].append(i)
    for members in by_entity.values():
        if len(members) < cfg.min_group_size:
            grouping.ungrouped["group_too_small"] = grouping.ungrouped.get("group_too_small", 0) + len(members)
            continue
        ordered, start = _task_interleaved(members, problems), 0
        for size in _sizes(len(members), cfg.group_size):
            grouping.groups.append(ordered[start:start + size])
            start += size
    return grouping


def group_by_knowledge(problems: list[Problem], vectors: np.ndarray, cfg: TraitConfig) -> Grouping:
    """Greedy: each problem not yet grouped seeds a group and takes its nearest ungrouped neighbours at cosine
    >= ``min_similarity``, problems of tasks not yet in the group first."""
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    k = min(len(problems), 8 * cfg.group_size)
    scores, neighbours = index.search(vectors, k)
    grouped = np.zeros(len(problems), bool)
    grouping = Grouping()
    for seed in range(len(problems)):
        if grouped[seed]:
            continue
        near = [int(j) for j, s in zip(neighbours[seed], scores[seed])
                if j >= 0 and j != seed and not grouped[j] and s >= cfg.min_similarity]
        group = [seed]
        for prefer_new_task in (True, False):
            for j in near:
                if len(group) == cfg.group_size:
                    break
                if j in group or (prefer_new_task and problems[j].task in {problems[g].task for g in group}):
                    continue
                group.append(j)
        if len(group) < cfg.min_group_size:
            continue  # the seed may still join a later group
        grouped[group] = True
        grouping.groups.append(group)
    left = int((~grouped).sum())
    if left:
        grouping.ungrouped["no_similar_problem"] = left
    return grouping


def output_schema(size: int, cfg: TraitConfig, max_chars: int | None) -> dict:
    def text(min_chars: int) -> dict:
        return {"type": "string", "minLength": min_chars, **({"maxLength": max(max_chars, min_chars)}
                                                            if max_chars else {})}

    return {"type": "object", "additionalProperties": False, "required": ["solutions", "enlightenment"],
            "properties": {"solutions": {"type": "array", "minItems": size, "maxItems": size,
                                         "items": text(cfg.min_solution_chars)},
                           "enlightenment": text(cfg.min_enlightenment_chars)}}


def validate(sample: dict, size: int, cfg: TraitConfig) -> tuple[str, str] | None:
    """(reason, detail) when the answer does not make a passage: one solution per problem, each paragraph long
    enough to teach something, an enlightenment paragraph."""
    solutions, enlightenment = sample.get("solutions"), sample.get("enlightenment")
    if not isinstance(solutions, list) or not isinstance(enlightenment, str) or set(sample) - {"solutions",
                                                                                            "enlightenment"}:
        return "wrong_format", "expected {solutions: [...], enlightenment: ...} and nothing else"
    copied = copied_placeholder(sample, JSON_FORMAT)
    if copied is not None:
        return "placeholder", f"copies the answer form's placeholder: {copied[:60]!r}"
    if len(solutions) != size:
        return "wrong_solution_count", f"{len(solutions)} solutions for {size} problems"
    for i, s in enumerate(solutions, 1):
        if not isinstance(s, str) or len(s.strip()) < cfg.min_solution_chars:
            return "too_short", f"solution {i} has {len(s.strip()) if isinstance(s, str) else 0} characters " \
                                f"(min {cfg.min_solution_chars})"
    if len(enlightenment.strip()) < cfg.min_enlightenment_chars:
        return "too_short", f"enlightenment of {len(enlightenment.strip())} characters " \
                            f"(min {cfg.min_enlightenment_chars})"
    return None


def passage(problems: list[dict], sample: dict) -> str:
    """The task-oriented passage: each problem with its solution, then the enlightenment."""
    parts = []
    for i, (p, solution) in enumerate(zip(problems, sample["solutions"]), 1):
        task = f" ({p['task']})" if p.get("task") else ""
        parts.append(f"Problem {i}{task}: {p['problem'].strip()}\nSolution: {solution.strip()}")
    parts.append(f"Enlightenment: {sample['enlightenment'].strip()}")
    return "\n\n".join(parts)


def prepare(cfg: SynthesizeConfig) -> tuple[PromptTemplate, list[Problem]]:
    trait = cfg.trait
    template = load_template(cfg.template, "trait", "synthesize.template", TEMPLATE_VARIABLES, REQUIRED_VARIABLES)
    problems = load_problems(trait)
    if len(problems) < trait.min_group_size:
        raise ValueError(f"synthesize.trait.examples: {len(problems)} problems, fewer than min_group_size "
                         f"({trait.min_group_size})")
    check_renders(template, "synthesize.template", problems=[_prompt_problem(p, trait) for p in problems[:2]],
                  entity=problems[0].entity, document=None, json_format=JSON_FORMAT)
    return template, problems


def _prompt_problem(p: Problem, cfg: TraitConfig) -> dict:
    return {"task": p.task, "problem": p.problem[:cfg.max_problem_chars], "answer": p.answer}


def prompt_table(cfg: SynthesizeConfig, template: PromptTemplate, problems: list[Problem], grouping: Grouping,
                 documents: list[str | None]) -> pa.Table:
    """One row per group: its prompt, the JSON schema of its answer, the problems it holds, and provenance (the
    file and line of its first problem)."""
    trait = cfg.trait
    rows = []
    for g, members in enumerate(grouping.groups):
        group = [problems[m] for m in members]
        shown = [_prompt_problem(p, trait) for p in group]
        entity = group[0].entity if trait.grouping == "entity" else None
        document = documents[g][:trait.max_document_chars] if documents[g] else None
        rows.append({
            "id": f"trait-{g:06d}", "entity": entity, "problem_ids": [p.id for p in group],
            "problems": shown, "document": document,
            "_prompt": template.render(problems=shown, entity=entity, document=document, json_format=JSON_FORMAT),
            "_json_schema": _schema_json(len(group), cfg),
            "_source_file": group[0].file, "_source_line": group[0].line, "_order": g})
    return pa.Table.from_pylist(rows)


def _schema_json(size: int, cfg: SynthesizeConfig) -> str | None:
    import json

    return json.dumps(output_schema(size, cfg.trait, cfg.max_field_chars)) if cfg.structured_output else None
