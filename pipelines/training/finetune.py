"""CRAFT's and DOMINO's last step: LoRA supervised fine-tuning on the synthetic samples, with TRL's ``SFTTrainer`` on
Ray Train workers. Each sample becomes a prompt-completion conversation (the model's chat template applied, the loss
on the response only); a held-out share of the samples gives the validation loss. Presets carry the papers'
settings: ``craft`` (r 64, alpha 64, dropout 0.1, lr 1e-4, 3 epochs) and ``domino`` (r 8 on all linear layers,
lr 5e-5).

Writes ``<run>/finetune/adapter`` (a PEFT LoRA folder that PEFT, lm-eval's ``peft=``, our engines and ``serve``
load), ``model`` (the adapter merged into the base) when ``merge`` is set, ``metrics.jsonl``, and ``report.md``
with the training and validation losses.
"""

from __future__ import annotations

import zlib
from typing import Literal, Optional

import pyarrow as pa
from pydantic import Field, model_validator

from .. import paths
from ..corpus import ORDER, READ_TASK_CPUS, SOURCE_FILE, SOURCE_LINE, CorpusSpec, read_corpus
from ..report import markdown_table, write_report
from ..rundir import QUARANTINE_PARTS, StageDir, StageError, gather_quarantine
from ..schema import IdField, InputPaths, ModelRef, Strict
from ..stage import Stage, StageClock, StageReport, check_inputs, check_model, progress
from .hf_run import (LoraSettings, TrainingSettings, curve_png, eval_entries, first_last, fit_hf, model_path,
                     plan_steps, read_metrics, train_entries)
from .softprompt import _absolute

RAY_DIR, ADAPTER_DIR, MODEL_DIR, SAMPLES_DIR = "ray", "adapter", "model", "samples"

PRESETS = {
    "craft": {"lora": {"r": 64, "alpha": 64, "dropout": 0.1, "target_modules": "all-linear"},
              "training": {"lr": 1e-4, "epochs": 3}},
    "domino": {"lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"},
               "training": {"lr": 5e-5, "epochs": 3}},
}


def apply_preset(values: dict, presets: dict = PRESETS) -> dict:
    """A preset's settings under those the recipe gives (the recipe wins, field by field)."""
    preset = values.get("preset") if isinstance(values, dict) else None
    if preset not in presets:
        return values
    merged = dict(values)
    for section, defaults in presets[preset].items():
        given = merged.get(section) or {}
        if isinstance(given, dict):
            merged[section] = {**defaults, **given}
    return merged


class FinetuneConfig(Strict):
    """LoRA SFT with TRL's SFTTrainer on instruction/response samples, on Ray Train."""
    data: Optional[InputPaths] = Field(None, description="Samples (JSONL/Parquet); null = this run's judge output, "
                                                       "else its qc output, else its synthesize output.")
    model: ModelRef = Field(description="The base causal LM: Hugging Face id or folder (e.g. a pretrain stage's "
                                        "model).")
    preset: Optional[Literal["craft", "domino"]] = Field(None, description="The paper's LoRA and optimizer "
                                                         "settings (fields set here override them).")
    prompt_field: Optional[str] = Field(None, description="The field holding the instruction; null = input when "
                                        "the recipe synthesizes with domino, else instruction (CRAFT's format).")
    response_field: str = Field("output", description="The field holding the response to learn to write.")
    id_field: IdField = "id"
    system_prompt: Optional[str] = Field(None, description="A system message before each instruction.")
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="Share of samples held out for the validation "
                                                                  "loss (by a hash of the id: stable).")
    max_length: int = Field(1024, gt=1, description="Tokens of a conversation (longer ones are cut).")
    lora: LoraSettings = LoraSettings()
    merge: bool = Field(False, description="Also write the adapter merged into the base as a model folder.")
    training: TrainingSettings = TrainingSettings(eval_every=20, checkpoint_every=20)

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, values):
        return apply_preset(values)


class TrainedReport(StageReport):
    steps: int
    final_loss: float


def upstream_samples(recipe) -> Optional[str]:
    for name in ("judge", "qc", "synthesize"):
        if getattr(recipe, name) is not None:
            return paths.join(recipe.run_dir, name, "data")
    return None


def prompt_field_of(cfg: FinetuneConfig, recipe) -> str:
    if cfg.prompt_field:
        return cfg.prompt_field
    synth = recipe.synthesize
    return "input" if synth is not None and synth.method == "domino" else "instruction"


class ToConversations:
    """Ray Data batch function: each sample as a prompt (system and user messages) and a completion (the assistant's
    response), with its split; a sample without a response is quarantined with file, line and reason."""

    def __init__(self, prompt_field: str, response_field: str, system_prompt: Optional[str],
                 validation_fraction: float, quarantine_dir: str):
        self.prompt_field, self.response_field = prompt_field, response_field
        self.system, self.fraction, self.parts = system_prompt, validation_fraction, quarantine_dir

    def __call__(self, batch: pa.Table) -> pa.Table:
        from ..rundir import write_quarantine_part

        rows, bad = [], []
        responses = (batch.column(self.response_field).to_pylist() if self.response_field in batch.column_names
                     else [None] * len(batch))
        for row, response in zip(batch.select(["id", self.prompt_field, SOURCE_FILE, SOURCE_LINE, ORDER])
                                 .to_pylist(), responses):
            if not isinstance(response, str) or not response.strip():
                what = "missing" if response is None else ("not a string" if not isinstance(response, str)
                                                          else "empty")
                bad.append({"file": row[SOURCE_FILE], "line": row[SOURCE_LINE],
                            "reason": f"response field {self.response_field!r} {what}"})
                continue
            prompt = ([{"role": "system", "content": self.system}] if self.system else []) + [
                {"role": "user", "content": row[self.prompt_field]}]
            held_out = zlib.crc32(str(row["id"]).encode()) % 10_000 < self.fraction * 10_000
            rows.append({"id": str(row["id"]), ORDER: row[ORDER], "prompt": prompt,
                         "completion": [{"role": "assistant", "content": response}],
                         "split": "validation" if held_out else "train"})
        if bad:
            write_quarantine_part(self.parts, f"responses-{bad[0]['file'].replace('/', '_')}-{bad[0]['line']}.jsonl",
                                  bad)
        return pa.Table.from_pylist(rows, schema=CONVERSATION_SCHEMA)


MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
CONVERSATION_SCHEMA = pa.schema([("id", pa.string()), (ORDER, pa.int64()), ("prompt", MESSAGES),
                                 ("completion", MESSAGES), ("split", pa.string())])


def write_samples(cfg: FinetuneConfig, data: list[str], prompt_field: str, stage: StageDir) -> tuple[dict, list]:
    """The samples as conversations in ``samples/train`` and ``samples/validation``; (counts, quarantined rows)."""
    parts = stage.child(QUARANTINE_PARTS)
    rows = read_corpus(CorpusSpec(data, prompt_field, cfg.id_field), num_cpus=READ_TASK_CPUS, quarantine_dir=parts)
    converted = rows.map_batches(ToConversations, fn_constructor_args=(prompt_field, cfg.response_field,
                                                                       cfg.system_prompt, cfg.validation_fraction,
                                                                       parts),
                                 batch_format="pyarrow", compute=_one_actor()).materialize()
    from ray.data.expressions import col

    counts = {}
    for split in ("train", "validation"):
        part = converted.filter(expr=col("split") == split).drop_columns(["split"]).sort(ORDER).materialize()
        counts[split] = part.count()
        if counts[split]:
            part.write_parquet(stage.child(SAMPLES_DIR, split))
    return counts, gather_quarantine(stage, "data")


def _one_actor():
    from ray.data import ActorPoolStrategy

    return ActorPoolStrategy(size=1)


def run_finetune(cfg: FinetuneConfig, stage: StageDir, recipe, fingerprint: str) -> dict:
    from ..resources import cluster_cpus, cluster_gpus

    clock = StageClock()
    data = cfg.data or [upstream_samples(recipe)]
    with clock.phase("prepare"):
        counts, quarantined = write_samples(cfg, data, prompt_field_of(cfg, recipe), stage)
    if counts["train"] < cfg.training.workers:
        raise StageError(f"finetune.data: {counts['train']} training sample(s) for {cfg.training.workers} workers")
    total = plan_steps(counts["train"], cfg.training)
    progress(f"[finetune] {counts['train']:,} samples ({counts['validation']:,} held out), {total:,} steps of LoRA "
             f"r {cfg.lora.r} on {cfg.model}")
    outputs = {"model": _absolute(stage.child(ADAPTER_DIR)), "metrics": _absolute(stage.child("metrics.jsonl")),
               **({"merged": _absolute(stage.child(MODEL_DIR))} if cfg.merge else {})}
    loop = {"model": cfg.model, "model_path": model_path(cfg.model),
            "train_data": _absolute(stage.child(SAMPLES_DIR, "train")),
            "eval_data": {"validation": _absolute(stage.child(SAMPLES_DIR, "validation"))} if counts["validation"]
            else {}, "has_eval": bool(counts["validation"]), "lora": cfg.lora.model_dump(mode="json"),
            "outputs": outputs, "max_length": cfg.max_length}
    with clock.phase("train"):
        fit_hf("finetune", "sft", stage, stage.child(RAY_DIR), f"finetune-{fingerprint}", cfg.training, loop, total,
               cluster_cpus(), cluster_gpus())
    history = read_metrics(stage)
    return trained_report("finetune", cfg, stage, history, total, counts, quarantined, clock,
                          f"LoRA SFT of {cfg.model}" + (f" (preset {cfg.preset})" if cfg.preset else ""))


def trained_report(name: str, cfg, stage: StageDir, history: list[dict], total: int, counts: dict,
                   quarantined: list, clock: StageClock, title: str, extra_rows=(), extra: Optional[dict] = None,
                   rows_used: Optional[int] = None, unit: str = "samples") -> dict:
    """report.json and report.md of a LoRA stage (finetune, preference): losses over steps, what it trained on
    (``counts`` of ``unit``: train and validation; ``rows_used``: input rows behind them, when they differ), outputs."""
    loss = [(h["step"], h["loss"]) for h in train_entries(history)]
    validation = [(h["step"], h["eval_validation_loss"]) for h in eval_entries(history, "validation")]
    stage.write_bytes("loss.png", curve_png([("training loss", loss), ("validation loss", validation)],
                                            f"{name}: loss", "loss"))
    used = counts["train"] + counts["validation"] if rows_used is None else rows_used
    report = {
        "stage": name, "rows_in": used + len(quarantined) + sum((extra or {}).get("rows_filtered", {}).values()),
        "rows_out": used, "rows_quarantined": len(quarantined), "rows_filtered": (extra or {}).get("rows_filtered",
                                                                                                    {}),
        "steps": total, "final_loss": loss[-1][1] if loss else float("nan"),
        "validation_loss": validation[-1][1] if validation else None, unit: counts, "model": cfg.model,
        "lora": cfg.lora.model_dump(mode="json"), **{k: v for k, v in (extra or {}).items() if k != "rows_filtered"},
        **clock.timings(),
        "outputs": {"adapter": stage.child(ADAPTER_DIR), "metrics": stage.child("metrics.jsonl"),
                    "quarantine": stage.child("quarantine.jsonl"),
                    **({"model": stage.child(MODEL_DIR)} if getattr(cfg, "merge", False) else {})},
    }
    write_report(stage, report, "\n".join([
        f"# {name} — {title}", "", markdown_table([
            (unit, f"{counts['train']:,} train, {counts['validation']:,} validation; input rows used {used:,}, "
                   f"quarantined {len(quarantined):,}"), *extra_rows,
            ("LoRA", f"r {cfg.lora.r}, alpha {cfg.lora.alpha:g}, dropout {cfg.lora.dropout:g}, "
                     f"{cfg.lora.target_modules}"),
            ("steps", f"{total:,} (lr {cfg.training.lr:g}, {cfg.training.schedule}, batch {cfg.training.batch_size} "
                      f"x {cfg.training.gradient_accumulation} x {cfg.training.workers} workers)"),
            ("training loss", first_last(loss)), ("validation loss", first_last(validation)),
            ("adapter", stage.child(ADAPTER_DIR)), ("seconds", report["seconds"])]), "", "![loss](loss.png)", ""]))
    return report


class Finetune(Stage):
    name, config, report = "finetune", FinetuneConfig, TrainedReport
    help = ("LoRA SFT on the synthetic samples with TRL's SFTTrainer on Ray Train (presets craft and domino); a "
            "PEFT adapter folder.")
    kept_on_retry = (RAY_DIR,)

    def check_recipe(self, cfg: FinetuneConfig, recipe) -> None:
        if cfg.data is None and upstream_samples(recipe) is None:
            raise ValueError("finetune.data: required unless the recipe has a synthesize, qc or judge section")

    def preflight(self, cfg: FinetuneConfig, recipe) -> None:
        from .softprompt import check_resources

        check_model("finetune.model", cfg.model)
        if cfg.data is not None:
            check_inputs("finetune.data", cfg.data)
        if recipe.ray.address is None and recipe.ray.num_cpus is not None:
            check_resources(cfg.training, recipe.ray.num_cpus, float("inf"), "finetune.training")

    def upstream(self, cfg: FinetuneConfig, recipe) -> dict[str, str]:
        return {} if cfg.data else {"finetune.data": upstream_samples(recipe)}

    def run(self, cfg: FinetuneConfig, stage: StageDir, recipe) -> dict:
        return run_finetune(cfg, stage, recipe, recipe.stage_fingerprint(self.name))

    def summary(self, r: TrainedReport) -> str:
        return (f"finetune: {r.rows_out:,} samples, {r.steps:,} steps, final loss {r.final_loss:.3f}; quarantined "
                f"{r.rows_quarantined:,}")
