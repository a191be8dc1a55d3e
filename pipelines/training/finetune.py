"""CRAFT's and DOMINO's last step: LoRA supervised fine-tuning on the synthetic samples, with TRL's ``SFTTrainer`` on
Ray Train workers. Each sample — instruction and response fields, or a conversation of chat turns whose last is the
assistant's — becomes a prompt-completion conversation (the model's chat template applied, the loss on the response
only); a held-out share of the samples gives the validation loss. Presets carry the papers'
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
from ..corpus import ORDER, READ_TASK_CPUS, SOURCE_FILE, SOURCE_LINE, CorpusSpec, first_record, read_corpus
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
    model: Optional[ModelRef] = Field(None, description="The base causal LM: Hugging Face id or folder; null = the "
                                                      "model of the recipe's last pretrain stage.")
    preset: Optional[Literal["craft", "domino"]] = Field(None, description="The paper's LoRA and optimizer "
                                                         "settings (fields set here override them).")
    prompt_field: Optional[str] = Field(None, description="The field holding the instruction; null = input when "
                                        "the recipe synthesizes with domino, else instruction (CRAFT's format).")
    response_field: str = Field("output", description="The field holding the response to learn to write.")
    format: Literal["auto", "fields", "messages"] = Field(
        "auto", description="fields: prompt_field and response_field; messages: a conversation in messages_field "
                            "(a list of {role, content} turns, the last the assistant's: the response learnt); auto = "
                            "messages when the first sample's messages_field is a list, else fields.")
    messages_field: str = Field("messages", description="format messages: the field holding a conversation.")
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


def pretrained_model(recipe) -> Optional[str]:
    """The model the recipe's last pretrain stage writes (None without a pretrain section)."""
    if recipe.pretrain is None:
        return None
    return paths.join(recipe.run_dir, "pretrain", recipe.pretrain.stages[-1].name, "model")


def base_model(cfg: "FinetuneConfig", recipe) -> Optional[str]:
    """The model fine-tuned: as given, else the one the recipe pretrains."""
    return cfg.model or pretrained_model(recipe)


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
    """Ray Data batch function: each sample as a prompt (system and user messages; a conversation's turns before the
    last) and a completion (the assistant's response), with its split; a sample without a response is quarantined
    with file, line and reason. ``messages_field`` set: samples are conversations (the reader checked their turns)."""

    def __init__(self, prompt_field: str, response_field: str, system_prompt: Optional[str],
                 validation_fraction: float, quarantine_dir: str, messages_field: Optional[str] = None):
        self.prompt_field, self.response_field, self.messages_field = prompt_field, response_field, messages_field
        self.system, self.fraction, self.parts = system_prompt, validation_fraction, quarantine_dir

    def _conversation(self, row: dict, response) -> tuple[Optional[list], Optional[list], Optional[str]]:
        """(prompt turns, completion turns, why the sample is unusable)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        if self.messages_field is not None:
            turns = [{"role": t["role"], "content": t["content"]} for t in row[self.messages_field]]
            if turns[0]["role"] == "system":
                system = []  # the conversation's own system turn wins over system_prompt
            return system + turns[:-1], turns[-1:], None
        if not isinstance(response, str) or not response.strip():
            what = "missing" if response is None else ("not a string" if not isinstance(response, str) else "empty")
            return None, None, f"response field {self.response_field!r} {what}"
        return system + [{"role": "user", "content": row[self.prompt_field]}], \
            [{"role": "assistant", "content": response}], None

    def __call__(self, batch: pa.Table) -> pa.Table:
        from ..rundir import write_quarantine_part

        rows, bad = [], []
        responses = (batch.column(self.response_field).to_pylist() if self.response_field in batch.column_names
                     else [None] * len(batch))
        content = self.messages_field or self.prompt_field
        for row, response in zip(batch.select(["id", content, SOURCE_FILE, SOURCE_LINE, ORDER]).to_pylist(),
                                 responses):
            prompt, completion, problem = self._conversation(row, response)
            if problem is not None:
                bad.append({"file": row[SOURCE_FILE], "line": row[SOURCE_LINE], "reason": problem})
                continue
            held_out = zlib.crc32(str(row["id"]).encode()) % 10_000 < self.fraction * 10_000
            rows.append({"id": str(row["id"]), ORDER: row[ORDER], "prompt": prompt, "completion": completion,
                         "split": "validation" if held_out else "train"})
        if bad:
            write_quarantine_part(self.parts, f"responses-{bad[0]['file'].replace('/', '_')}-{bad[0]['line']}.jsonl",
                                  bad)
        return pa.Table.from_pylist(rows, schema=CONVERSATION_SCHEMA)


MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
CONVERSATION_SCHEMA = pa.schema([("id", pa.string()), (ORDER, pa.int64()), ("prompt", MESSAGES),
                                 ("completion", MESSAGES), ("split", pa.string())])


def sample_format(cfg: FinetuneConfig, data: list[str]) -> str:
    """fields or messages: as configured, else as the first sample reads."""
    if cfg.format != "auto":
        return cfg.format
    first = first_record(data)
    return "messages" if first is not None and isinstance(first.get(cfg.messages_field), list) else "fields"


def write_samples(cfg: FinetuneConfig, data: list[str], prompt_field: str, stage: StageDir
                  ) -> tuple[dict, list, str]:
    """The samples as conversations in ``samples/train`` and ``samples/validation``; (counts, quarantined rows, the
    samples' format)."""
    parts = stage.child(QUARANTINE_PARTS)
    messages = sample_format(cfg, data) == "messages"
    spec = (CorpusSpec(data, cfg.messages_field, cfg.id_field, text_kind="messages") if messages
            else CorpusSpec(data, prompt_field, cfg.id_field))
    rows = read_corpus(spec, num_cpus=READ_TASK_CPUS, quarantine_dir=parts)
    converted = rows.map_batches(ToConversations, fn_constructor_args=(prompt_field, cfg.response_field,
                                                                       cfg.system_prompt, cfg.validation_fraction,
                                                                       parts, cfg.messages_field if messages
                                                                       else None),
                                 batch_format="pyarrow", compute=_one_actor()).materialize()
    from ray.data.expressions import col

    counts = {}
    for split in ("train", "validation"):
        part = converted.filter(expr=col("split") == split).drop_columns(["split"]).sort(ORDER).materialize()
        counts[split] = part.count()
        if counts[split]:
            part.write_parquet(stage.child(SAMPLES_DIR, split))
    return counts, gather_quarantine(stage, "data"), "messages" if messages else "fields"


def _one_actor():
    from ray.data import ActorPoolStrategy

    return ActorPoolStrategy(size=1)


def run_finetune(cfg: FinetuneConfig, stage: StageDir, recipe, fingerprint: str) -> dict:
    from ..resources import cluster_cpus, cluster_gpus

    clock = StageClock()
    data = cfg.data or [upstream_samples(recipe)]
    with clock.phase("prepare"):
        counts, quarantined, sample_kind = write_samples(cfg, data, prompt_field_of(cfg, recipe), stage)
    if counts["train"] < cfg.training.workers:
        raise StageError(f"finetune.data: {counts['train']} training sample(s) for {cfg.training.workers} workers")
    total = plan_steps(counts["train"], cfg.training)
    model = base_model(cfg, recipe)
    progress(f"[finetune] {counts['train']:,} samples ({counts['validation']:,} held out), {total:,} steps of LoRA "
             f"r {cfg.lora.r} on {model}")
    outputs = {"model": _absolute(stage.child(ADAPTER_DIR)), "metrics": _absolute(stage.child("metrics.jsonl")),
               **({"merged": _absolute(stage.child(MODEL_DIR))} if cfg.merge else {})}
    loop = {"model": model, "model_path": model_path(model),
            "train_data": _absolute(stage.child(SAMPLES_DIR, "train")),
            "eval_data": {"validation": _absolute(stage.child(SAMPLES_DIR, "validation"))} if counts["validation"]
            else {}, "has_eval": bool(counts["validation"]), "lora": cfg.lora.model_dump(mode="json"),
            "outputs": outputs, "max_length": cfg.max_length}
    with clock.phase("train"):
        fit_hf("finetune", "sft", stage, stage.child(RAY_DIR), f"finetune-{fingerprint}", cfg.training, loop, total,
               cluster_cpus(), cluster_gpus())
    history = read_metrics(stage)
    source = (f"conversations ({cfg.messages_field}: the last turn learnt)" if sample_kind == "messages"
              else f"fields {prompt_field_of(cfg, recipe)} -> {cfg.response_field}")
    return trained_report("finetune", cfg, model, stage, history, total, counts, quarantined, clock,
                          f"LoRA SFT of {model}" + (f" (preset {cfg.preset})" if cfg.preset else ""),
                          extra_rows=[("samples read as", source)], extra={"format": sample_kind})


def trained_report(name: str, cfg, model: str, stage: StageDir, history: list[dict], total: int, counts: dict,
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
        "validation_loss": validation[-1][1] if validation else None, unit: counts, "model": model,
        "lora": cfg.lora.model_dump(mode="json"), "strategy": cfg.training.resolved_strategy,
        **{k: v for k, v in (extra or {}).items() if k != "rows_filtered"},
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
                      f"x {cfg.training.gradient_accumulation} x {cfg.training.workers} workers, "
                      f"{cfg.training.resolved_strategy})"),
            ("training loss", first_last(loss)), ("validation loss", first_last(validation)),
            ("adapter", stage.child(ADAPTER_DIR)), ("seconds", report["seconds"])]), "", "![loss](loss.png)", ""]))
    return report


class Finetune(Stage):
    name, config, report = "finetune", FinetuneConfig, TrainedReport
    help = ("LoRA SFT on the synthetic samples with TRL's SFTTrainer on Ray Train (presets craft and domino); a "
            "PEFT adapter folder.")
    kept_on_retry = (RAY_DIR,)

    def check_recipe(self, cfg: FinetuneConfig, recipe) -> None:
        if base_model(cfg, recipe) is None:
            raise ValueError("finetune.model: required unless the recipe has a pretrain section (whose last stage's "
                             "model it then tunes)")
        if cfg.data is None and upstream_samples(recipe) is None:
            raise ValueError("finetune.data: required unless the recipe has a synthesize, qc or judge section")

    def preflight(self, cfg: FinetuneConfig, recipe) -> None:
        from .softprompt import check_resources

        if cfg.model is not None:  # else the pretrain stage's, written before this stage runs
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
