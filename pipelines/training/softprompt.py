"""DOMINO step 1 — learn the domain soft prompt Z from a few reference samples (prompt tuning on a frozen LM, plus the
contrastive term that pushes what is particular to a sample into its private prompt z_i), on Ray Train.

The references are read and tokenised on Ray Data (malformed rows quarantined), every worker of a ``TorchTrainer``
gets them all and trains on its share (``actors/softprompt_training.py``), checkpoints go to
``<stage>/ray/<run name>`` every ``checkpoint_every`` steps, and the stage writes:

- ``soft_prompt/``: a PEFT prompt-tuning folder (``adapter_config.json``, ``adapter_model.safetensors`` holding
  ``prompt_embeddings``) that PEFT, lm-eval-harness (``peft=``), our engines, ``synthesize --method domino`` and
  ``serve`` load;
- ``private_prompts.safetensors`` (DOMINO): the z_i table, in reference order;
- ``metrics.jsonl`` (one line per step), ``report.md`` with the loss curves.

A run that stops (a dead node, Ctrl-C) keeps its checkpoints: running the stage again with the same settings and
references continues from the latest one.
"""

from __future__ import annotations

import json
import os
from typing import Literal, Optional, Union

import pyarrow as pa
from pydantic import Field, model_validator

from .. import paths
from ..corpus import READ_TASK_CPUS, CorpusSpec, ORDER, column_total, read_corpus
from ..report import _png, _pyplot, markdown_table, write_report
from ..rundir import QUARANTINE_PARTS, StageDir, StageError, gather_quarantine
from ..schema import IdField, InputPaths, ModelRef, Strict
from ..stage import Stage, StageClock, StageReport, check_inputs, check_model, progress

SOFT_PROMPT_DIR = "soft_prompt"
PRIVATE_PROMPTS = "private_prompts.safetensors"
RAY_DIR = "ray"
PROGRESS = "progress.json"  # rank 0's latest progress lines, while training runs


class DeepSpeedConfig(Strict):
    """DeepSpeed's ZeRO for Z's optimizer (the frozen LM is partitioned too at stage 3)."""
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage (the authors ran 2).")
    offload_optimizer: bool = Field(False, description="Optimizer state in host memory.")
    offload_params: bool = Field(False, description="Parameters in host memory (stage 3 only).")
    bf16: Union[Literal["auto"], bool] = Field("auto", description="bfloat16 weights and activations; auto = on "
                                                                   "where the GPUs have it, off on CPU.")

    @model_validator(mode="after")
    def _offload_params_needs_stage_3(self) -> "DeepSpeedConfig":
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params: DeepSpeed offloads parameters at zero_stage 3 only")
        return self


class TrainWorkers(Strict):
    """The Ray Train side of a training stage: its workers, how gradients are shared, failures recovered from
    (softprompt, pretrain, finetune, preference)."""
    workers: int = Field(1, gt=0, description="Ray Train workers.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per worker (its torch threads).")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker (nccl when > 0, else gloo).")
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="Other Ray resources per "
                                                   "worker, e.g. {accelerator_type:H100: 0.001}.")
    strategy: Literal["auto", "ddp", "deepspeed"] = Field(
        "auto", description="How gradients are shared: DeepSpeed (ZeRO, offload, bf16) or plain PyTorch DDP; auto = "
                            "DeepSpeed on GPUs or when a deepspeed section is given, else DDP.")
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    max_failures: int = Field(2, ge=0, description="Worker failures Ray Train recovers from (restarting from the "
                                                   "latest checkpoint) before the stage fails.")

    @property
    def resolved_strategy(self) -> str:
        """``strategy`` with auto decided. On CPU workers ZeRO partitions nothing worth the cost (one worker: nothing
        at all) and copies every gradient into and out of its flat buffers: a step takes about 20% longer than under
        DDP (docs/benchmarks.md), so auto takes DeepSpeed where its memory savings and bf16 matter: on GPUs, or when
        the recipe configures it."""
        if self.strategy != "auto":
            return self.strategy
        return "deepspeed" if self.gpus_per_worker > 0 or "deepspeed" in self.model_fields_set else "ddp"


class SoftPromptConfig(TrainWorkers):
    """DOMINO's soft-prompt learning: Z (and each reference's z_i) on a frozen causal LM, on Ray Train."""
    references: InputPaths = Field(description="The domain's reference samples (JSONL/Parquet), tens to hundreds.")
    text_field: str = Field("text", description="The field holding a reference's text.")
    id_field: IdField = "id"
    model: ModelRef = Field(description="The frozen causal LM: Hugging Face id or folder (or smollm2).")
    objective: Literal["domino", "direct"] = Field("domino", description="domino: L_suf + λ·L_con with private "
                                                   "prompts z_i; direct: L_suf alone (the Direct-Domain baseline, "
                                                   "plain prompt tuning).")
    num_tokens: int = Field(256, gt=0, description="m, the domain prompt's tokens.")
    private_tokens: Optional[int] = Field(None, gt=0, description="Tokens of each private prompt z_i (domino); "
                                                                  "null = 256 for domino. Not with direct.")
    contrastive_weight: float = Field(1.0, ge=0, description="λ, the weight of L_con (the authors: 1; 2 slightly "
                                                            "better).")
    lr: float = Field(1e-3, gt=0, description="Learning rate (AdamW, constant after warmup).")
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warmup.")
    epochs: int = Field(10, gt=0, description="Passes over the references.")
    max_steps: Optional[int] = Field(None, gt=0, description="Stop after this many steps (null = epochs decide).")
    batch_size: int = Field(3, gt=0, description="References per worker per step (B; L_con takes B×B pairs).")
    max_length: int = Field(1024, gt=1, description="Tokens of a reference (longer ones are cut; EOS added).")
    init_text: Optional[str] = Field(None, description="Start Z from this text's token embeddings (repeated to "
                                                       "num_tokens); null = embeddings of sampled vocabulary tokens.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (less memory).")
    seed: int = 0
    checkpoint_every: int = Field(50, gt=0, description="Steps between checkpoints (and the last step).")
    log_every: int = Field(10, gt=0, description="Steps between progress lines.")

    @model_validator(mode="after")
    def _private_tokens_need_domino(self) -> "SoftPromptConfig":
        if self.objective == "direct" and self.private_tokens is not None:
            raise ValueError("private_tokens: the direct objective has no private prompts (set objective: domino, "
                             "or remove private_tokens)")
        if self.objective == "domino" and self.private_tokens is None:
            self.private_tokens = 256
        return self


class SoftPromptReport(StageReport):
    steps: int
    final_loss: float


class Tokenise:
    """Ray Data batch function: each reference's token ids (the tokenizer's special tokens, cut to ``max_length`` - 1,
    then EOS, so that sampling from Z learns where a sample ends)."""

    def __init__(self, model: str, text_field: str, id_field: str, max_length: int):
        from transformers import AutoTokenizer

        from ...actors.smollm2 import resolve_model

        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
        self.field, self.id_field, self.max_length = text_field, id_field, max_length

    def __call__(self, batch: pa.Table) -> pa.Table:
        encoded = self.tokenizer(batch.column(self.field).to_pylist(), add_special_tokens=True).input_ids
        eos = self.tokenizer.eos_token_id
        ids = [e[:self.max_length - 1] + [eos] for e in encoded]
        return pa.table({"id": batch.column(self.id_field), ORDER: batch.column(ORDER),
                         "input_ids": pa.array(ids, pa.list_(pa.int32())),
                         "truncated": pa.array([len(e) > self.max_length - 1 for e in encoded])})


def train_loop_config(cfg: SoftPromptConfig, num_samples: int) -> dict:
    return {**cfg.model_dump(mode="json", exclude={"references", "text_field", "id_field"}),
            "strategy": cfg.resolved_strategy, "num_samples": num_samples,
            "torch_threads": max(1, int(cfg.cpus_per_worker))}


def run_name(fingerprint: str) -> str:
    """The Ray Train run's name: the stage's fingerprint (settings and references), so a rerun with the same ones
    resumes its checkpoints and any change starts afresh."""
    return f"softprompt-{fingerprint}"


def check_resources(cfg, cpus: float, gpus: float, section: str = "softprompt") -> None:
    """Enough CPUs and GPUs for ``cfg.workers`` workers (a softprompt config, or a training stage's settings)."""
    need_cpus, need_gpus = cfg.workers * cfg.cpus_per_worker, cfg.workers * cfg.gpus_per_worker
    if need_cpus > cpus + 1e-9:
        raise StageError(f"{section}.workers: {cfg.workers} workers x {cfg.cpus_per_worker:g} CPUs need "
                         f"{need_cpus:g} CPUs, the cluster has {cpus:g}")
    if need_gpus > gpus + 1e-9:
        raise StageError(f"{section}.gpus_per_worker: {cfg.workers} workers x {cfg.gpus_per_worker:g} GPUs need "
                         f"{need_gpus:g} GPUs, the cluster has {gpus:g}")


def run_softprompt(cfg: SoftPromptConfig, stage: StageDir, fingerprint: str) -> dict:
    from ray.data import ActorPoolStrategy
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ...actors.softprompt_training import train_soft_prompt
    from ..resources import cluster_cpus, cluster_gpus

    clock = StageClock()
    check_resources(cfg, cluster_cpus(), cluster_gpus())
    with clock.phase("tokenise"):
        parts = stage.child(QUARANTINE_PARTS)
        tokenised = read_corpus(CorpusSpec(cfg.references, cfg.text_field, cfg.id_field), num_cpus=READ_TASK_CPUS,
                                quarantine_dir=parts) \
            .map_batches(Tokenise, fn_constructor_args=(cfg.model, cfg.text_field, cfg.id_field, cfg.max_length),
                         batch_format="pyarrow", compute=ActorPoolStrategy(size=1), num_cpus=1).materialize()
        quarantined = gather_quarantine(stage, "references")
        count = tokenised.count()
        truncated = column_total(tokenised, "truncated") if count else 0
    if count < cfg.workers:
        raise StageError(f"softprompt.references: {count} usable reference(s) for {cfg.workers} workers; each "
                         f"worker needs one at least")
    name = run_name(fingerprint)
    _forget_other_runs(stage, name)
    use_gpu = cfg.gpus_per_worker > 0
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if use_gpu else {}),
                 **cfg.resources_per_worker}
    # The workers resume from the latest whole checkpoint of this run (same settings and references) in this folder,
    # whether the stage is rerun after an interruption or Ray Train restarts them after a failure.
    run_folder = _absolute(paths.join(stage.child(RAY_DIR), name))
    trainer = TorchTrainer(
        train_soft_prompt, train_loop_config={**train_loop_config(cfg, count), "run_folder": run_folder,
                                              "progress_file": _absolute(stage.child(PROGRESS))},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=_absolute(stage.child(RAY_DIR)),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets={"train": tokenised}, dataset_config=DataConfig(datasets_to_split=[]))
    with clock.phase("train"), ProgressLines(stage.child(PROGRESS)):
        result = fit_interruptibly(trainer)
    stage.delete(PROGRESS)
    with clock.phase("write"):
        history = _write_outputs(cfg, stage, result.checkpoint)
    report = {
        "stage": "softprompt", "rows_in": count + len(quarantined), "rows_out": count,
        "rows_quarantined": len(quarantined), "steps": history[-1]["step"], "final_loss": history[-1]["loss"],
        "references_truncated": truncated, "objective": cfg.objective, "model": cfg.model,
        "num_tokens": cfg.num_tokens, "private_tokens": cfg.private_tokens, "workers": cfg.workers,
        "strategy": cfg.resolved_strategy,
        **({"zero_stage": cfg.deepspeed.zero_stage} if cfg.resolved_strategy == "deepspeed" else {}),
        "tokens_per_second": history[-1]["tokens_per_s"], **clock.timings(),
        "outputs": {"soft_prompt": stage.child(SOFT_PROMPT_DIR), "metrics": stage.child("metrics.jsonl"),
                    "checkpoints": paths.join(stage.child(RAY_DIR), name),
                    "quarantine": stage.child("quarantine.jsonl"),
                    **({"private_prompts": stage.child(PRIVATE_PROMPTS)} if cfg.objective == "domino" else {})},
    }
    stage.write_bytes("loss.png", loss_png(history, cfg.objective))
    last = history[-1]
    write_report(stage, report, "\n".join([
        f"# softprompt — the domain soft prompt ({cfg.objective})", "", markdown_table([
            ("references", f"{count:,} ({truncated:,} cut to {cfg.max_length} tokens; quarantined "
                           f"{len(quarantined):,})"),
            ("model", cfg.model), ("Z", f"{cfg.num_tokens} tokens"),
            ("private prompts", f"{cfg.private_tokens} tokens each" if cfg.private_tokens else "none (direct)"),
            ("steps", f"{last['step']:,} ({last['epoch']} epochs, batch {cfg.batch_size} x {cfg.workers} workers)"),
            ("loss", falling(history, "loss")), ("L_suf", falling(history, "loss_suf")),
            *([("L_con", falling(history, "loss_con"))] if "loss_con" in last else []),
            ("tokens / second", f"{last['tokens_per_s']:,.0f}"), ("seconds", report["seconds"])]),
        "", "![loss](loss.png)", ""]))
    return report


def fit_interruptibly(trainer):
    """``trainer.fit()``, with Ctrl-C as a KeyboardInterrupt. Ray Train answers SIGINT by aborting the run (the
    workers stop, the checkpoints stay) and then exits the process with SystemExit from its handler, which it leaves
    installed; here the interrupt surfaces as the KeyboardInterrupt every other stage raises, and the handler that
    was there before comes back."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    except SystemExit:
        raise KeyboardInterrupt("softprompt: training aborted by SIGINT") from None
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def _absolute(uri: str) -> str:
    """A URI as it is, a local path absolute (Ray Train's storage path; a path the workers write)."""
    return uri if paths.is_uri(uri) else os.path.abspath(uri)


class ProgressLines:
    """While training runs: rank 0's progress lines (the file it rewrites, polled every second) printed as the
    stage's progress."""

    def __init__(self, uri: str, every_s: float = 1.0):
        self.uri, self.every_s, self.last = uri, every_s, None

    def __enter__(self) -> "ProgressLines":
        import threading

        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, name="softprompt-progress", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self._show()  # the last lines

    def _poll(self) -> None:
        while not self.stop.wait(self.every_s):
            self._show()

    def _show(self) -> None:
        folder, name = paths.parent(self.uri), self.uri.rsplit("/", 1)[-1]
        lines = (StageDir(folder).read_json(name) or {}).get("lines", [])
        # What follows the last line shown (all of them when it is gone: a worker restarted by Ray Train numbers
        # its lines afresh).
        start = lines.index(self.last) + 1 if self.last in lines else 0
        for entry in lines[start:]:
            progress(entry[1])
        if lines:
            self.last = lines[-1]


def _forget_other_runs(stage: StageDir, keep: str, ray_dir: str = RAY_DIR) -> None:
    """Checkpoints of runs with other settings or inputs cannot be resumed by this one: removed."""
    import pyarrow.fs as pafs

    fs, root = StageDir(stage.child(ray_dir)).fs_path
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return
    for info in fs.get_file_info(pafs.FileSelector(root)):
        if info.type == pafs.FileType.Directory and info.base_name != keep:
            fs.delete_dir(info.path)


def _write_outputs(cfg: SoftPromptConfig, stage: StageDir, checkpoint) -> list[dict]:
    """The PEFT folder, the private table and metrics.jsonl, from the final checkpoint."""
    import torch
    from peft import PromptTuningConfig, TaskType
    from safetensors.numpy import save as save_safetensors

    from ...actors.smollm2 import resolve_model
    from ...actors.soft_prompt import PEFT_TENSOR, PEFT_WEIGHTS
    from ...actors.softprompt_training import STATE, read_private_table

    with checkpoint.as_directory() as folder:
        state = torch.load(os.path.join(folder, STATE), map_location="cpu", weights_only=False)
        private = read_private_table(folder) if cfg.objective == "domino" else None
    domain = state["domain"].numpy()
    model_config = json.loads(_read_model_config(resolve_model(cfg.model)))
    peft_config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_tokens, token_dim=domain.shape[1],
        num_transformer_submodules=1, num_attention_heads=model_config.get("num_attention_heads"),
        num_layers=model_config.get("num_hidden_layers"), base_model_name_or_path=cfg.model)
    config_json = json.dumps(peft_config.to_dict(), indent=2, default=str)
    adapter = StageDir(stage.child(SOFT_PROMPT_DIR))
    adapter.write_text("adapter_config.json", config_json + "\n")
    adapter.write_bytes(PEFT_WEIGHTS, save_safetensors({PEFT_TENSOR: domain}))
    if private is not None:
        stage.write_bytes(PRIVATE_PROMPTS, save_safetensors({"private_prompts": private[1]}))
    stage.write_jsonl("metrics.jsonl", state["history"])
    return state["history"]


def _read_model_config(model: str) -> str:
    """The model's config.json (a folder's, or a Hugging Face id's through the hub cache)."""
    if os.path.isdir(model):
        with open(os.path.join(model, "config.json"), encoding="utf-8") as f:
            return f.read()
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model).to_json_string()


def falling(history: list[dict], key: str) -> str:
    """A loss term from the first epoch to the last, as means (one batch's value is noisy), and its first and last
    steps."""
    first_epoch, last_epoch = history[0]["epoch"], history[-1]["epoch"]
    mean = {e: sum(h[key] for h in history if h["epoch"] == e) / sum(h["epoch"] == e for h in history)
            for e in (first_epoch, last_epoch)}
    return (f"mean {mean[first_epoch]:.3f} in epoch {first_epoch} -> {mean[last_epoch]:.3f} in epoch {last_epoch} "
            f"(step {history[0]['step']}: {history[0][key]:.3f}, step {history[-1]['step']}: {history[-1][key]:.3f})")


def loss_png(history: list[dict], objective: str) -> bytes:
    """The loss terms over steps: each step faint (a batch of a few references is noisy), and their running mean."""
    import numpy as np

    steps = [h["step"] for h in history]
    window = max(1, len(history) // 20)
    fig, ax = _pyplot().subplots(figsize=(7, 3.6), dpi=110)
    terms = [("loss", "loss", "tab:blue"), ("loss_suf", "L_suf", "tab:green")]
    if objective == "domino":
        terms.append(("loss_con", "L_con", "tab:orange"))
    for key, label, color in terms:
        values = np.array([h[key] for h in history], dtype=float)
        running = np.convolve(values, np.ones(window), "full")[:len(values)] / np.minimum(
            np.arange(1, len(values) + 1), window)  # the mean of the last `window` steps (fewer at the start)
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, running, color=color, label=label)
    epochs = [h["step"] for prev, h in zip(history, history[1:]) if h["epoch"] != prev["epoch"]]
    for x in epochs:
        ax.axvline(x - 0.5, color="#cccccc", linewidth=0.6)
    ax.set_xlabel("step (grey lines: epochs)")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(f"softprompt ({objective}): each step, and the mean of the last {window}")
    ax.legend(fontsize=8)
    return _png(fig)


class SoftPrompt(Stage):
    name, config, report = "softprompt", SoftPromptConfig, SoftPromptReport
    help = ("DOMINO's soft-prompt learning: the domain soft prompt Z from reference samples, on Ray Train "
            "(DeepSpeed or DDP); synthesize --method domino samples from it.")
    kept_on_retry = (RAY_DIR,)  # checkpoints of an interrupted run: the rerun resumes from them

    def preflight(self, cfg: SoftPromptConfig, recipe) -> None:
        check_model("softprompt.model", cfg.model)
        check_inputs("softprompt.references", cfg.references)
        if recipe.ray.address is None and recipe.ray.num_cpus is not None:
            check_resources(cfg, recipe.ray.num_cpus, float("inf"))

    def run(self, cfg: SoftPromptConfig, stage: StageDir, recipe) -> dict:
        return run_softprompt(cfg, stage, recipe.stage_fingerprint(self.name))

    def summary(self, r: SoftPromptReport) -> str:
        return (f"softprompt: {r.rows_out:,} references, {r.steps:,} steps, final loss {r.final_loss:.3f}; "
                f"quarantined {r.rows_quarantined:,}")
