"""The per-worker loop of the model-adapting stages (pretrain, finetune, preference) under Ray Train: a Hugging Face
``Trainer`` — plain for causal-LM pretraining on packed blocks, TRL's ``SFTTrainer`` for LoRA SFT, TRL's
``DPOTrainer`` for DPO — inside each ``TorchTrainer`` worker, with DeepSpeed through the Hugging Face integration.

What this module adds to the Trainer is what a Ray job needs of it:

- every checkpoint the Trainer saves is reported to Ray Train by every rank (each rank's files, the DeepSpeed ZeRO
  partitions among them, end up in one checkpoint folder on the run's storage), with a marker per rank, so that a
  checkpoint a kill cut short is never resumed from;
- a worker starts from the latest whole checkpoint of its run, whether Ray Train restarted it after a failure or the
  stage was run again after Ctrl-C, and the run ends at the planned step count;
- rank 0's log lines become the stage's progress lines (``ProgressFile``), and at the end rank 0 writes the model
  (or adapter) folder and ``metrics.jsonl`` to the stage's folder, local or URI.

``cfg`` is a plain dict (the stage's settings): see ``pipelines/training/hf_run.py``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time

from .softprompt_training import STEP, ProgressFile, latest_checkpoint, rank_done

MODEL_FILES_SKIPPED = ("optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin", "rng_state")


# ------------------------------------------------------------------------------------------------ the training data
class PackedBlocks:
    """A map-style dataset over the packed blocks in a folder of Parquet files (column ``input_ids``, fixed length),
    read a row group at a time: the training data is never in one process's memory whole. Blocks come in file
    order: the stage shuffled them (seeded) when it mixed them, so a resumed run reads what an uninterrupted one
    would."""

    def __init__(self, uri: str):
        import pyarrow.fs as pafs
        import pyarrow.parquet as pq

        self.fs, root = (pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(),
                                                                              os.path.abspath(uri)))
        files = sorted(i.path for i in self.fs.get_file_info(pafs.FileSelector(root, recursive=True))
                       if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
        self.groups = []  # (file, row group, first row index)
        first = 0
        for path in files:
            meta = pq.ParquetFile(self.fs.open_input_file(path)).metadata
            for g in range(meta.num_row_groups):
                self.groups.append((path, g, first))
                first += meta.row_group(g).num_rows
        self.length, self.cached = first, (None, None)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        import bisect

        import pyarrow.parquet as pq
        import torch

        if not 0 <= index < self.length:
            raise IndexError(index)
        at = bisect.bisect_right([g[2] for g in self.groups], index) - 1
        if self.cached[0] != at:
            path, group, _ = self.groups[at]
            table = pq.ParquetFile(self.fs.open_input_file(path)).read_row_group(group, columns=["input_ids"])
            self.cached = (at, table.column("input_ids").to_pylist())
        ids = torch.tensor(self.cached[1][index - self.groups[at][2]], dtype=torch.long)
        return {"input_ids": ids, "labels": ids.clone()}


def read_rows(uri: str) -> list[dict]:
    """The rows of a (small) Parquet folder: SFT samples or DPO pairs."""
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), os.path.abspath(uri))
    return pads.dataset(root, filesystem=fs, format="parquet").to_table().to_pylist()


# ------------------------------------------------------------------------------------------------ DeepSpeed and args
def deepspeed_config(ds: dict) -> dict:
    """DeepSpeed's config for the Hugging Face integration ("auto": the Trainer fills in batch sizes, accumulation,
    clipping and precision from its own arguments). The optimizer and schedule are the Trainer's (torch AdamW, warmup
    + cosine): DeepSpeed's fused CPU Adam would compile a C++ extension first."""
    zero: dict = {"stage": ds["zero_stage"]}
    if ds["offload_optimizer"]:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds["offload_params"]:
        zero["offload_param"] = {"device": "cpu"}
    if ds["zero_stage"] == 3:  # the saved model is whole, not each rank's partition
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "zero_optimization": zero,
            "zero_force_ds_cpu_optimizer": False, "bf16": {"enabled": "auto"}, "steps_per_print": 10**9,
            "wall_clock_breakdown": False}


def use_bf16(setting) -> bool:
    import torch

    if setting == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(setting)


def trainer_arguments(cfg: dict, output_dir: str) -> dict:
    """The Trainer's arguments common to the three stages."""
    t = cfg["training"]
    args = dict(
        output_dir=output_dir, max_steps=cfg["total_steps"], per_device_train_batch_size=t["batch_size"],
        per_device_eval_batch_size=t["batch_size"], gradient_accumulation_steps=t["gradient_accumulation"],
        learning_rate=t["lr"], lr_scheduler_type=t["schedule"], warmup_steps=t["warmup_steps"],
        weight_decay=t["weight_decay"], max_grad_norm=t["max_grad_norm"], seed=t["seed"], data_seed=t["seed"],
        logging_steps=t["log_every"], save_strategy="steps", save_steps=t["checkpoint_every"], save_total_limit=1,
        eval_strategy="steps" if cfg["has_eval"] else "no", eval_steps=t["eval_every"] if cfg["has_eval"] else None,
        report_to=[], disable_tqdm=True, bf16=use_bf16(t["deepspeed"]["bf16"]) if t["strategy"] == "deepspeed"
        else False, gradient_checkpointing=t["gradient_checkpointing"], dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding", remove_unused_columns=False, ddp_find_unused_parameters=False,
        accelerator_config={"use_configured_state": True},
    )
    if t["strategy"] == "deepspeed":
        args["deepspeed"] = deepspeed_config(t["deepspeed"])
    return args


def lora_config(lora: dict | None):
    if not lora:
        return None
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=lora["target_modules"])


# ------------------------------------------------------------------------------------------------ the Ray Train bridge
def _bridge_callback(say, rank: int, world: int, total: int, stage: str, perplexity: bool):
    """Progress lines (rank 0), a checkpoint at the last step, and every saved checkpoint reported to Ray Train."""
    import ray.train
    from transformers import TrainerCallback

    class RayTrainBridge(TrainerCallback):
        def __init__(self):
            self.began, self.start_tokens, self.start_step = None, 0, 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.began, self.start_tokens, self.start_step = time.perf_counter(), state.num_input_tokens_seen, \
                state.global_step
            if rank == 0 and state.global_step:
                say(f"[{stage}] resumed from step {state.global_step} of {total}")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if rank != 0 or not logs or self.began is None:
                return
            elapsed = max(time.perf_counter() - self.began, 1e-9)
            rate = (state.num_input_tokens_seen - self.start_tokens) / elapsed
            logs["tokens_per_s"] = round(rate * world, 1)  # every rank's tokens (the count is rank 0's)
            done = state.global_step - self.start_step
            eta = elapsed / done * (total - state.global_step) if done else float("nan")
            at = f"[{stage}] step {state.global_step}/{total}"
            held_out = [(k[len("eval_"):-len("_loss")], v) for k, v in logs.items()
                        if k.startswith("eval_") and k.endswith("_loss")]
            for name, loss in held_out:
                ppl = f", perplexity {math.exp(min(loss, 50)):,.1f}" if perplexity else ""
                say(f"{at} held-out {name}: loss {loss:.3f}{ppl}")
            if "loss" in logs:
                say(f"{at} loss {logs['loss']:.3f} lr {logs.get('learning_rate', 0):.2e} "
                    f"{logs['tokens_per_s']:,.0f} tokens/s ETA {eta:,.0f}s")

        def on_train_end(self, args, state, control, **kwargs):
            self.seconds = time.perf_counter() - self.began  # wall time of this attempt's steps and evaluations

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= total:
                control.should_log = True  # the last step's loss is in the history even when log_every misses it
            if state.global_step >= total and state.global_step % args.save_steps:
                # The Trainer checkpoints the last step too; the outputs are written right after it, and a checkpoint
                # (optimizer state included: 12 bytes a parameter) would cost more than the steps since the last one.
                control.should_save = False
            self.saving_since = time.perf_counter() if control.should_save else None

        def on_save(self, args, state, control, **kwargs):
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if rank == 0:
                with open(os.path.join(folder, STEP), "w", encoding="utf-8") as f:
                    json.dump({"step": state.global_step, "world": world}, f)
            open(os.path.join(folder, rank_done(rank)), "w").close()
            metrics = {"step": state.global_step, **{k: v for k, v in (state.log_history or [{}])[-1].items()
                                                      if isinstance(v, (int, float))}}
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
            if rank == 0 and getattr(self, "saving_since", None) is not None:
                say(f"[{stage}] checkpoint at step {state.global_step} saved in "
                    f"{time.perf_counter() - self.saving_since:.1f}s")

    return RayTrainBridge()


def _distributed_state(strategy: str) -> None:
    """The Trainer's accelerate state on the process group Ray Train made (gloo on CPU, nccl on GPUs)."""
    import torch
    from accelerate import PartialState

    if strategy == "deepspeed":
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="nccl" if torch.cuda.is_available() else "gloo")


# ------------------------------------------------------------------------------------------------ the three trainers
def _load_model(cfg: dict):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg["model_path"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(cfg["model_path"], dtype=torch.float32)
    if cfg["training"]["gradient_checkpointing"]:
        model.config.use_cache = False
    return model, tokenizer


def _causal_lm_trainer(cfg: dict, args: dict, callbacks: list):
    """Continual pretraining: next-token loss on packed blocks; held-out perplexity from the eval losses."""
    from peft import get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainingArguments, default_data_collator

    class PackedTrainer(Trainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)  # already shuffled, seeded, by the stage

    model, tokenizer = _load_model(cfg)
    if cfg.get("lora"):
        model = get_peft_model(model, lora_config(cfg["lora"]))
    evals = {name: PackedBlocks(uri) for name, uri in cfg["eval_data"].items()} or None
    return PackedTrainer(model=model, args=TrainingArguments(**args), train_dataset=PackedBlocks(cfg["train_data"]),
                         eval_dataset=evals, data_collator=default_data_collator, processing_class=tokenizer,
                         callbacks=callbacks)


def _sft_trainer(cfg: dict, args: dict, callbacks: list):
    """LoRA SFT with TRL: prompt-completion conversations, the chat template applied, loss on the completion."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = _load_model(cfg)
    train = Dataset.from_list(read_rows(cfg["train_data"]))
    evals = {name: Dataset.from_list(read_rows(uri)) for name, uri in cfg["eval_data"].items()} or None
    sft = SFTConfig(**args, max_length=cfg["max_length"], completion_only_loss=True, packing=False,
                    dataset_num_proc=None)
    return SFTTrainer(model=model, args=sft, train_dataset=train, eval_dataset=evals, processing_class=tokenizer,
                      peft_config=lora_config(cfg["lora"]), callbacks=callbacks)


def _dpo_trainer(cfg: dict, args: dict, callbacks: list):
    """DPO with TRL on (prompt, chosen, rejected) conversations; with LoRA the reference model is the base with the
    adapter switched off (no second copy of the model)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = _load_model(cfg)
    train = Dataset.from_list(read_rows(cfg["train_data"]))
    evals = {name: Dataset.from_list(read_rows(uri)) for name, uri in cfg["eval_data"].items()} or None
    dpo = DPOConfig(**args, beta=cfg["beta"], max_length=cfg["max_length"], dataset_num_proc=None)
    return DPOTrainer(model=model, args=dpo, train_dataset=train, eval_dataset=evals, processing_class=tokenizer,
                      peft_config=lora_config(cfg["lora"]), callbacks=callbacks)


TRAINERS = {"causal_lm": _causal_lm_trainer, "sft": _sft_trainer, "dpo": _dpo_trainer}


def train_hf(cfg: dict) -> None:
    """Ray Train's ``train_loop_per_worker`` for pretrain, finetune and preference."""
    import ray.train
    import torch

    torch.set_num_threads(cfg["torch_threads"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    _distributed_state(cfg["training"]["strategy"])
    say = ProgressFile(cfg.get("progress_file")).say
    with tempfile.TemporaryDirectory(prefix=f"{cfg['stage']}-rank{rank}-") as local:
        callbacks = [_bridge_callback(say, rank, world, cfg["total_steps"], cfg["stage"], cfg["kind"] == "causal_lm")]
        checkpoint = latest_checkpoint(cfg["run_folder"]) or ray.train.get_checkpoint()
        args = trainer_arguments(cfg, os.path.join(local, "checkpoints"))
        # The starting point of the held-out curves (step 0), once: a resumed run has it in its log history.
        args["eval_on_start"] = cfg["has_eval"] and checkpoint is None
        began = time.perf_counter()
        trainer = TRAINERS[cfg["kind"]](cfg, args, callbacks)
        if rank == 0:
            say(f"[{cfg['stage']}] model and data ready on {world} worker(s) in {time.perf_counter() - began:.1f}s")
        if checkpoint is None:
            trainer.train()
        else:
            with checkpoint.as_directory() as folder:
                with open(os.path.join(folder, STEP), encoding="utf-8") as f:
                    made = json.load(f)
                if made["world"] != world:
                    raise ValueError(f"{cfg['stage']}.workers: the checkpoint was made by {made['world']} workers, "
                                     f"this run has {world}; a run resumes with the workers it started with")
                if made["step"] >= cfg["total_steps"]:
                    # Trained to the end already (the outputs were not written, or were removed): they come from the
                    # final checkpoint as they are; the Trainer, resumed at its last step, would take one more.
                    if rank == 0:
                        say(f"[{cfg['stage']}] all {made['step']} steps done; writing the outputs")
                        _write_outputs(cfg, _model_files(folder, os.path.join(local, "final")),
                                       _log_history(folder), trainer)
                    return
                trainer.train(resume_from_checkpoint=folder)
        final = os.path.join(local, "final")
        began = time.perf_counter()
        trainer.save_model(final)  # every rank takes part (ZeRO-3 gathers the weights); the tokenizer is saved too
        if os.path.exists(os.path.join(final, "training_args.bin")):
            os.remove(os.path.join(final, "training_args.bin"))  # a pickle of this run's arguments, not the model's
        if rank == 0:
            wall = {"step": trainer.state.global_step, "train_wall_seconds": round(callbacks[0].seconds, 3)}
            _write_outputs(cfg, final, trainer.state.log_history + [wall], trainer)
            say(f"[{cfg['stage']}] model written in {time.perf_counter() - began:.1f}s")


def _model_files(checkpoint: str, out: str) -> str:
    """The model (or adapter) and tokenizer files of a Trainer checkpoint, copied to ``out``: not the optimizer,
    scheduler, RNG states, DeepSpeed's partitions or our markers."""
    import shutil

    os.makedirs(out, exist_ok=True)
    for name in os.listdir(checkpoint):
        path = os.path.join(checkpoint, name)
        if os.path.isdir(path) or name.startswith(MODEL_FILES_SKIPPED) or name.endswith(".done") or name in (
                STEP, "latest", "zero_to_fp32.py"):
            continue
        shutil.copy2(path, os.path.join(out, name))
    return out


def _log_history(checkpoint: str) -> list[dict]:
    with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
        return json.load(f)["log_history"]


def _write_outputs(cfg: dict, folder: str, history: list[dict], trainer) -> None:
    """Rank 0: the model folder (full weights; or the LoRA adapter and, if asked, the merged model) and
    metrics.jsonl, written to the stage's output folders (local paths or URIs)."""
    import pyarrow.fs as pafs

    outputs = {cfg["outputs"]["model"]: folder}
    if cfg.get("lora") and cfg["outputs"].get("merged"):
        merged = folder.rstrip("/") + "-merged"
        _merge(cfg["model_path"], folder, merged, trainer.processing_class)
        outputs[cfg["outputs"]["merged"]] = merged
    for uri, local in outputs.items():
        fs, root = _fs(uri)
        fs.create_dir(root, recursive=True)
        pafs.copy_files(local, root, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    fs, path = _fs(cfg["outputs"]["metrics"])
    with fs.open_output_stream(path) as f:
        f.write("".join(json.dumps(h) + "\n" for h in history).encode())


def _fs(uri: str):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), os.path.abspath(uri))


def _merge(base: str, adapter: str, out: str, tokenizer) -> None:
    """The LoRA adapter merged into the base weights, saved as a plain model folder (with the tokenizer)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with _outside_zero3():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
    tokenizer.save_pretrained(out)


@contextlib.contextmanager
def _outside_zero3():
    """A whole model loaded on this rank alone. While the Trainer's DeepSpeed config is ZeRO-3, transformers builds
    every model it loads partitioned over the ranks (``deepspeed.zero.Init``, which broadcasts): rank 0 loading the
    base for the merge would wait forever for the others."""
    from transformers.integrations import deepspeed as hf_deepspeed

    held = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = held
