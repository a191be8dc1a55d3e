"""LLM engines behind one small interface: text prompts, or a soft-prompt prefix (a ``[m, hidden]`` tensor of
embeddings placed before the prompt's token embeddings), with sampling parameters.

``TransformersEngine`` runs any Hugging Face causal LM (``inputs_embeds`` for prefixes) on CPU or GPU; it is what
tests and the demo use with the tiny Llama. The vLLM engine (``prompt_embeds``) shares this interface (issue 4, to
come); so will the Serve deployment and the batch-generation actors, which hold an engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class SamplingParams(BaseModel):
    """What a request may ask of an engine; the ranges are what the endpoint validates (a 4xx outside them)."""

    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 = no top-k cut.")
    max_tokens: int = Field(64, gt=0, le=8192)
    n: int = Field(1, ge=1, le=32, description="Completions per prompt.")
    seed: Optional[int] = Field(None, ge=0, description="Same seed, same prompt, same output.")
    stop: list[str] = Field(default_factory=list, max_length=8)


@dataclass
class Completion:
    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int


class TransformersEngine:
    """A Hugging Face causal LM. Prompts of one call are generated together (left-padded embeddings)."""

    def __init__(self, model: str, device: str | None = None, dtype: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_name = model
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForCausalLM.from_pretrained(
            model, dtype=getattr(torch, dtype) if dtype else "auto").to(self.device).eval()
        self.hidden_size = self.model.config.hidden_size
        self.max_model_len = self.model.config.max_position_embeddings

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=True).input_ids)

    def chat_prompt(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(self, prompts: Sequence[str], params: SamplingParams,
                 prefix: np.ndarray | None = None) -> list[list[Completion]]:
        """``params.n`` completions for each prompt, in order. ``prefix``: ``[m, hidden_size]`` embeddings placed
        before every prompt (a soft prompt)."""
        import torch

        if prefix is not None and (prefix.ndim != 2 or prefix.shape[1] != self.hidden_size):
            raise ValueError(f"prefix: expected shape [m, {self.hidden_size}], got {list(prefix.shape)}")
        embed = self.model.get_input_embeddings()
        rows, lengths = [], []
        with torch.no_grad():
            for prompt in prompts:
                ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=True).input_ids[0].to(self.device)
                row = embed(ids)
                if prefix is not None:
                    row = torch.cat([torch.as_tensor(prefix, dtype=row.dtype, device=self.device), row])
                rows.append(row)
                lengths.append(len(ids))
            width = max(len(r) for r in rows)
            inputs = torch.zeros(len(rows), width, self.hidden_size, dtype=rows[0].dtype, device=self.device)
            mask = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
            for i, row in enumerate(rows):  # left padding: every row ends where generation starts
                inputs[i, width - len(row):] = row
                mask[i, width - len(row):] = 1
            if params.seed is not None:
                torch.manual_seed(params.seed)
            sampling = params.temperature > 0
            out = self.model.generate(
                inputs_embeds=inputs, attention_mask=mask, max_new_tokens=params.max_tokens,
                do_sample=sampling, temperature=params.temperature if sampling else None,
                top_p=params.top_p if sampling else None, top_k=params.top_k if sampling else None,
                num_return_sequences=params.n, pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id, stop_strings=params.stop or None,
                tokenizer=self.tokenizer if params.stop else None)
        results = []
        for i, prompt_tokens in enumerate(lengths):
            results.append([self._completion(out[i * params.n + j], prompt_tokens, params)
                            for j in range(params.n)])
        return results

    def _completion(self, tokens, prompt_tokens: int, params: SamplingParams) -> Completion:
        ids = tokens.tolist()
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        ended = eos in ids
        if ended:
            ids = ids[:ids.index(eos)]
        ids = [t for t in ids if t != pad]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((text.find(s) for s in params.stop if s in text), default=-1)
        if cut >= 0:  # the stop string itself is not returned (OpenAI's convention)
            text, ended = text[:cut], True
        return Completion(text=text, finish_reason="stop" if ended else "length", prompt_tokens=prompt_tokens,
                          completion_tokens=len(ids))
