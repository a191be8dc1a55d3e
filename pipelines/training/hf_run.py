"""What pretrain, finetune and preference share on the driver: their training settings (workers, DeepSpeed,
schedule, checkpoints) and one function that runs the Hugging Face / TRL trainer of ``actors/hf_training.py`` on
Ray Train workers — with softprompt's foundation: a run named by the stage's fingerprint, checkpoints under
``<stage>/ray/<run>`` that a rerun resumes from, failures recovered from, rank 0's progress lines, Ctrl-C as an
interrupt — and draws the curves of its ``metrics.jsonl``."""

from __future__ import annotations

import json
import math
from typing import Literal, Optional, Union

from pydantic import Field

from .. import paths
from ..report import _png, _pyplot
from ..rundir import StageDir, StageError
from ..schema import Strict
from .softprompt import (PROGRESS, TrainWorkers, ProgressLines, _absolute, _forget_other_runs,
                         check_resources, fit_interruptibly)


class LoraSettings(Strict):
    """LoRA (PEFT) adapters on the frozen base."""
    r: int = Field(64, gt=0, description="Rank.")
    alpha: float = Field(64, gt=0, description="Scale (alpha / r multiplies the update).")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="Modules given adapters: all-linear (every linear layer but the output head) or "
                                  "their names, e.g. [q_proj, v_proj].")


class TrainingSettings(TrainWorkers):
    """How a model-adapting stage trains: Ray Train workers, DeepSpeed (or DDP), the optimizer's schedule, checkpoints
    and evaluation."""
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW).")
    schedule: Literal["cosine", "linear", "constant_with_warmup"] = Field("cosine", description="After warmup.")
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warmup.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping (0 = none).")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (max_steps overrides).")
    max_steps: Optional[int] = Field(None, gt=0, description="Optimizer steps in all (null = epochs decide).")
    batch_size: int = Field(4, gt=0, description="Sequences per worker per micro-batch.")
    gradient_accumulation: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (less memory).")
    seed: int = 0
    checkpoint_every: int = Field(50, gt=0, description="Steps between checkpoints (and the last step).")
    eval_every: int = Field(50, gt=0, description="Steps between evaluations on the held-out data.")
    log_every: int = Field(10, gt=0, description="Steps between progress lines and metrics.jsonl entries (and the "
                                                 "last step).")


def plan_steps(rows: int, t: TrainingSettings) -> int:
    """Optimizer steps: the given max_steps, else epochs over ``rows`` at the global batch (one step at least)."""
    if t.max_steps is not None:
        return t.max_steps
    per_step = t.batch_size * t.gradient_accumulation * t.workers
    return max(1, math.ceil(rows * t.epochs / per_step))


def fit_hf(section: str, kind: str, stage: StageDir, ray_dir: str, run_folder_name: str, t: TrainingSettings,
           loop: dict, total_steps: int, cpus: float, gpus: float) -> None:
    """Run ``actors.hf_training.train_hf`` on ``t.workers`` Ray Train workers; ``loop`` holds the data, model and
    output URIs (see ``train_hf``). Checkpoints of other runs (other settings or inputs) in ``ray_dir`` are
    removed; this run's are resumed from."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ...actors.hf_training import train_hf

    check_resources(t, cpus, gpus, section)
    use_gpu = t.gpus_per_worker > 0
    resources = {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if use_gpu else {}),
                 **t.resources_per_worker}
    _forget_other_runs(StageDir(paths.parent(ray_dir)), run_folder_name, ray_dir.rstrip("/").rsplit("/", 1)[-1])
    config = {**loop, "stage": section, "kind": kind,
              "training": {**t.model_dump(mode="json"), "strategy": t.resolved_strategy},
              "total_steps": total_steps, "torch_threads": max(1, int(t.cpus_per_worker)),
              "run_folder": _absolute(paths.join(ray_dir, run_folder_name)),
              "progress_file": _absolute(stage.child(PROGRESS))}
    trainer = TorchTrainer(
        train_hf, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=t.workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=run_folder_name, storage_path=_absolute(ray_dir),
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    with ProgressLines(stage.child(PROGRESS)):
        fit_interruptibly(trainer)
    stage.delete(PROGRESS)


def model_path(model: str) -> str:
    """Where the workers load a model from: a folder, a Hugging Face id, or the folder this project makes for
    smollm2."""
    from ...actors.smollm2 import resolve_model

    return model if paths.is_uri(model) else resolve_model(model)


def read_metrics(stage: StageDir, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (stage.read_text(name) or "").splitlines() if line.strip()]


def train_entries(history: list[dict]) -> list[dict]:
    return [h for h in history if "loss" in h and "step" in h]


def eval_entries(history: list[dict], split: str) -> list[dict]:
    return [h for h in history if f"eval_{split}_loss" in h]


def curve_png(series: list[tuple[str, list[tuple[float, float]]]], title: str, ylabel: str,
              boundaries: list[tuple[float, str]] = (), log_y: bool = False) -> bytes:
    """Lines over steps, each ``(label, [(step, value)])``, with vertical lines at ``boundaries`` (TRAIT's stage
    boundary)."""
    fig, ax = _pyplot().subplots(figsize=(7, 3.6), dpi=110)
    for label, points in series:
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(points) < 30 else None,
                    markersize=3, label=label)
    for x, label in boundaries:
        ax.axvline(x, color="#888888", linestyle="--", linewidth=0.8)
        ax.annotate(label, (x, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", fontsize=8, color="#555555")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _png(fig)


def first_last(points: list[tuple[float, float]]) -> str:
    return f"{points[0][1]:.3f} -> {points[-1][1]:.3f}" if points else "n/a"


def model_output_missing(stage: StageDir, folder: str) -> StageError:
    return StageError(f"{stage.uri}: training ended without writing {folder}/")
