"""DOMINO synthesis — new in-domain inputs sampled from the domain soft prompt Z alone (temperature 0.8), then,
optionally, each kept input answered by the same LLM (SFT pairs).

Every sample has the same prompt (Z, then ``domino.prompt``, empty by default), so what makes samples differ is the
sampling: each engine call's seed is offset by its first sample's number, so that batches do not repeat each other
and a rerun with the same seed repeats the run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import pyarrow as pa
from pydantic import Field, field_validator

from ...actors.engines import SamplingParams
from ..schema import InputPath, Strict
from .generate import sampling_overrides
from .prompts import PromptTemplate, check_renders, load_template

if TYPE_CHECKING:
    from .synthesize import SynthesizeConfig


RESPONSE_SAMPLING = {"temperature": 0.0, "max_tokens": 1024}


class DominoConfig(Strict):
    """DOMINO: new inputs sampled from the domain soft prompt Z (nothing else in the prompt), optionally answered."""
    soft_prompt: Optional[InputPath] = Field(None, description="The domain soft prompt: [m, hidden] .safetensors, "
                                             ".npy or PEFT folder; null = this run's softprompt output.")
    num_samples: int = Field(1000, gt=0, description="Inputs to sample (the authors: 40k-80k).")
    prompt: str = Field("", description="Text after the soft prompt (empty: sample from p(x | Z) alone).")
    min_input_chars: int = Field(20, ge=1, description="Shortest sampled input kept.")
    respond: bool = Field(False, description="Let the same LLM write each kept input's output (SFT pairs).")
    response_sampling: dict[str, Any] = Field(default_factory=dict, description="respond: sampling overrides "
                                              "(default greedy, max_tokens 1024).")

    @property
    def effective_response_sampling(self) -> SamplingParams:
        return sampling_overrides(self.response_sampling, RESPONSE_SAMPLING)

    @field_validator("response_sampling")
    @classmethod
    def _valid_response_sampling(cls, value: dict) -> dict:
        sampling_overrides(value, RESPONSE_SAMPLING)
        return value

RESPONSE_VARIABLES = {"input"}


def prepare(cfg: SynthesizeConfig, hidden_size: int | None, soft_prompt_exists: bool = True) \
        -> PromptTemplate | None:
    """The soft prompt checked against the model (when its config is at hand, and the soft prompt is there: at
    preflight, this run's softprompt stage has not written its own yet), and the response template."""
    from ...actors.soft_prompt import load_soft_prompt

    if soft_prompt_exists:
        try:
            prefix = load_soft_prompt(cfg.domino.soft_prompt)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"synthesize.domino.soft_prompt: {e}") from None
        if hidden_size is not None and (prefix.ndim != 2 or prefix.shape[1] != hidden_size):
            raise ValueError(f"synthesize.domino.soft_prompt: shape {list(prefix.shape)}, but {cfg.model} has "
                             f"hidden size {hidden_size} (expected [m, {hidden_size}])")
    if not cfg.domino.respond:
        return None
    template = load_template(cfg.template, "domino_response", "synthesize.template", RESPONSE_VARIABLES,
                             RESPONSE_VARIABLES)
    check_renders(template, "synthesize.template", input="An example input.")
    return template


def sample_table(cfg: SynthesizeConfig) -> pa.Table:
    """One row per sample to draw; ``_seed`` numbers them for the per-call seed offset."""
    n = cfg.domino.num_samples
    return pa.table({
        "id": pa.array([f"domino-{i:07d}" for i in range(n)], pa.string()),
        "_prompt": pa.array([cfg.domino.prompt] * n, pa.string()),
        "_seed": pa.array(range(n), pa.int64()),
        "_source_file": pa.array([cfg.domino.soft_prompt] * n, pa.string()),
        "_source_line": pa.array(range(1, n + 1), pa.int64()),
        "_order": pa.array(range(n), pa.int64()),
    })


def validate_input(text: str, finish_reason: str, min_chars: int) -> tuple[str, str] | None:
    if finish_reason == "length":
        return "truncated", "the sample reached max_tokens before it ended"
    if len(text.strip()) < min_chars:
        return "too_short", f"{len(text.strip())} characters (min {min_chars})"
    return None


def validate_response(text: str, finish_reason: str) -> tuple[str, str] | None:
    if finish_reason == "length":
        return "response_truncated", "the response reached max_tokens before it ended"
    if not text.strip():
        return "empty_response", "the LLM wrote nothing"
    return None
