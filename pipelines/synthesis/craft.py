"""CRAFT step 4 — rewrite each retrieved document into one task sample in the format of the user's few-shots.

Each prompt holds the document and ``shots_per_prompt`` few-shots sampled from the user's examples (seeded by the
document's place in the input, so a retried batch asks the same thing). The LLM answers with JSON for the task
type; each answer is then validated as the CRAFT authors did: multiple choice has exactly ``num_options`` distinct
options and an answer letter among them, questions and summaries have minimum lengths, a summary is shorter than
its source. A valid answer is written in the few-shots' own format (``instruction``, ``output``).
"""

from __future__ import annotations

import re
import string
from typing import TYPE_CHECKING, Literal, Optional

import numpy as np
import pyarrow as pa
from pydantic import Field

from ..schema import IdField, InputPaths, Strict
from .prompts import PromptTemplate, check_renders, copied_placeholder, load_template
from .references import read_records

if TYPE_CHECKING:
    from .synthesize import SynthesizeConfig


class CraftConfig(Strict):
    """CRAFT: each retrieved document, with few-shots sampled from the user's examples, becomes one task sample."""
    documents: Optional[InputPaths] = Field(None, description="Documents to rewrite (JSONL/Parquet); null = this "
                                                            "run's retrieve output.")
    document_field: str = Field("text", description="Field holding a document's text.")
    id_field: IdField = "id"
    few_shots: Optional[InputPaths] = Field(None, description="The task's examples (CRAFT's Text/Instruction/Output "
                                                            "JSONL); null = retrieve.few_shots.")
    few_shot_fields: dict[Literal["text", "instruction", "output"], str] = Field(
        default_factory=lambda: {"text": "Text", "instruction": "Instruction", "output": "Output"},
        description="Where each part of a few-shot is: its corpus-like text, instruction and output.")
    task: Literal["multiple_choice", "qa", "summarization"] = Field(
        "multiple_choice", description="The task type: sets the JSON asked for and how samples are validated.")
    shots_per_prompt: int = Field(3, gt=0, description="Few-shots sampled into each prompt (CRAFT: 3).")
    num_options: int = Field(4, ge=2, le=8, description="multiple_choice: options per question (answer A, B, ...).")
    max_document_chars: int = Field(4000, gt=0, description="A longer document (or few-shot text) is cut to this "
                                                            "in the prompt.")
    min_question_chars: int = Field(15, ge=1, description="multiple_choice and qa: shortest question kept.")
    min_answer_chars: int = Field(1, ge=1, description="qa: shortest answer kept.")
    min_source_chars: int = Field(200, ge=1, description="summarization: shortest source text kept.")
    min_summary_chars: int = Field(40, ge=1, description="summarization: shortest summary kept (and it must be "
                                                         "shorter than its source).")
    summary_instruction: str = Field("Write a TLDR for the following text.", description="summarization: the "
                                     "instruction written before each source text.")

TEMPLATE_VARIABLES = {"document", "examples", "task", "num_options", "letters", "json_format"}
REQUIRED_VARIABLES = {"document", "examples"}
OPTION_LINE = re.compile(r"^\s*([A-H])[.)]\s+\S", re.MULTILINE)
ANSWER_LETTER = re.compile(r"^\s*\(?([A-H])\b")


class FewShotError(ValueError):
    """The few-shot file does not have the shape the task needs; names file, line and field."""


def letters(cfg: CraftConfig) -> list[str]:
    return list(string.ascii_uppercase[:cfg.num_options])


def load_few_shots(cfg: CraftConfig) -> list[dict]:
    """The few-shots as {text, instruction, output}, checked against the task: every part a non-empty string and,
    for multiple choice, ``num_options`` option lines (``A. ...``) and an answer letter among them."""
    shots = []
    for file, line, record in read_records(cfg.few_shots, "synthesize.craft.few_shots"):
        where = f"synthesize.craft.few_shots: {file}, line {line}"
        shot = {}
        for part, name in cfg.few_shot_fields.items():
            value = record.get(name)
            if not isinstance(value, str) or not value.strip():
                raise FewShotError(f"{where}: field {name!r} ({part}) is missing or not a non-empty string (fields: "
                                   f"{', '.join(record) or 'none'}); set synthesize.craft.few_shot_fields")
            shot[part] = value
        if cfg.task == "multiple_choice":
            found = OPTION_LINE.findall(shot["instruction"])
            if found != letters(cfg):
                raise FewShotError(f"{where}: a multiple-choice instruction needs option lines "
                                   f"{', '.join(f'{x}.' for x in letters(cfg))} (num_options {cfg.num_options}); "
                                   f"found {', '.join(found) or 'none'}")
            answer = ANSWER_LETTER.match(shot["output"])
            if not answer or answer.group(1) not in found:
                raise FewShotError(f"{where}: the output should start with the answer's letter "
                                   f"({', '.join(found)}), got {shot['output'][:40]!r}")
        shots.append(shot)
    return shots


def output_schema(cfg: CraftConfig, max_chars: int | None) -> dict:
    """The JSON the LLM is asked for (and, with structured output, held to)."""
    def text(min_chars: int = 1) -> dict:
        field = {"type": "string", "minLength": min_chars}
        if max_chars:
            field["maxLength"] = max(max_chars, min_chars)
        return field

    if cfg.task == "multiple_choice":
        properties = {"question": text(cfg.min_question_chars),
                      "options": {"type": "array", "minItems": cfg.num_options, "maxItems": cfg.num_options,
                                  "items": text()},
                      "answer": {"type": "string", "enum": letters(cfg)}}
    elif cfg.task == "qa":
        properties = {"question": text(cfg.min_question_chars), "answer": text(cfg.min_answer_chars)}
    else:
        properties = {"source": text(cfg.min_source_chars), "summary": text(cfg.min_summary_chars)}
    return {"type": "object", "additionalProperties": False, "required": list(properties), "properties": properties}


def json_format(cfg: CraftConfig) -> str:
    """How the JSON looks, in words the prompt can show."""
    if cfg.task == "multiple_choice":
        options = ", ".join(f'"<option {x}>"' for x in letters(cfg))
        return f'{{"question": "<question>", "options": [{options}], "answer": "<letter>"}}'
    if cfg.task == "qa":
        return '{"question": "<question>", "answer": "<answer>"}'
    return '{"source": "<source text>", "summary": "<summary>"}'


def as_json(shot: dict, cfg: CraftConfig) -> str:
    """A few-shot as the exact JSON answer that would have produced it, so that a prompt shows the format by
    example: a small model copies a placeholder form (``"<question>"``) word for word."""
    import json

    instruction, output = shot["instruction"].strip(), shot["output"].strip()
    if cfg.task == "multiple_choice":
        starts = [m.start() for m in OPTION_LINE.finditer(instruction)]  # an option may run over several lines
        options = [" ".join(instruction[a:b].strip()[2:].split()) for a, b in zip(starts, starts[1:] + [None])]
        sample = {"question": instruction[:starts[0]].strip(), "options": options,
                  "answer": ANSWER_LETTER.match(output).group(1)}
    elif cfg.task == "qa":
        sample = {"question": instruction, "answer": output}
    else:
        source = instruction.removeprefix(cfg.summary_instruction.strip()).strip()
        sample = {"source": source, "summary": output}
    return json.dumps(sample, ensure_ascii=False)


def validate(sample: dict, cfg: CraftConfig) -> tuple[str, str] | None:
    """(reason, detail) when the parsed answer is not a usable sample of the task; None when it is."""
    schema = output_schema(cfg, None)
    missing = [k for k in schema["required"] if k not in sample]
    if missing:
        return "wrong_format", f"missing {', '.join(missing)}"
    extra = sorted(set(sample) - set(schema["properties"]))
    if extra:
        return "wrong_format", f"unexpected {', '.join(extra)}"
    copied = copied_placeholder(sample, json_format(cfg))
    if copied is not None:
        return "placeholder", f"copies the answer form's placeholder: {copied[:60]!r}"
    if cfg.task == "multiple_choice":
        question, options, answer = sample["question"], sample["options"], sample["answer"]
        if not isinstance(question, str) or not isinstance(options, list) or not isinstance(answer, str):
            return "wrong_format", "question and answer must be strings, options a list"
        if len(options) != cfg.num_options:
            return "wrong_option_count", f"{len(options)} options, expected {cfg.num_options}"
        if not all(isinstance(o, str) for o in options):
            return "wrong_format", "an option is not a string"
        if not all(o.strip() for o in options):
            return "empty_option", "an option is blank"
        bare = next((o for o in options if re.fullmatch(r"\(?[A-H][.)]?", o.strip())), None)
        if bare is not None:  # a small model without the form's placeholders writes the letters as the options
            return "placeholder", f"an option is only a letter: {bare!r}"
        if len({o.strip().lower() for o in options}) < len(options):
            return "duplicate_options", "two options are the same"
        if answer.strip().rstrip(".") not in letters(cfg):
            return "bad_answer", f"answer {answer!r} is not one of {', '.join(letters(cfg))}"
        if len(question.strip()) < cfg.min_question_chars:
            return "too_short", f"question of {len(question.strip())} characters (min {cfg.min_question_chars})"
    elif cfg.task == "qa":
        if not all(isinstance(sample[k], str) for k in ("question", "answer")):
            return "wrong_format", "question and answer must be strings"
        if len(sample["question"].strip()) < cfg.min_question_chars:
            return "too_short", f"question of {len(sample['question'].strip())} characters " \
                                f"(min {cfg.min_question_chars})"
        if len(sample["answer"].strip()) < cfg.min_answer_chars:
            return "too_short", f"answer of {len(sample['answer'].strip())} characters (min {cfg.min_answer_chars})"
    else:
        if not all(isinstance(sample[k], str) for k in ("source", "summary")):
            return "wrong_format", "source and summary must be strings"
        source, summary = sample["source"].strip(), sample["summary"].strip()
        if len(source) < cfg.min_source_chars:
            return "too_short", f"source of {len(source)} characters (min {cfg.min_source_chars})"
        if len(summary) < cfg.min_summary_chars:
            return "too_short", f"summary of {len(summary)} characters (min {cfg.min_summary_chars})"
        if len(summary) >= len(source):
            return "summary_not_shorter", f"summary of {len(summary)} characters, source of {len(source)}"
    return None


def in_few_shot_format(sample: dict, cfg: CraftConfig) -> dict:
    """A valid sample as the few-shots write it: ``instruction`` and ``output``."""
    if cfg.task == "multiple_choice":
        lines = [sample["question"].strip()] + [f"{x}. {o.strip()}" for x, o in zip(letters(cfg), sample["options"])]
        return {"instruction": "\n".join(lines), "output": f"{sample['answer'].strip().rstrip('.')}."}
    if cfg.task == "qa":
        return {"instruction": sample["question"].strip(), "output": sample["answer"].strip()}
    return {"instruction": f"{cfg.summary_instruction}\n\n{sample['source'].strip()}",
            "output": sample["summary"].strip()}


class CraftPrompts:
    """Ray Data batch function: each document row gains the prompt that asks for its task sample."""

    def __init__(self, template: PromptTemplate, few_shots: list[dict], cfg: CraftConfig, order_column: str):
        self.template, self.few_shots, self.cfg, self.order_column = template, few_shots, cfg, order_column
        self.variables = {"task": cfg.task, "num_options": cfg.num_options, "letters": letters(cfg),
                          "json_format": json_format(cfg)}

    def prompt(self, document: str, order: int) -> str:
        rng = np.random.default_rng(order)  # the same document always gets the same few-shots
        k = min(self.cfg.shots_per_prompt, len(self.few_shots))
        examples = [{**self.few_shots[i], "text": self.few_shots[i]["text"][:self.cfg.max_document_chars],
                     "json": as_json(self.few_shots[i], self.cfg)}
                    for i in rng.choice(len(self.few_shots), size=k, replace=False)]
        return self.template.render(document=document[:self.cfg.max_document_chars], examples=examples,
                                    **self.variables)

    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts = [self.prompt(d, o) for d, o in zip(batch.column(self.cfg.document_field).to_pylist(),
                                                     batch.column(self.order_column).to_pylist())]
        return batch.append_column("_prompt", pa.array(prompts, pa.string()))


def prepare(cfg: SynthesizeConfig) -> tuple[PromptTemplate, list[dict]]:
    """The template and the few-shots, checked (and the template rendered once) before any generation."""
    craft = cfg.craft
    template = load_template(cfg.template, "craft", "synthesize.template", TEMPLATE_VARIABLES, REQUIRED_VARIABLES)
    shots = load_few_shots(craft)
    examples = [{**shot, "json": as_json(shot, craft)} for shot in shots[:craft.shots_per_prompt]]
    check_renders(template, "synthesize.template", document=shots[0]["text"][:craft.max_document_chars],
                  examples=examples, task=craft.task, num_options=craft.num_options,
                  letters=letters(craft), json_format=json_format(craft))
    return template, shots
