"""Soft prompts on disk: a ``[m, hidden]`` matrix of embeddings that engines place before a prompt's tokens.

Read from a PEFT prompt-tuning adapter folder (``adapter_model.safetensors``, tensor ``prompt_embeddings``: what
DOMINO's soft-prompt learning writes), a ``.safetensors`` file (that tensor, or its only tensor) or a ``.npy`` file.
"""

from __future__ import annotations

import os

import numpy as np

PEFT_TENSOR = "prompt_embeddings"
PEFT_WEIGHTS = "adapter_model.safetensors"


def load_soft_prompt(path: str) -> np.ndarray:
    """The soft prompt at ``path`` as float32 ``[m, hidden]``; ValueError naming the path when it is not one."""
    if os.path.isdir(path):
        path = os.path.join(path, PEFT_WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"soft prompt: no file at {path!r} (expected a PEFT prompt-tuning adapter folder, "
                                f".safetensors or .npy)")
    if path.endswith(".npy"):
        matrix = np.load(path, allow_pickle=False)
    elif path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        tensors = load_file(path)
        if PEFT_TENSOR in tensors:
            matrix = tensors[PEFT_TENSOR]
        elif len(tensors) == 1:
            matrix = next(iter(tensors.values()))
        else:
            raise ValueError(f"soft prompt {path!r}: no {PEFT_TENSOR!r} tensor among {sorted(tensors)}")
    else:
        raise ValueError(f"soft prompt {path!r}: expected a folder, .safetensors or .npy")
    if matrix.ndim != 2 or matrix.shape[0] == 0:
        raise ValueError(f"soft prompt {path!r}: expected a [tokens, hidden] matrix, got shape {list(matrix.shape)}")
    return matrix.astype(np.float32)


def save_soft_prompt(matrix: np.ndarray, path: str) -> str:
    """Write ``matrix`` as a ``.safetensors`` file with PEFT's tensor name."""
    from safetensors.numpy import save_file

    save_file({PEFT_TENSOR: np.ascontiguousarray(matrix, dtype=np.float32)}, path)
    return path
