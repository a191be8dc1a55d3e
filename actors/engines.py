"""LLM engines behind one small interface: text prompts, or a soft-prompt prefix (a ``[m, hidden]`` tensor of
embeddings placed before the prompt's token embeddings), with sampling parameters.

``TransformersEngine`` runs any Hugging Face causal LM (``inputs_embeds`` for prefixes) on CPU or GPU; it is what
tests and the demo use with the tiny Llama. ``VLLMEngine`` (``actors/vllm_engine.py``) runs vLLM with
``prompt_embeds``. The Serve deployment and the batch-generation actors hold one of them, made by ``load_engine``.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator


class SamplingParams(BaseModel):
    """What a request may ask of an engine; the ranges are what the endpoint validates (a 4xx outside them)."""

    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy. Engines treat a temperature below 1e-5 as "
                                                          "0 and raise one below 0.01 to 0.01, as vLLM does (a "
                                                          "smaller divisor overflows the logits).")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 = no top-k cut.")
    max_tokens: int = Field(64, gt=0, le=8192)
    n: int = Field(1, ge=1, le=32, description="Completions per prompt.")
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1, description="Same seed, same prompt, same output. At "
                                "most 2**63 - 1 (a signed 64-bit integer, as OpenAI and vLLM take it); a larger "
                                "one is refused rather than reduced, so that two seeds never silently collide.")
    stop: list[str] = Field(default_factory=list, max_length=8)
    ignore_eos: bool = Field(False, description="vLLM's extension: write on past the end-of-sequence token until "
                                                "max_tokens (what serving benchmarks use, so that every request "
                                                "writes the same number of tokens).")
    json_schema: Optional[dict] = Field(None, description="Structured output: every completion is JSON valid "
                                                          "against this JSON schema.")

    @field_validator("json_schema")
    @classmethod
    def _is_a_json_schema(cls, value: Optional[dict]) -> Optional[dict]:
        if value is not None:
            from jsonschema import Draft202012Validator, SchemaError

            try:
                Draft202012Validator.check_schema(value)
            except SchemaError as e:
                raise ValueError(f"not a valid JSON schema: {e.message}") from None
        return value


class UnsatisfiableSchema(ValueError):
    """Structured output reached a point where the schema allows no token this engine may write (e.g. a character
    that only lone-byte tokens spell, which structured output bans): the request's schema, not the engine, is at
    fault."""


@dataclass
class Completion:
    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Delta:
    """A piece of a streamed completion; the last one carries the finish reason and the token counts."""
    text: str
    finish_reason: Optional[Literal["stop", "length"]] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


ENGINE_KINDS = ("transformers", "vllm")
# vLLM's sampling thresholds (vllm/sampling_params.py): below GREEDY_BELOW a temperature means greedy decoding;
# below MIN_TEMPERATURE it is raised to it, since dividing logits by less overflows them into inf/nan.
GREEDY_BELOW, MIN_TEMPERATURE = 1e-5, 1e-2


def effective_temperature(temperature: float) -> float:
    """The temperature an engine samples at: 0 (greedy) for a tiny one, at least MIN_TEMPERATURE otherwise."""
    return 0.0 if temperature < GREEDY_BELOW else max(temperature, MIN_TEMPERATURE)


class Engine(ABC):
    """What the Serve replicas and the batch-generation actors need of an LLM engine."""

    model_name: str
    hidden_size: int  # the width a soft-prompt prefix must have
    max_model_len: int  # prompt (prefix included) plus completion tokens
    tokenizer: object  # the Hugging Face tokenizer the engine applies to text prompts

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=True).input_ids)

    def prompt_length(self, prompt: str, prefix: np.ndarray | None = None) -> int:
        """What the model reads: the prompt's tokens (special tokens included) after the soft prompt's."""
        return self.count_tokens(prompt) + (0 if prefix is None else len(prefix))

    def chat_prompt(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @abstractmethod
    def generate(self, prompts: Sequence[str], params: SamplingParams,
                 prefix: np.ndarray | None = None) -> list[list[Completion]]:
        """``params.n`` completions for each prompt, in order. ``prefix``: ``[m, hidden_size]`` embeddings placed
        before every prompt (a soft prompt)."""

    def context_overflow(self, prompt: str, params: SamplingParams, prefix: np.ndarray | None = None,
                         tokens: int | None = None) -> str | None:
        """Why ``prompt`` (after ``prefix``) with ``params.max_tokens`` does not fit the context; None when it does.
        ``tokens``: the prompt's length when the caller has counted it already."""
        tokens = self.prompt_length(prompt, prefix) if tokens is None else tokens
        if tokens + params.max_tokens <= self.max_model_len:
            return None
        return (f"{tokens} prompt tokens (soft prompt included) plus max_tokens {params.max_tokens} exceed the "
                f"model's context of {self.max_model_len}")

    def json_schema_problem(self, schema: dict) -> str | None:
        """Why structured output cannot hold completions to ``schema``; None when it can. Both engines decode with
        xgrammar, so its compiler decides: a ``$ref`` to nothing, ``minimum`` above ``maximum`` and the like fail
        to compile, and a schema that admits no JSON value at all (a ``$ref`` to itself) compiles to a grammar
        that allows no first token."""
        import xgrammar

        try:
            grammar = self.grammar_compiler().compile_json_schema(json.dumps(schema), any_whitespace=False)
        except Exception as e:  # xgrammar raises RuntimeError("[time] file.cc:line: message")
            return _xgrammar_message(e)
        first_tokens = xgrammar.allocate_token_bitmask(1, grammar.tokenizer_info.vocab_size)
        xgrammar.GrammarMatcher(grammar).fill_next_token_bitmask(first_tokens)
        return None if bool(first_tokens.any()) else "no JSON value satisfies it (e.g. a $ref to itself)"

    def grammar_compiler(self):
        """xgrammar's compiler over this engine's vocabulary, made once; it caches what it compiles."""
        compiler = getattr(self, "_xgrammar_compiler", None)
        if compiler is None:
            import xgrammar

            info = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.grammar_vocab_size())
            compiler = self._xgrammar_compiler = xgrammar.GrammarCompiler(info)
        return compiler

    def grammar_vocab_size(self) -> int:
        """The width of the model's logits, which a grammar's token mask must cover."""
        return len(self.tokenizer)

    def check_prefix(self, prefix: np.ndarray | None) -> None:
        if prefix is not None and (prefix.ndim != 2 or prefix.shape[1] != self.hidden_size):
            raise ValueError(f"prefix: expected shape [m, {self.hidden_size}], got {list(prefix.shape)}")


def load_engine(model: str, kind: str = "transformers", **options) -> Engine:
    """The engine of ``kind`` for ``model`` (a Hugging Face id, a folder, or a model this project can make, e.g.
    ``smollm2``); ``options`` go to its constructor (``asynchronous=True`` with vLLM: the serving engine)."""
    from .smollm2 import resolve_model

    model = resolve_model(model)
    if kind == "transformers":
        return TransformersEngine(model, **options)
    if kind == "vllm":
        from .vllm_engine import AsyncVLLMEngine, VLLMEngine

        # asynchronous: vLLM's AsyncLLM, for a Serve replica (requests join one running batch, stream, abort)
        return AsyncVLLMEngine(model, **options) if options.pop("asynchronous", False) else VLLMEngine(model, **options)
    raise ValueError(f"engine: expected one of {', '.join(ENGINE_KINDS)}, got {kind!r}")


class TransformersEngine(Engine):
    """A Hugging Face causal LM. Prompts of one call are generated together (left-padded embeddings)."""

    def __init__(self, model: str, device: str | None = None, dtype: str | None = None,
                 torch_threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if torch_threads:  # an actor given N CPUs should not spread over the whole node
            torch.set_num_threads(torch_threads)
        self.model_name = model
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForCausalLM.from_pretrained(
            model, dtype=getattr(torch, dtype) if dtype else "auto").to(self.device).eval()
        self.hidden_size = self.model.config.hidden_size
        self.max_model_len = self.model.config.max_position_embeddings
        self._banned_tokens = None  # tokens structured output never allows, found on the first structured request
        self.adapters: dict[str, str] = {}  # LoRA adapters loaded beside the base weights: name -> folder
        self.lora = None  # their weights, applied per batch row (actors/multi_lora.py)

    def load_adapters(self, adapters: dict[str, str]) -> None:
        """PEFT LoRA folders (``finetune`` and ``preference`` outputs) as named adapters on the one base model in
        memory; a batch picks one per row (``self.lora.select``), and rows without one are the base model's. A folder
        that is not a LoRA adapter of this base fails here, naming it, and leaves the others loaded."""
        from .multi_lora import MultiLoRA

        for name, path in adapters.items():
            self.lora = self.lora or MultiLoRA(self.model)
            try:
                self.lora.load(name, path)
            except Exception as e:
                raise ValueError(f"adapter {name!r} ({path}): not a LoRA adapter this model can load: "
                                 f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
            self.adapters[name] = path

    def generate(self, prompts: Sequence[str], params: SamplingParams,
                 prefix: np.ndarray | None = None) -> list[list[Completion]]:
        out, lengths = self._generate_tokens(prompts, params, prefix)
        return [[self._completion(out[i * params.n + j], prompt_tokens, params) for j in range(params.n)]
                for i, prompt_tokens in enumerate(lengths)]

    def _generate_tokens(self, prompts: Sequence[str], params: SamplingParams, prefix: np.ndarray | None):
        """The generated token ids (``len(prompts) * n`` rows) and each prompt's token count."""
        import torch
        from transformers import LogitsProcessorList

        from .sampling import SampleAsLastProcessor

        self.check_prefix(prefix)
        embed = self.model.get_input_embeddings()
        rows, lengths = [], []
        with torch.no_grad():
            for i, prompt in enumerate(prompts):
                ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=True).input_ids[0].to(self.device)
                row = embed(ids)
                if prefix is not None:
                    row = torch.cat([torch.as_tensor(prefix, dtype=row.dtype, device=self.device), row])
                if not len(row):  # vLLM refuses these too ("the decoder prompt cannot be empty")
                    raise ValueError(f"prompt {i} is empty: it has no tokens (this tokenizer adds no BOS token)")
                rows.append(row)
                lengths.append(len(ids))
            width = max(len(r) for r in rows)
            inputs = torch.zeros(len(rows), width, self.hidden_size, dtype=rows[0].dtype, device=self.device)
            mask = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
            for i, row in enumerate(rows):  # left padding: every row ends where generation starts
                inputs[i, width - len(row):] = row
                mask[i, width - len(row):] = 1
            if params.seed is not None:  # a derived seed (seed + offset) may pass 2**64 - 1, torch's largest
                torch.manual_seed(params.seed % 2**64)
            temperature = effective_temperature(params.temperature)
            processors = self._json_constraint(params.json_schema) if params.json_schema else LogitsProcessorList()
            copies = 1  # greedy decoding gives every copy the same text: decode once, repeat it n times (as vLLM)
            if temperature > 0:  # sampled: our sampler draws, last, and greedy decoding emits what it drew
                processors.append(SampleAsLastProcessor(temperature, params.top_p, params.top_k))
                copies = params.n
                inputs, mask = inputs.repeat_interleave(copies, dim=0), mask.repeat_interleave(copies, dim=0)
            out = self.model.generate(
                inputs_embeds=inputs, attention_mask=mask, max_new_tokens=params.max_tokens, do_sample=False,
                temperature=None, top_p=None, top_k=None,  # not the model's generation-config values: ours decide
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=None if params.ignore_eos else self.tokenizer.eos_token_id,
                stop_strings=params.stop or None, tokenizer=self.tokenizer if params.stop else None,
                logits_processor=processors)
        if copies != params.n:
            out = out.repeat_interleave(params.n, dim=0)
        return out, lengths

    def _json_constraint(self, schema: dict) -> list:
        """Logits processors that keep every sequence a prefix of compact JSON valid against ``schema``: xgrammar's
        grammar mask (what vLLM uses for structured output) plus a ban on two kinds of tokens xgrammar lets into
        strings: control characters (JSON forbids them unescaped) and lone bytes of a multi-byte character (they can
        end up as invalid UTF-8, and a string's length in characters then differs from what the grammar counted)."""
        import torch
        from transformers import LogitsProcessorList
        from xgrammar.contrib.hf import LogitsProcessor

        grammar = self.compiled_json_schema(schema)
        return LogitsProcessorList([_BanTokens(self.banned_json_tokens()), LogitsProcessor(grammar),
                                    _refuse_dead_ends])

    def compiled_json_schema(self, schema: dict):
        """xgrammar's grammar for compact JSON valid against ``schema`` (the compiler caches it)."""
        return self.grammar_compiler().compile_json_schema(json.dumps(schema), any_whitespace=False)

    def banned_json_tokens(self):
        """Tokens structured output never allows (see ``_json_constraint``), found once."""
        import torch

        if self._banned_tokens is None:
            special = set(self.tokenizer.all_special_ids)
            self._banned_tokens = torch.tensor([
                t for t in range(len(self.tokenizer)) if t not in special
                and not_json_text(self.tokenizer.decode([t]))], dtype=torch.long)
        return self._banned_tokens

    def constrain_to_json(self, matcher, scores):
        """``scores`` (one row) with every token ``matcher``'s grammar, or structured output, rules out at -inf:
        the same constraint as ``_json_constraint``, for one sequence of a continuous batch."""
        import xgrammar

        mask = xgrammar.allocate_token_bitmask(1, self.grammar_vocab_size())
        matcher.fill_next_token_bitmask(mask)
        scores = scores.clone()
        xgrammar.apply_token_bitmask_inplace(scores, mask.to(scores.device))
        scores = _BanTokens(self.banned_json_tokens())(None, scores)
        return _refuse_dead_ends(None, scores)

    def grammar_vocab_size(self) -> int:
        return self.model.config.vocab_size

    def _completion(self, tokens, prompt_tokens: int, params: SamplingParams) -> Completion:
        ids = tokens.tolist()
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        ended = eos in ids and not params.ignore_eos
        if ended:
            ids = ids[:ids.index(eos)]
        elif not params.ignore_eos:  # rows that ended early are padded; with ignore_eos every row runs to the end
            ids = [t for t in ids if t != pad]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = _first_stop(text, params.stop)
        if cut >= 0:  # the stop string itself is not returned (OpenAI's convention)
            text, ended = text[:cut], True
        return Completion(text=text, finish_reason="stop" if ended else "length", prompt_tokens=prompt_tokens,
                          completion_tokens=len(ids))


def _first_stop(text: str, stops: Sequence[str]) -> int:
    """Where the earliest stop string starts in ``text``; -1 when none is there."""
    return min((text.find(s) for s in stops if s in text), default=-1)


def _xgrammar_message(error: Exception) -> str:
    """xgrammar's error text without its time stamp, C++ source location and failed-check preamble."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", text)
    return re.sub(r"^Check failed: \(.*?\) is false:\s*", "", text)


def not_json_text(token_text: str) -> bool:
    return "\ufffd" in token_text or any(ord(c) < 32 for c in token_text)


def _refuse_dead_ends(input_ids, scores):
    """The last logits processor of structured output: a row with every token ruled out would be sampled from
    NaNs (or decoded greedily into a token the grammar then rejects); say why instead."""
    import torch

    if bool(torch.isneginf(scores).all(dim=-1).any()):
        where = "" if input_ids is None else f" at generated token {input_ids.shape[-1] + 1}"
        raise UnsatisfiableSchema(f"the JSON schema cannot be completed with this model's tokens (none is allowed"
                                  f"{where})")
    return scores


class _BanTokens:
    """A logits processor that rules some tokens out entirely."""

    def __init__(self, token_ids):
        self.token_ids = token_ids

    def __call__(self, input_ids, scores):
        scores[:, self.token_ids.to(scores.device)] = float("-inf")
        return scores
