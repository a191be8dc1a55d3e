"""The per-worker loop of soft-prompt learning under Ray Train (``TorchTrainer``): DDP or DeepSpeed over the domain
prompt Z, each worker's private prompts z_i in a table of its own with its own optimizer, a checkpoint every N steps
that every rank reports (rank 0 writes Z and the run's state, each rank its table; DeepSpeed writes its ZeRO
partitions), and resumption from the latest checkpoint whether Ray Train restarted a dead worker or the stage was
run again.

Every worker sees all (tokenised) references and keeps those whose index ``i % world == rank``: a sample's z_i lives
on one rank for the whole run. The order of a worker's batches is a function of (seed, epoch, rank), so a resumed
run takes the same steps an uninterrupted one would.
"""

from __future__ import annotations

import math
import os
import tempfile
import time

import numpy as np

STATE = "state.pt"  # rank 0: step, Z, the DDP optimizer, the per-step metrics so far
STEP = "checkpoint.json"  # rank 0: the step and the number of workers, for finding the latest checkpoint
DEEPSPEED_TAG = "zero"  # DeepSpeed's own checkpoint (ZeRO partitions of Z's optimizer), one tag per checkpoint


def private_part(rank: int) -> str:
    return f"private-rank{rank}.pt"


def rank_done(rank: int) -> str:
    return f"rank{rank}.done"  # written last by each rank: a checkpoint with every rank's marker is whole


def latest_checkpoint(run_folder: str):
    """The latest whole checkpoint of a run (every rank's files there) as a ``ray.train.Checkpoint``, or None; the
    run's folder is a local path or a URI (s3://, gs://: the same look-up reads the object store). A checkpoint that
    a kill cut short is passed over."""
    import json

    import pyarrow.fs as pafs
    import ray.train

    if "://" in run_folder:
        fs, root = pafs.FileSystem.from_uri(run_folder)
    else:
        fs, root = pafs.LocalFileSystem(), os.path.abspath(run_folder)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return None
    best, best_step = None, -1
    for info in fs.get_file_info(pafs.FileSelector(root)):
        if info.type != pafs.FileType.Directory:
            continue
        try:
            with fs.open_input_stream(f"{info.path}/{STEP}") as f:
                meta = json.loads(f.read())
        except (OSError, ValueError):
            continue
        markers = fs.get_file_info([f"{info.path}/{rank_done(r)}" for r in range(meta["world"])])
        whole = all(m.type == pafs.FileType.File for m in markers)
        if whole and meta["step"] > best_step:
            best, best_step = info.path, meta["step"]
    return ray.train.Checkpoint(best, filesystem=fs) if best else None


def plan_steps(num_samples: int, world: int, batch_size: int, epochs: int, max_steps: int | None) -> tuple[int, int]:
    """(steps per epoch, total steps). A worker holds ceil(N / world) samples at most; one step is one batch on
    every worker (a worker with fewer samples wraps around its own)."""
    per_worker = math.ceil(num_samples / world)
    per_epoch = math.ceil(per_worker / batch_size)
    return per_epoch, (max_steps if max_steps is not None else per_epoch * epochs)


def batch_indices(local_count: int, epoch: int, step_in_epoch: int, per_epoch: int, batch_size: int, seed: int,
                  rank: int) -> np.ndarray:
    """Positions (in this worker's samples) of one step's batch: a seeded permutation per epoch, wrapped around to
    fill every step."""
    order = np.random.default_rng([seed, epoch, rank]).permutation(local_count)
    order = np.resize(order, per_epoch * batch_size)
    return order[step_in_epoch * batch_size:(step_in_epoch + 1) * batch_size]


class ProgressFile:
    """Rank 0's progress lines, the latest few in a small JSON file (local path or URI) that the driver polls and
    prints (a worker's own output is not forwarded to the driver unless the run is verbose), with rank 0's pid for
    whoever needs to find the process."""

    KEEP = 50

    def __init__(self, uri: str | None):
        self.uri, self.lines, self.count = uri, [], 0

    def say(self, line: str) -> None:
        import json

        import pyarrow.fs as pafs

        self.count += 1
        self.lines = (self.lines + [[self.count, line]])[-self.KEEP:]
        if self.uri is None:
            print(line, flush=True)
            return
        fs, path = pafs.FileSystem.from_uri(self.uri)
        fs.create_dir(os.path.dirname(path), recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(json.dumps({"lines": self.lines, "pid": os.getpid()}).encode())


def pad(sequences: list[np.ndarray], pad_id: int):
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = 1
    return ids, mask


def deepspeed_config(cfg: dict, use_bf16: bool) -> dict:
    zero = {"stage": cfg["deepspeed"]["zero_stage"]}
    if cfg["deepspeed"]["offload_optimizer"]:
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg["deepspeed"]["offload_params"]:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": cfg["batch_size"], "gradient_accumulation_steps": 1,
        # torch's AdamW: DeepSpeed's fused CPU Adam would compile a C++ extension first.
        "optimizer": {"type": "AdamW", "params": {"lr": cfg["lr"], "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": zero, "bf16": {"enabled": use_bf16}, "gradient_clipping": 0.0,
        "steps_per_print": 10**9, "wall_clock_breakdown": False,
    }


def train_soft_prompt(cfg: dict) -> None:
    """Ray Train's ``train_loop_per_worker``. ``cfg``: the stage's settings as a dict (see SoftPromptConfig) plus
    ``model_path``, ``num_samples`` and ``torch_threads``."""
    import ray.train
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .prompt_tuning import SoftPromptObjective, init_from_text, init_from_vocabulary
    from .smollm2 import resolve_model

    torch.set_num_threads(cfg["torch_threads"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg["seed"])

    # This worker's samples: the references in their global order, every world-th one.
    rows = _all_rows(ray.train.get_dataset_shard("train"))
    mine = [i for i in range(len(rows)) if i % world == rank]
    samples = [np.asarray(rows[i], dtype=np.int64) for i in mine]

    model_path = resolve_model(cfg["model"])
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if cfg["gradient_checkpointing"]:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.config.use_cache = False
    embeddings = lm.get_input_embeddings().weight
    if cfg["init_text"]:
        ids = tokenizer(cfg["init_text"], add_special_tokens=False).input_ids
        domain_init = init_from_text(embeddings, ids, cfg["num_tokens"])
    else:
        domain_init = init_from_vocabulary(embeddings, cfg["num_tokens"], cfg["seed"])
    objective = SoftPromptObjective(lm, domain_init, cfg["contrastive_weight"])

    private = None
    if cfg["objective"] == "domino":  # z_i of this worker's samples, started as Z is: from vocabulary embeddings
        inits = [init_from_vocabulary(embeddings, cfg["private_tokens"], cfg["seed"] * 1_000_003 + i + 1)
                 for i in mine]
        private = torch.nn.Parameter(torch.stack(inits).to(device))
        private_optimizer = torch.optim.AdamW([private], lr=cfg["lr"], weight_decay=0.0)

    use_deepspeed = cfg["strategy"] == "deepspeed"
    if use_deepspeed:
        import deepspeed

        bf16 = cfg["deepspeed"]["bf16"]
        use_bf16 = (torch.cuda.is_available() and torch.cuda.is_bf16_supported()) if bf16 == "auto" else bf16
        engine, optimizer, _, _ = deepspeed.initialize(model=objective, model_parameters=[objective.domain],
                                                       config=deepspeed_config(cfg, use_bf16),
                                                       dist_init_required=False)
        model = engine
    else:
        model = ray.train.torch.prepare_model(objective)
        optimizer = torch.optim.AdamW([objective.domain], lr=cfg["lr"], weight_decay=0.0)

    say = ProgressFile(cfg.get("progress_file")).say
    per_epoch, total = plan_steps(cfg["num_samples"], world, cfg["batch_size"], cfg["epochs"], cfg["max_steps"])
    start, history = 0, []
    # The latest whole checkpoint of this run on storage: after Ctrl-C and a rerun of the stage, and after a worker
    # died (Ray Train registers a checkpoint only once its controller has collected every rank's report, so a kill
    # just after a checkpoint would otherwise restart from the one before, or from nothing).
    checkpoint = latest_checkpoint(cfg["run_folder"]) or ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(os.path.join(folder, STATE), map_location="cpu", weights_only=False)
            if state["world"] != world:
                raise ValueError(f"softprompt.workers: the checkpoint was made by {state['world']} workers, this run "
                                 f"has {world}; a run resumes with the workers it started with")
            start, history = state["step"], state["history"]
            if use_deepspeed:
                engine.load_checkpoint(folder, tag=DEEPSPEED_TAG, load_module_strict=False,
                                       load_optimizer_states=True, load_lr_scheduler_states=False)
            else:
                with torch.no_grad():
                    objective.domain.copy_(state["domain"].to(objective.domain.device))
                optimizer.load_state_dict(state["optimizer"])
            if private is not None:
                part = torch.load(os.path.join(folder, private_part(rank)), map_location="cpu", weights_only=False)
                with torch.no_grad():
                    private.copy_(part["table"].to(device))
                private_optimizer.load_state_dict(part["optimizer"])
        if rank == 0:
            say(f"[softprompt] resumed from step {start} of {total}")

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    began, tokens_done = time.perf_counter(), 0
    for step in range(start, total):
        epoch, k = divmod(step, per_epoch)
        lr = cfg["lr"] * min(1.0, (step + 1) / cfg["warmup_steps"]) if cfg["warmup_steps"] else cfg["lr"]
        groups = optimizer.param_groups + (private_optimizer.param_groups if private is not None else [])
        for group in groups:
            group["lr"] = lr
        picked = batch_indices(len(samples), epoch, k, per_epoch, cfg["batch_size"], cfg["seed"], rank)
        ids, mask = pad([samples[i] for i in picked], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        rows_private = private[torch.as_tensor(picked, device=device)] if private is not None else None
        loss, terms = model(ids, mask, rows_private)
        if use_deepspeed:
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if private is not None:
            private_optimizer.step()
            private_optimizer.zero_grad(set_to_none=True)

        # The metrics of all workers (mean loss terms, summed tokens): one small all-reduce per step.
        values = torch.stack([loss.detach().float(), terms["loss_suf"].float(),
                              terms.get("loss_con", torch.zeros((), device=device)).float(),
                              mask.sum().float()]).to(device)
        if world > 1:
            dist.all_reduce(values)
            values[:3] /= world
        tokens_done += int(values[3])
        elapsed = time.perf_counter() - began
        record = {"step": step + 1, "epoch": epoch + 1, "loss": round(float(values[0]), 5),
                  "loss_suf": round(float(values[1]), 5), "lr": lr,
                  "tokens_per_s": round(tokens_done / max(elapsed, 1e-9), 1),
                  "seconds": round(elapsed, 3)}
        if private is not None:
            record["loss_con"] = round(float(values[2]), 5)
        history.append(record)
        done = step + 1
        if rank == 0 and (done % cfg["log_every"] == 0 or done == total):
            eta = elapsed / (done - start) * (total - done)
            con = f", con {record['loss_con']:.3f}" if private is not None else ""
            say(f"[softprompt] step {done}/{total} epoch {epoch + 1} loss {record['loss']:.3f} "
                f"(suf {record['loss_suf']:.3f}{con}) lr {lr:.2e} {record['tokens_per_s']:,.0f} tokens/s "
                f"ETA {eta:,.0f}s")
        if done % cfg["checkpoint_every"] == 0 or done == total:
            _save_and_report(objective, optimizer, private, private_optimizer if private is not None else None,
                             engine if use_deepspeed else None, rank, world, done, history, record)


def _all_rows(shard) -> list[list[int]]:
    """Every reference's token ids, in the global order (``_order``: file and line) whatever order blocks came in."""
    batches = list(shard.iter_batches(batch_size=None, batch_format="pyarrow"))
    pairs = [(order, ids) for b in batches
             for order, ids in zip(b.column("_order").to_pylist(), b.column("input_ids").to_pylist())]
    return [ids for _, ids in sorted(pairs, key=lambda p: p[0])]


def _save_and_report(objective, optimizer, private, private_optimizer, engine, rank: int, world: int, step: int,
                     history: list[dict], record: dict) -> None:
    """One checkpoint, reported by every rank (Ray Train merges the ranks' files into one folder)."""
    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as folder:
        if engine is not None:  # collective: every rank writes its ZeRO partition (the frozen LM left out)
            engine.save_checkpoint(folder, tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
        domain = _full_domain(objective, engine)
        if rank == 0:
            state = {"step": step, "world": world, "history": history, "domain": domain}
            if engine is None:
                state["optimizer"] = optimizer.state_dict()
            torch.save(state, os.path.join(folder, STATE))
        if private is not None:
            torch.save({"table": private.detach().cpu(), "optimizer": private_optimizer.state_dict()},
                       os.path.join(folder, private_part(rank)))
        if rank == 0:
            with open(os.path.join(folder, STEP), "w", encoding="utf-8") as f:
                f.write(f'{{"step": {step}, "world": {world}}}\n')
        open(os.path.join(folder, rank_done(rank)), "w").close()
        ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _full_domain(objective, engine):
    """Z as one float32 CPU tensor (ZeRO-3 holds a partition on each rank: gathered for the copy)."""
    if engine is not None and engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([objective.domain]):
            return objective.domain.detach().float().cpu().clone()
    return objective.domain.detach().float().cpu().clone()


def read_private_table(folder: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(sample indices, ``[N, private_tokens, hidden]`` table) gathered from every rank's part of a checkpoint, in
    sample order; None when the run had no private prompts."""
    import torch

    parts = sorted(f for f in os.listdir(folder) if f.startswith("private-rank"))
    if not parts:
        return None
    world = len(parts)
    tables = {int(f[len("private-rank"):-3]): torch.load(os.path.join(folder, f), map_location="cpu",
                                                          weights_only=False)["table"] for f in parts}
    count = sum(len(t) for t in tables.values())
    full = np.zeros((count, *tables[0].shape[1:]), dtype=np.float32)
    for rank, table in tables.items():
        full[rank::world] = table.numpy()
    return np.arange(count), full
