"""DiagnosticSLM's last step: direct preference optimisation (DPO) with TRL's ``DPOTrainer`` on Ray Train workers,
with LoRA (the reference model is the base with the adapter switched off).

The pairs come from a pairs file (``prompt``, ``chosen``, ``rejected``) or are built from ratings: for one prompt, a
response rated higher is chosen over one rated lower (``best_vs_worst``: the best against the worst; ``all``: every
pair at least ``min_margin`` apart). The ratings are a file of rated responses, or made here (``sample``: for each
prompt, several answers sampled from the model being aligned, each rated by the LLM judge against its prompt:
``preference_sampling.py``), or, with neither, this run's judge output (kept and dropped rows). Writes
``<run>/preference/adapter`` (a PEFT folder), ``pairs/``, ``metrics.jsonl`` and ``report.md``.
"""

from __future__ import annotations

import itertools
import zlib
from typing import Literal, Optional

import pyarrow as pa
from pydantic import Field, model_validator

from .. import paths
from ..corpus import ORDER, READ_TASK_CPUS, SOURCE_FILE, SOURCE_LINE, CorpusSpec, read_corpus
from ..rundir import QUARANTINE_PARTS, StageDir, StageError, gather_quarantine
from ..schema import IdField, InputPaths, ModelRef, Strict
from ..stage import Stage, StageClock, check_inputs, check_model, progress
from .finetune import MESSAGES, MODEL_DIR, TrainedReport, pretrained_model, trained_report
from .hf_run import LoraSettings, TrainingSettings, fit_hf, model_path, plan_steps, read_metrics
from .preference_sampling import (RESPONSE, SAMPLED_DIR, ResponseSampling, check_sampling, empty_result_error,
                                  sample_and_rate, sampling_prompts)
from .softprompt import _absolute

RAY_DIR, ADAPTER_DIR, PAIRS_DIR = "ray", "adapter", "pairs"
PAIR_SCHEMA = pa.schema([("prompt", MESSAGES), ("chosen", MESSAGES), ("rejected", MESSAGES),
                         ("margin", pa.float64())])


class PreferenceConfig(Strict):
    """DPO with TRL's DPOTrainer (LoRA) on pairs given or built from the judge's ratings, on Ray Train."""
    model: Optional[ModelRef] = Field(None, description="The model to align: Hugging Face id or folder; null = "
                                                      "finetune's merged model (finetune.merge), else the model of "
                                                      "the recipe's last pretrain stage.")
    pairs: Optional[InputPaths] = Field(None, description="Preference pairs (JSONL/Parquet: prompt, chosen, "
                                                        "rejected); instead of ratings.")
    ratings: Optional[InputPaths] = Field(None, description="Rated responses (several per prompt); null and no "
                                                          "pairs or sample = this run's judge output, kept and "
                                                          "dropped rows.")
    sample: Optional[ResponseSampling] = Field(None, description="Make the ratings here: answers sampled from the "
                                               "model, rated by the LLM judge (instead of pairs or ratings).")
    prompt_field: str = Field("prompt", description="ratings: the field holding the prompt responses share.")
    response_field: str = Field("completion", description="ratings: the field holding a response.")
    score_field: str = Field("judge_score", description="ratings: the field holding its score (higher is better).")
    id_field: IdField = "id"
    pairing: Literal["best_vs_worst", "all"] = Field("best_vs_worst", description="Pairs per prompt: the best "
                                                     "response against the worst, or every pair min_margin apart.")
    min_margin: float = Field(1.0, gt=0, description="Least score difference between chosen and rejected.")
    beta: float = Field(0.1, gt=0, description="DPO's beta (how far from the reference model).")
    system_prompt: Optional[str] = Field(None, description="A system message before each prompt.")
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="Share of pairs held out (by a hash of the "
                                                                  "prompt) for the validation loss.")
    max_length: int = Field(1024, gt=1, description="Tokens of prompt and response (longer ones are cut).")
    lora: LoraSettings = LoraSettings(r=16, alpha=32, dropout=0.05)
    merge: bool = Field(False, description="Also write the adapter merged into the model as a model folder (what "
                                           "the endpoint serves).")
    training: TrainingSettings = TrainingSettings(lr=5e-5, eval_every=20, checkpoint_every=20)

    @model_validator(mode="after")
    def _one_source(self) -> "PreferenceConfig":
        given = [name for name in ("pairs", "ratings", "sample") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"{given[0]}: give one of pairs, ratings or sample, not {' and '.join(given)}")
        return self


# ------------------------------------------------------------------------------------------------ pairs from ratings
def build_pairs(rows: list[dict], prompt_field: str, response_field: str, score_field: str, pairing: str,
                min_margin: float) -> tuple[list[dict], dict[str, int], int]:
    """(pairs, rows filtered by reason, rows used). Rows are grouped by their prompt; in a group, responses whose
    scores differ by ``min_margin`` or more make pairs, the higher-scored one chosen."""
    filtered = {"unrated": 0, "no_contrast": 0}
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if not isinstance(row.get(score_field), (int, float)) or isinstance(row.get(score_field), bool):
            filtered["unrated"] += 1
            continue
        groups.setdefault(row[prompt_field], []).append(row)
    pairs, used = [], 0
    for prompt, group in groups.items():
        ranked = sorted(group, key=lambda r: (-r[score_field], r[ORDER]))  # ties in file order: deterministic
        if pairing == "best_vs_worst":
            candidates = [(ranked[0], ranked[-1])]
        else:
            candidates = list(itertools.combinations(ranked, 2))
        made = [(a, b) for a, b in candidates if a[score_field] - b[score_field] >= min_margin]
        members = {id(r) for pair in made for r in pair}
        used += len(members)
        filtered["no_contrast"] += len(group) - len(members)
        pairs += [{"prompt": prompt, "chosen": a[response_field], "rejected": b[response_field],
                   "margin": float(a[score_field] - b[score_field])} for a, b in made]
    return pairs, filtered, used


def as_conversation(pair: dict, system_prompt: Optional[str]) -> dict:
    prompt = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": pair["prompt"]}]
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": pair["chosen"]}],
            "rejected": [{"role": "assistant", "content": pair["rejected"]}], "margin": pair.get("margin", 0.0)}


def policy_model(cfg: PreferenceConfig, recipe) -> Optional[str]:
    """The model aligned: as given, else the one the recipe fine-tunes (merged), else the one it pretrains."""
    if cfg.model is not None:
        return cfg.model
    if recipe.finetune is not None:
        return paths.join(recipe.run_dir, "finetune", MODEL_DIR) if recipe.finetune.merge else None
    return pretrained_model(recipe)


def adapted_model(recipe) -> Optional[str]:
    """The last whole model the recipe makes (what its endpoint serves): preference's merged model, else finetune's,
    else the last pretrain stage's; None when the recipe makes none (no training, or adapters left unmerged)."""
    if recipe.preference is not None:
        return paths.join(recipe.run_dir, "preference", MODEL_DIR) if recipe.preference.merge else None
    if recipe.finetune is not None:
        return paths.join(recipe.run_dir, "finetune", MODEL_DIR) if recipe.finetune.merge else None
    return pretrained_model(recipe)


def ratings_inputs(cfg: PreferenceConfig, recipe) -> Optional[list[str]]:
    if cfg.ratings is not None:
        return cfg.ratings
    if recipe.judge is not None:
        return [paths.join(recipe.run_dir, "judge", "data"), paths.join(recipe.run_dir, "judge", "dropped")]
    return None


def read_rows(inputs: list[str], text_field: str, id_field: str, stage: StageDir, columns: list[str]
              ) -> tuple[list[dict], list[dict]]:
    """The rows (malformed ones quarantined; ``text_field`` must be a non-empty string) and the quarantined rows."""
    ds = read_corpus(CorpusSpec(inputs, text_field, id_field), num_cpus=READ_TASK_CPUS,
                     quarantine_dir=stage.child(QUARANTINE_PARTS))
    kept = [c for c in columns + [ORDER, SOURCE_FILE, SOURCE_LINE]]
    rows = [{k: r.get(k) for k in kept} for r in ds.take_all()]
    return sorted(rows, key=lambda r: r[ORDER]), gather_quarantine(stage, "ratings")


def pairs_from_file(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """A pairs file's rows: (pairs, rows quarantined for a missing chosen or rejected response)."""
    pairs, bad = [], []
    for r in rows:
        missing = [k for k in ("chosen", "rejected") if not isinstance(r.get(k), str) or not r[k].strip()]
        if missing:
            bad.append({"file": r[SOURCE_FILE], "line": r[SOURCE_LINE], "reason": f"{' and '.join(missing)} missing "
                        f"or empty"})
        else:
            pairs.append({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"], "margin": 0.0})
    return pairs, bad


def write_pairs(pairs: list[dict], cfg: PreferenceConfig, stage: StageDir) -> dict[str, int]:
    import pyarrow.parquet as pq

    split = {"train": [], "validation": []}
    for p in pairs:
        held_out = zlib.crc32(p["prompt"].encode()) % 10_000 < cfg.validation_fraction * 10_000
        split["validation" if held_out else "train"].append(as_conversation(p, cfg.system_prompt))
    for name, rows in split.items():
        if rows:
            fs, root = StageDir(stage.child(PAIRS_DIR, name)).fs_path
            fs.create_dir(root, recursive=True)
            with fs.open_output_stream(f"{root}/pairs.parquet") as f:
                pq.write_table(pa.Table.from_pylist(rows, schema=PAIR_SCHEMA), f)
    return {k: len(v) for k, v in split.items()}


def run_preference(cfg: PreferenceConfig, stage: StageDir, recipe, fingerprint: str) -> dict:
    from ..resources import cluster_cpus, cluster_gpus

    clock = StageClock()
    model = policy_model(cfg, recipe)
    with clock.phase("pairs"):
        if cfg.pairs is not None:
            rows, quarantined = read_rows(cfg.pairs, "prompt", cfg.id_field, stage, ["prompt", "chosen", "rejected"])
            pairs, bad = pairs_from_file(rows)
            quarantined += bad
            filtered, used = {}, len(pairs)
            stage.write_jsonl("quarantine.jsonl", [{"input": "pairs", **q} for q in quarantined])
        else:
            if cfg.sample is not None:  # answers sampled from the model and rated by the judge, here
                sampled = sample_and_rate(cfg.sample, model, cfg.system_prompt, recipe, stage, fingerprint)
                inputs, fields = [sampled["rated"]], (sampled["prompt_field"], RESPONSE, "judge_score")
                id_field, earlier = cfg.sample.id_field, sampled["quarantined"]
            else:
                inputs, fields = ratings_inputs(cfg, recipe), (cfg.prompt_field, cfg.response_field, cfg.score_field)
                id_field, earlier = cfg.id_field, []
            prompt_field, response_field, score_field = fields
            rows, quarantined = read_rows(inputs, response_field, id_field, stage, list(fields))
            missing_prompt = [r for r in rows if not isinstance(r.get(prompt_field), str)]
            quarantined = earlier + quarantined + [
                {"input": "ratings", "file": r[SOURCE_FILE], "line": r[SOURCE_LINE],
                 "reason": f"prompt field {prompt_field!r} missing or not a string"} for r in missing_prompt]
            stage.write_jsonl("quarantine.jsonl", quarantined)
            rows = [r for r in rows if isinstance(r.get(prompt_field), str)]
            pairs, filtered, used = build_pairs(rows, prompt_field, response_field, score_field, cfg.pairing,
                                                cfg.min_margin)
        counts = write_pairs(pairs, cfg, stage)
    if cfg.sample is not None and counts["train"] < cfg.training.workers:
        raise empty_result_error(counts, sampled)
    if counts["train"] < cfg.training.workers:
        raise StageError(f"preference.{'pairs' if cfg.pairs else 'ratings'}: {counts['train']} training pair(s) for "
                         f"{cfg.training.workers} workers (no prompt had responses rated at least "
                         f"{cfg.min_margin:g} apart?)")
    total = plan_steps(counts["train"], cfg.training)
    progress(f"[preference] {counts['train']:,} pairs ({counts['validation']:,} held out), {total:,} DPO steps, "
             f"beta {cfg.beta:g}")
    loop = {"model": model, "model_path": model_path(model),
            "train_data": _absolute(stage.child(PAIRS_DIR, "train")),
            "eval_data": {"validation": _absolute(stage.child(PAIRS_DIR, "validation"))} if counts["validation"]
            else {}, "has_eval": bool(counts["validation"]), "lora": cfg.lora.model_dump(mode="json"),
            "beta": cfg.beta, "max_length": cfg.max_length,
            "outputs": {"model": _absolute(stage.child(ADAPTER_DIR)),
                        "metrics": _absolute(stage.child("metrics.jsonl")),
                        **({"merged": _absolute(stage.child(MODEL_DIR))} if cfg.merge else {})}}
    with clock.phase("train"):
        fit_hf("preference", "dpo", stage, stage.child(RAY_DIR), f"preference-{fingerprint}", cfg.training, loop,
               total, cluster_cpus(), cluster_gpus())
    history = read_metrics(stage)
    accuracy = [h["rewards/accuracies"] for h in history if "rewards/accuracies" in h]
    # Accounting in responses (ratings) or pair rows (a pairs file); the pairs themselves are counted apart.
    sampling = {}
    extra_rows = [("reward accuracy", f"{accuracy[0]:.2f} -> {accuracy[-1]:.2f}" if accuracy else "n/a")]
    if cfg.sample is not None:
        sampling = {"sampled": {k: sampled[k] for k in ("sampler", "judge", "responses_per_prompt", "rated")}}
        extra_rows.append(("answers", f"{cfg.sample.responses} per prompt from {sampled['sampler']}, rated by "
                                      f"{sampled['judge']} ({sampled['rated']})"))
    report = trained_report("preference", cfg, model, stage, history, total, counts, quarantined, clock,
                            f"DPO of {model} (beta {cfg.beta:g}, pairs "
                            f"{cfg.pairing if cfg.pairs is None else 'given'})", extra_rows=extra_rows,
                            extra={"rows_filtered": filtered, "beta": cfg.beta, **sampling}, rows_used=used,
                            unit="pairs")
    return report


class Preference(Stage):
    name, config, report = "preference", PreferenceConfig, TrainedReport
    help = ("DPO with TRL's DPOTrainer (LoRA) on Ray Train, on pairs given or built from the judge's ratings; a "
            "PEFT adapter folder.")
    kept_on_retry = (RAY_DIR, SAMPLED_DIR)  # checkpoints, and the rated answers: a rerun resumes from them

    def check_recipe(self, cfg: PreferenceConfig, recipe) -> None:
        if policy_model(cfg, recipe) is None:
            raise ValueError("preference.model: required unless the recipe's finetune merges its adapter "
                             "(finetune.merge: true) or, without finetune, it has a pretrain section")
        if cfg.sample is not None:
            check_sampling(cfg.sample, recipe)
        elif cfg.pairs is None and ratings_inputs(cfg, recipe) is None:
            raise ValueError("preference.ratings: give ratings, pairs or sample, or add a judge section whose "
                             "ratings it reads")

    def preflight(self, cfg: PreferenceConfig, recipe) -> None:
        from .softprompt import check_resources

        if cfg.model is not None:  # else an earlier stage's, written before this stage runs
            check_model("preference.model", cfg.model)
        for field in ("pairs", "ratings"):
            if getattr(cfg, field) is not None:
                check_inputs(f"preference.{field}", getattr(cfg, field))
        if cfg.sample is not None:
            for field in ("model", "judge_model"):
                if getattr(cfg.sample, field) is not None:
                    check_model(f"preference.sample.{field}", getattr(cfg.sample, field))
            if cfg.sample.prompts is not None:
                check_inputs("preference.sample.prompts", cfg.sample.prompts)
        if recipe.ray.address is None and recipe.ray.num_cpus is not None:
            check_resources(cfg.training, recipe.ray.num_cpus, float("inf"), "preference.training")

    def upstream(self, cfg: PreferenceConfig, recipe) -> dict[str, str]:
        if cfg.sample is not None and cfg.sample.prompts is None:
            return {"preference.sample.prompts": sampling_prompts(cfg.sample, recipe)[0]}
        return {}

    def run(self, cfg: PreferenceConfig, stage: StageDir, recipe) -> dict:
        return run_preference(cfg, stage, recipe, recipe.stage_fingerprint(self.name))

    def summary(self, r: TrainedReport) -> str:
        return (f"preference: {r.pairs['train']:,} pairs from {r.rows_out:,} rows, {r.steps:,} DPO steps, final loss "
                f"{r.final_loss:.3f}; quarantined {r.rows_quarantined:,}")
