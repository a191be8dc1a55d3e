"""TRAIT's educational-value filter: pluggable quality scorers that add ``quality_score`` in [0, 1].

- ``HeuristicQualityScorer``: Gopher/C4-style rules, no model. The score is the fraction of rules a document passes.
- ``HFQualityScorer``: any Hugging Face sequence-classification model (e.g. HuggingFaceFW/fineweb-edu-classifier).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from .batches import append_score_column

# Gopher's stop-word rule: real prose uses at least two of these.
GOPHER_STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_SYMBOLS = re.compile(r"#|\.\.\.|…")
_ALPHA = re.compile(r"[^\W\d_]")


@dataclass(frozen=True)
class HeuristicRules:
    """Thresholds from Gopher (Rae et al. 2021, appendix A) and C4 (Raffel et al. 2020)."""

    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_to_word_ratio: float = 0.1
    min_alphabetic_word_fraction: float = 0.8
    min_stop_words: int = 2
    max_duplicate_line_fraction: float = 0.3
    max_ellipsis_line_fraction: float = 0.3


RULE_NAMES = (
    "word_count", "mean_word_length", "symbol_ratio", "alphabetic_words",
    "stop_words", "duplicate_lines", "ellipsis_lines",
)


def heuristic_rule_results(text: str, rules: HeuristicRules = HeuristicRules()) -> dict[str, bool]:
    """Which of the Gopher/C4 rules ``text`` passes."""
    words = text.split()
    n = len(words)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    mean_len = sum(len(w) for w in words) / n if n else 0.0
    lowered = {w.lower().strip(".,;:!?\"'()") for w in words}
    duplicate_lines = (len(lines) - len(set(lines))) / len(lines) if lines else 0.0
    ellipsis_lines = sum(line.endswith(("...", "…")) for line in lines) / len(lines) if lines else 0.0
    return {
        "word_count": rules.min_words <= n <= rules.max_words,
        "mean_word_length": rules.min_mean_word_length <= mean_len <= rules.max_mean_word_length,
        "symbol_ratio": (len(_SYMBOLS.findall(text)) / n if n else 1.0) <= rules.max_symbol_to_word_ratio,
        "alphabetic_words": (sum(bool(_ALPHA.search(w)) for w in words) / n if n else 0.0)
        >= rules.min_alphabetic_word_fraction,
        "stop_words": len(lowered & GOPHER_STOP_WORDS) >= rules.min_stop_words,
        "duplicate_lines": duplicate_lines <= rules.max_duplicate_line_fraction,
        "ellipsis_lines": ellipsis_lines <= rules.max_ellipsis_line_fraction,
    }


def heuristic_quality_score(text: str, rules: HeuristicRules = HeuristicRules()) -> float:
    results = heuristic_rule_results(text, rules)
    return sum(results.values()) / len(results)


class HeuristicQualityScorer:
    """Ray Data batch UDF (stateless, so it runs as plain tasks fused with the read)."""

    def __init__(self, text_field: str, rules: HeuristicRules = HeuristicRules()):
        self.text_field = text_field
        self.rules = rules

    def __call__(self, batch: pa.Table) -> pa.Table:
        return append_score_column(
            batch, self.text_field, "quality_score",
            lambda texts: np.array([heuristic_quality_score(t, self.rules) for t in texts], dtype=np.float32),
        )


class HFQualityScorer:
    """Ray Data actor holding a Hugging Face sequence classifier, on GPU when the actor has one.

    Scores map to [0, 1]: a regression head (one label, e.g. FineWeb-Edu's 0-5 grade) is divided by ``max_score``
    and clipped; a classification head gives the expected class index over (labels - 1), which for a binary
    classifier is P(label 1).
    """

    def __init__(self, model: str, text_field: str, max_length: int = 512, max_score: float = 5.0,
                 batch_size: int = 32):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.model = AutoModelForSequenceClassification.from_pretrained(model, dtype=dtype).to(self.device).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.text_field = text_field
        self.max_length = max_length
        self.max_score = max_score
        self.batch_size = batch_size

    def score_texts(self, texts: list[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start:start + self.batch_size]
            enc = self.tokenizer(chunk, truncation=True, max_length=self.max_length, padding=True,
                                 return_tensors="pt").to(self.device)
            with self.torch.inference_mode():
                logits = self.model(**enc).logits.float()
            if logits.shape[-1] == 1:
                scores = (logits[:, 0] / self.max_score).clamp(0.0, 1.0)
            else:
                probs = logits.softmax(-1)
                grades = self.torch.arange(logits.shape[-1], device=logits.device, dtype=probs.dtype)
                scores = (probs * grades).sum(-1) / (logits.shape[-1] - 1)
            out.append(scores.cpu().numpy())
        return np.concatenate(out).astype(np.float32)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return append_score_column(batch, self.text_field, "quality_score", self.score_texts)
