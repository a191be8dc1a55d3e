"""TRAIT's continual pretraining, in stages: stage ``knowledge`` on the in-domain documents and ``select``'s output,
then stage ``tasks`` on the task-oriented passages (``synthesize`` trait output, after ``qc``/``judge`` when the
recipe has them), each stage starting from the model the one before it wrote, and each mixing a share of replay
data back in against forgetting — general text in both, stage-1 data in stage 2 — by an exact number of tokens.

Per stage: the documents are tokenised and packed on Ray Data (``packing.py``), the model trains on Ray Train workers
(Hugging Face ``Trainer``, DeepSpeed ZeRO or DDP; full parameters, or LoRA merged at the end), every ``eval_every``
steps it is scored on held-out domain text and held-out general text (perplexity: learning, and forgetting), and
``<run>/pretrain/<stage>/model`` is a Hugging Face model folder (safetensors and tokenizer) that every engine,
``evaluate`` and ``serve`` load. ``report.md`` draws the loss and both perplexities over all steps with the stage
boundary marked (TRAIT's Figure 4).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

from pydantic import Field, field_validator, model_validator

from .. import paths
from ..report import markdown_table, write_report
from ..rundir import StageDir, StageError
from ..schema import InputPaths, ModelRef, Strict
from ..stage import Stage, StageClock, StageReport, check_inputs, check_model, progress
from . import packing
from .hf_run import (LoraSettings, TrainingSettings, curve_png, eval_entries, first_last, fit_hf, model_path,
                     plan_steps, read_metrics, train_entries)
from .softprompt import _absolute

PACKED_DIR, RAY_DIR, MODEL_DIR, ADAPTER_DIR = "packed", "ray", "model", "adapter"
PACKED_SUMMARY = "summary.json"  # written last: packing finished
DEFAULT_REPLAY_SHARE = 0.1  # of a stage's tokens, for each default replay source


@dataclass
class TextSource:
    """Documents for continual pretraining: files and the field holding their text."""
    files: list[str]
    text_field: str = "text"
    id_field: str = "id"


class ReplaySource(Strict):
    """A share of a stage's tokens taken from other data: general text (``files``) or an earlier stage's data."""
    share: float = Field(gt=0, lt=1, description="This source's share of the stage's training tokens.")
    files: Optional[InputPaths] = Field(None, description="General text to replay (JSONL/Parquet).")
    text_field: str = Field("text", description="files: the field holding a document's text.")
    stage: Optional[str] = Field(None, description="An earlier stage of this pretrain section, whose data is "
                                                   "replayed.")

    @model_validator(mode="after")
    def _one_source(self) -> "ReplaySource":
        if (self.files is None) == (self.stage is None):
            raise ValueError("replay: give files (general text) or stage (an earlier stage's name), one of them")
        return self


class PretrainStageConfig(Strict):
    """One stage of continual pretraining."""
    name: str = Field(description="The stage's name, as its outputs appear under pretrain/: letters, digits, "
                                         "- and _.")
    data: Optional[InputPaths] = Field(None, description="Its documents (JSONL/Parquet); null = TRAIT's default for "
                                       "knowledge (the select section's in-domain files and output) or tasks (the "
                                       "trait passages).")
    text_field: str = Field("text", description="data: the field holding a document's text.")
    replay: Optional[list[ReplaySource]] = Field(None, description="Replay sources; null = general text at 0.1 "
                                                 "(pretrain.general, else select's corpus) and, after the first "
                                                 "stage, the previous stage's data at 0.1; [] = none.")
    epochs: Optional[float] = Field(None, gt=0, description="Passes over the stage's mix (null = training.epochs).")
    max_steps: Optional[int] = Field(None, gt=0, description="Steps of this stage (null = training.max_steps).")
    lr: Optional[float] = Field(None, gt=0, description="Peak learning rate (null = training.lr).")

    @field_validator("name")
    @classmethod
    def _folder_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", v) or v in (PACKED_DIR, RAY_DIR):
            raise ValueError(f"{v!r} is not a stage name (letters, digits, - and _; not {PACKED_DIR} or {RAY_DIR})")
        return v

    @model_validator(mode="after")
    def _shares_leave_room(self) -> "PretrainStageConfig":
        if self.replay and sum(r.share for r in self.replay) >= 0.95:
            raise ValueError("replay: the shares add up to 0.95 or more; the stage's own data needs the rest")
        return self


class PretrainEval(Strict):
    """Held-out text scored every ``training.eval_every`` steps (perplexity)."""
    domain: Optional[InputPaths] = Field(None, description="Domain text (JSONL/Parquet); null = blocks held out of "
                                                           "the first stage's data.")
    general: Optional[InputPaths] = Field(None, description="General text (forgetting); null = blocks held out of "
                                                            "the general replay text.")
    text_field: str = Field("text", description="The field holding the text of both.")
    holdout_blocks: int = Field(32, gt=0, description="Blocks held out (never trained on) when a set is null.")
    max_blocks: int = Field(64, gt=0, description="At most this many blocks of each set are scored.")


class PretrainTraining(TrainingSettings):
    """Training settings with continual pretraining's defaults."""
    lr: float = Field(5e-5, gt=0, description="Peak learning rate (AdamW).")
    warmup_steps: int = Field(10, ge=0, description="Steps of linear warmup.")


class PretrainConfig(Strict):
    """TRAIT's two-stage continual pretraining (or any list of stages) on Ray Train."""
    model: ModelRef = Field(description="The causal LM to continue pretraining: Hugging Face id or folder.")
    stages: list[PretrainStageConfig] = Field(
        default_factory=lambda: [PretrainStageConfig(name="knowledge"), PretrainStageConfig(name="tasks")],
        min_length=1, description="In order; each starts from the model the one before wrote.")
    general: Optional[InputPaths] = Field(None, description="General text for replay and forgetting (JSONL/Parquet); "
                                                            "null = the select section's corpus.")
    general_text_field: str = Field("text", description="general: the field holding a document's text.")
    block_size: int = Field(1024, gt=1, description="Tokens per packed training sequence.")
    lora: Optional[LoraSettings] = Field(None, description="Train LoRA adapters (merged into the model at the end of "
                                                           "each stage) instead of all parameters.")
    eval: PretrainEval = PretrainEval()
    training: PretrainTraining = PretrainTraining()
    tokenizer_actors: int = Field(1, gt=0, description="Ray Data actors tokenising documents.")

    @model_validator(mode="after")
    def _names_unique_and_replay_earlier(self) -> "PretrainConfig":
        names = [s.name for s in self.stages]
        for i, s in enumerate(self.stages):
            if names.index(s.name) != i:
                raise ValueError(f"stages[{i}].name: {s.name!r} is used twice")
            for r in s.replay or []:
                if r.stage is not None and r.stage not in names[:i]:
                    raise ValueError(f"stages[{i}].replay.stage: {r.stage!r} is not an earlier stage "
                                     f"({', '.join(names[:i]) or 'none before it'})")
        return self


class PretrainReport(StageReport):
    steps: dict[str, int]
    final_loss: dict[str, float]


# --------------------------------------------------------------------------------------------- inputs of each stage
def stage_data(s: PretrainStageConfig, recipe) -> list[TextSource]:
    """A stage's documents: as given, else TRAIT's defaults."""
    if s.data is not None:
        return [TextSource(s.data, s.text_field)]
    if s.name == "knowledge" and recipe.select is not None:
        sel = recipe.select
        return [TextSource(sel.in_domain, sel.in_domain_text_field or sel.text_field),
                TextSource([paths.join(recipe.run_dir, "select", "data")], sel.text_field)]
    if s.name == "tasks":
        upstream = next((name for name in ("judge", "qc", "synthesize") if getattr(recipe, name) is not None), None)
        if upstream is not None:
            return [TextSource([paths.join(recipe.run_dir, upstream, "data")])]
    raise ValueError(f"pretrain.stages[{s.name}].data: required (TRAIT's default needs a select section for "
                     f"'knowledge', a synthesize section for 'tasks')")


def general_text(cfg: PretrainConfig, recipe) -> Optional[list[TextSource]]:
    if cfg.general is not None:
        return [TextSource(cfg.general, cfg.general_text_field)]
    if recipe.select is not None:
        return [TextSource(recipe.select.corpus, recipe.select.text_field)]
    return None


def stage_replay(cfg: PretrainConfig, i: int, recipe) -> list[ReplaySource]:
    s = cfg.stages[i]
    if s.replay is not None:
        return s.replay
    replay = []
    general = general_text(cfg, recipe)
    if general is not None:
        replay.append(ReplaySource(share=DEFAULT_REPLAY_SHARE, files=general[0].files,
                                   text_field=general[0].text_field))
    if i > 0:
        replay.append(ReplaySource(share=DEFAULT_REPLAY_SHARE, stage=cfg.stages[i - 1].name))
    return replay


# --------------------------------------------------------------------------------------------------------- the run
def run_pretrain(cfg: PretrainConfig, stage: StageDir, recipe, fingerprint: str) -> dict:
    from ..resources import cluster_cpus, cluster_gpus

    clock = StageClock()
    packed = StageDir(stage.child(PACKED_DIR, fingerprint))
    _forget_other(stage, PACKED_DIR, fingerprint)
    with clock.phase("pack"):
        summary = packed.read_json(PACKED_SUMMARY)
        if summary is None:  # packing is redone whole unless it finished (its summary is written last)
            packed.clear()
            summary = pack_all(cfg, recipe, stage, packed)
            packed.write_json(PACKED_SUMMARY, summary)
        else:
            progress(f"[pretrain] packed data of an earlier attempt reused: {packed.uri}")
    stage.write_jsonl("quarantine.jsonl", summary["quarantined"])
    reports, model = {}, cfg.model
    cpus, gpus = cluster_cpus(), cluster_gpus()
    for s, mix in zip(cfg.stages, summary["mixes"]):
        t = cfg.training.model_copy(update={k: v for k, v in (("epochs", s.epochs), ("max_steps", s.max_steps),
                                                               ("lr", s.lr)) if v is not None})
        total = plan_steps(mix["blocks"], t)
        out = StageDir(stage.child(s.name))
        out.delete(MODEL_DIR)  # an interrupted attempt's: rewritten from the final checkpoint
        progress(f"[pretrain] stage {s.name}: {mix['blocks']:,} blocks of {cfg.block_size} tokens "
                 f"({mix['replay_share']:.1%} replay), {total:,} steps from {model}")
        outputs = {"model": _absolute(out.child(MODEL_DIR)), "metrics": _absolute(out.child("metrics.jsonl"))}
        if cfg.lora:  # the adapter, and the merged model where the next stage and every engine find a model
            outputs = {**outputs, "model": _absolute(out.child(ADAPTER_DIR)), "merged": outputs["model"]}
        loop = {"model": model, "model_path": model_path(model), "train_data": _absolute(mix["uri"]),
                "eval_data": {k: _absolute(v) for k, v in summary["eval_data"].items()}, "has_eval": True,
                "lora": cfg.lora.model_dump(mode="json") if cfg.lora else None, "outputs": outputs}
        with clock.phase(f"train {s.name}"):
            fit_hf("pretrain", "causal_lm", stage, stage.child(RAY_DIR, s.name), f"{s.name}-{fingerprint}", t, loop,
                   total, cpus, gpus)
        reports[s.name] = {"steps": total, "history": read_metrics(out), "mix": mix}
        model = _absolute(out.child(MODEL_DIR))
    return _report(cfg, stage, reports, summary, clock)


def pack_all(cfg: PretrainConfig, recipe, stage: StageDir, packed: StageDir) -> dict:
    """Every stage's mix and the held-out sets, written under ``packed``; what the report needs of them."""
    general = general_text(cfg, recipe)
    cache: dict[str, packing.Packed] = {}

    def pack(key: str, sources: list[TextSource]) -> packing.Packed:
        if key not in cache:
            parts = [packing.pack_source(key, s.files, s.text_field, s.id_field, cfg.model, cfg.block_size, stage,
                                         cfg.tokenizer_actors) for s in sources]
            cache[key] = _merge_packed(key, parts, cfg.block_size)
        return cache[key]

    # The held-out sets first: their blocks never reach training.
    first = pack(cfg.stages[0].name, stage_data(cfg.stages[0], recipe))
    heldout_domain, cache[cfg.stages[0].name] = _heldout(first, cfg.eval.domain, cfg, pack, "eval-domain")
    eval_data = {"domain": _write_eval(heldout_domain, packed.child("eval-domain"), cfg)}
    if cfg.eval.general is not None or general is not None:
        pool = pack("general", general) if general is not None else None
        heldout_general, rest = _heldout(pool, cfg.eval.general, cfg, pack, "eval-general")
        if rest is not None:
            cache["general"] = rest
        eval_data["general"] = _write_eval(heldout_general, packed.child("eval-general"), cfg)
    mixes = [_mix_stage(cfg, i, recipe, pack, packed.child(s.name), cache) for i, s in enumerate(cfg.stages)]
    return {"eval_data": eval_data, "mixes": mixes, "documents": sum(p.documents for p in cache.values()),
            "quarantined": [q for p in cache.values() for q in p.quarantined]}


def _merge_packed(name: str, parts: list[packing.Packed], block_size: int) -> packing.Packed:
    blocks = parts[0].blocks.union(*[p.blocks for p in parts[1:]]) if len(parts) > 1 else parts[0].blocks
    return packing.Packed(name, blocks, sum(p.documents for p in parts), [q for p in parts for q in p.quarantined],
                          sum(p.tokens for p in parts), sum(p.num_blocks for p in parts), block_size)


def _heldout(pool: Optional[packing.Packed], given: Optional[list[str]], cfg: PretrainConfig, pack, key: str):
    """(held-out blocks, the pool less them): the given set, else ``holdout_blocks`` drawn out of the pool."""
    if given is not None:
        return pack(key, [TextSource(given, cfg.eval.text_field)]).blocks, pool
    if pool is None:
        return None, None
    n = cfg.eval.holdout_blocks
    if pool.num_blocks < 2 * n:
        raise StageError(f"pretrain.eval.holdout_blocks: {pool.name} packs into {pool.num_blocks:,} blocks of "
                         f"{cfg.block_size} tokens, too few to hold {n} out (give eval text, or fewer blocks)")
    heldout, rest = pool.blocks.random_shuffle(seed=cfg.training.seed).split_at_indices([n])
    return heldout, packing.Packed(pool.name, rest, pool.documents, pool.quarantined, pool.tokens,
                                   pool.num_blocks - n, pool.block_size)


def _write_eval(blocks, uri: str, cfg: PretrainConfig) -> str:
    blocks.limit(cfg.eval.max_blocks).write_parquet(uri, row_group_size=packing.ROWS_PER_GROUP)
    return uri


def _mix_stage(cfg: PretrainConfig, i: int, recipe, pack, uri: str, cache: dict) -> dict:
    """The stage's own blocks and its replay blocks (exact counts), shuffled together and written to ``uri``."""
    s = cfg.stages[i]
    own = cache[s.name] if s.name in cache else pack(s.name, stage_data(s, recipe))
    replay = stage_replay(cfg, i, recipe)
    counts = packing.replay_counts([r.share for r in replay], own.num_blocks)
    parts, sources = [packing.tagged(own.blocks, s.name)], {s.name: own.num_blocks}
    for k, r in enumerate(replay):
        if r.stage is not None:
            label, pool = r.stage, cache[r.stage]
        elif [TextSource(r.files, r.text_field)] == general_text(cfg, recipe):
            label, pool = "general", pack("general", general_text(cfg, recipe))
        else:
            label, pool = f"{s.name}-replay-{k}", pack(f"{s.name}-replay-{k}", [TextSource(r.files, r.text_field)])
        count = counts[k]
        field = f"pretrain.stages[{i}].replay[{k}].share"
        parts.append(packing.tagged(packing.take_blocks(pool.blocks, count, pool.num_blocks,
                                                        cfg.training.seed + 7919 * (i + 1) + k, field, label),
                                    f"replay:{label}"))
        sources[f"replay:{label}"] = count
    blocks = packing.write_mix(parts, uri, cfg.training.seed + i)
    replayed = sum(v for k, v in sources.items() if k.startswith("replay:"))
    return {"uri": uri, "blocks": blocks, "blocks_by_source": sources,
            "replay_share_target": round(sum(r.share for r in replay), 6),
            "replay_share": replayed / blocks if blocks else 0.0, "tokens": blocks * cfg.block_size,
            "documents": own.documents, "document_tokens": own.tokens, "dropped_tokens": own.dropped_tokens}


def _forget_other(stage: StageDir, folder: str, keep: str) -> None:
    from .softprompt import _forget_other_runs

    _forget_other_runs(stage, keep, folder)


def _report(cfg: PretrainConfig, stage: StageDir, reports: dict, summary: dict, clock: StageClock) -> dict:
    """report.json and report.md: per stage its mix and steps; the curves over all stages, boundaries marked."""
    quarantined, documents = summary["quarantined"], summary["documents"]
    offset, loss, ppl_domain, ppl_general, bounds = 0, [], [], [], []
    for name, r in reports.items():
        if offset:
            bounds.append((offset + 0.5, f"{name} starts"))
        loss += [(offset + h["step"], h["loss"]) for h in train_entries(r["history"])]
        ppl_domain += [(offset + h["step"], _ppl(h["eval_domain_loss"])) for h in eval_entries(r["history"], "domain")]
        ppl_general += [(offset + h["step"], _ppl(h["eval_general_loss"]))
                        for h in eval_entries(r["history"], "general")]
        offset += r["steps"]
    stage.write_bytes("loss.png", curve_png([("training loss", loss)], "pretrain: training loss", "nats / token",
                                            bounds))
    stage.write_bytes("perplexity.png", curve_png([("held-out domain text", ppl_domain),
                                                   ("held-out general text (forgetting)", ppl_general)],
                                                  "pretrain: held-out perplexity", "perplexity", bounds, log_y=True))
    report = {
        "stage": "pretrain", "rows_in": documents + len(quarantined), "rows_out": documents,
        "rows_quarantined": len(quarantined), "model": cfg.model, "block_size": cfg.block_size,
        "steps": {n: r["steps"] for n, r in reports.items()},
        "final_loss": {n: (train_entries(r["history"]) or [{"loss": math.nan}])[-1]["loss"]
                       for n, r in reports.items()},
        "mixes": {n: {k: v for k, v in r["mix"].items() if k != "uri"} for n, r in reports.items()},
        "perplexity": {"domain": ppl_domain, "general": ppl_general},
        "tokens_per_second": {n: next((h["tokens_per_s"] for h in reversed(r["history"]) if "tokens_per_s" in h), 0)
                              for n, r in reports.items()},
        "lora": cfg.lora is not None, "strategy": cfg.training.resolved_strategy, **clock.timings(),
        "outputs": {**{f"{n}_model": stage.child(n, MODEL_DIR) for n in reports},
                    "quarantine": stage.child("quarantine.jsonl")},
    }
    rows = []
    for n, r in reports.items():
        mix = r["mix"]
        rows += [(f"{n}: data", f"{mix['documents']:,} documents, {mix['document_tokens']:,} tokens "
                                f"({mix['dropped_tokens']:,} left over at packing)"),
                 (f"{n}: mix", ", ".join(f"{k} {v:,}" for k, v in mix["blocks_by_source"].items())
                  + f" blocks; replay {mix['replay_share']:.2%} of tokens (target {mix['replay_share_target']:.2%})"),
                 (f"{n}: steps", f"{r['steps']:,}; loss "
                                 f"{first_last([(h['step'], h['loss']) for h in train_entries(r['history'])])}"),
                 (f"{n}: model", stage.child(n, MODEL_DIR))]
    rows += [("held-out domain perplexity", first_last(ppl_domain)),
             ("held-out general perplexity", first_last(ppl_general)), ("seconds", report["seconds"])]
    write_report(stage, report, "\n".join([
        f"# pretrain — continual pretraining of {cfg.model} in {len(reports)} stage(s)", "", markdown_table(rows), "",
        "![loss](loss.png)", "", "![perplexity](perplexity.png)", ""]))
    return report


def _ppl(loss: float) -> float:
    return round(math.exp(min(loss, 50.0)), 4)


class Pretrain(Stage):
    name, config, report = "pretrain", PretrainConfig, PretrainReport
    help = ("TRAIT's continual pretraining in stages (knowledge, then tasks) with replay by exact token shares, "
            "packed on Ray Data and trained on Ray Train (DeepSpeed or DDP); a model folder per stage.")
    kept_on_retry = (PACKED_DIR, RAY_DIR)  # the packed mix and the checkpoints: a rerun resumes from them

    def check_recipe(self, cfg: PretrainConfig, recipe) -> None:
        for s in cfg.stages:
            stage_data(s, recipe)

    def preflight(self, cfg: PretrainConfig, recipe) -> None:
        from .softprompt import check_resources

        check_model("pretrain.model", cfg.model)
        for i, s in enumerate(cfg.stages):
            if s.data is not None:
                check_inputs(f"pretrain.stages[{i}].data", s.data)
            for k, r in enumerate(s.replay or []):
                if r.files is not None:
                    check_inputs(f"pretrain.stages[{i}].replay[{k}].files", r.files)
        for field, given in (("general", cfg.general), ("eval.domain", cfg.eval.domain),
                             ("eval.general", cfg.eval.general)):
            if given is not None:
                check_inputs(f"pretrain.{field}", given)
        if recipe.ray.address is None and recipe.ray.num_cpus is not None:
            check_resources(cfg.training, recipe.ray.num_cpus, float("inf"), "pretrain.training")

    def upstream(self, cfg: PretrainConfig, recipe) -> dict[str, str]:
        found = {}
        for i, s in enumerate(cfg.stages):
            if s.data is None:
                for source in stage_data(s, recipe):
                    for f in source.files:
                        if f.startswith(str(recipe.run_dir)):
                            found[f"pretrain.stages[{i}].data"] = f
        return found

    def run(self, cfg: PretrainConfig, stage: StageDir, recipe) -> dict:
        return run_pretrain(cfg, stage, recipe, recipe.stage_fingerprint(self.name))

    def summary(self, r: PretrainReport) -> str:
        return (f"pretrain: {r.rows_out:,} documents; " + ", ".join(f"{n} {s:,} steps (loss {r.final_loss[n]:.3f})"
                                                                    for n, s in r.steps.items()))
