"""Tiny real models for tests and the demo: a Llama-architecture model and a tokenizer trained here, on the bundled
example texts. No weights are downloaded; the same engine and scorer code that loads a 8B model loads these.

- ``make_tiny_llama(DIR)``: a causal LM (``LlamaForCausalLM``), head_dim 64, with a chat template.
- ``make_tiny_llama(DIR, task="sequence-classification", num_labels=1)``: the same body with a regression or
  classification head (``LlamaForSequenceClassification``), e.g. a stand-in for an educational-value classifier.

Weights are random (seeded), so generations are gibberish but deterministic; tests assert on behaviour, not prose.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Iterator, Literal

PACKAGE_DIR = Path(__file__).resolve().parent.parent
EXAMPLE_TEXTS = PACKAGE_DIR / "examples" / "data"
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
# A minimal ChatML-style template, so chat completions work against the tiny model exactly as against a real one.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


# The tokenizer's training corpus, named (not globbed): a file added to the examples must not change the tiny model
# that tests and benchmarks have pinned their expectations to.
TOKENIZER_FILES = ("craft_bioqa_fewshot.jsonl", "eval_bioqa.jsonl", "medical_in_domain.jsonl", "prompts.jsonl",
                   "corpus/web-000.jsonl.gz", "corpus/web-001.jsonl.gz", "corpus/web-002.jsonl.gz")


def example_texts(limit: int = 3000) -> Iterator[str]:
    """Texts of the bundled example data (JSONL and JSONL.GZ), the tokenizer's training corpus."""
    files = [EXAMPLE_TEXTS / name for name in TOKENIZER_FILES]
    n = 0
    for path in files:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                try:
                    text = json.loads(line).get("text")
                except (json.JSONDecodeError, AttributeError):
                    continue
                if isinstance(text, str) and text.strip():
                    yield text
                    n += 1
                    if n >= limit:
                        return


def train_tokenizer(vocab_size: int = 2048):
    """A byte-level BPE tokenizer trained on the example texts, wrapped as a Hugging Face fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(example_texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_llama(out_dir: str | Path, task: Literal["causal-lm", "sequence-classification"] = "causal-lm",
                    num_labels: int = 1, hidden_size: int = 128, num_layers: int = 2, vocab_size: int = 2048,
                    max_positions: int = 1024, seed: int = 0) -> Path:
    """Write a tiny Llama model and its tokenizer to ``out_dir`` (Hugging Face format, safetensors); returns it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocab_size)
    head_dim = 64  # what vLLM's attention kernels expect of real models
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=hidden_size // head_dim, num_key_value_heads=1,
        head_dim=head_dim, max_position_embeddings=max_positions, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, num_labels=num_labels,
    )
    torch.manual_seed(seed)
    model_class = LlamaForCausalLM if task == "causal-lm" else LlamaForSequenceClassification
    model = model_class(config).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
