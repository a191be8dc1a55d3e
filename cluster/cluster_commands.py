"""The cluster commands of the CLI: ``submit``, ``jobs list|status|logs|stop`` and ``k8s render|validate``.

Exit status: 0 done (a submitted job: succeeded; ``submit --dry-run``: it could be sent), 1 the cluster or the
job failed, 2 a bad recipe, argument or setting, or an input staging refuses (found before anything is sent), 130
stopped waiting with Ctrl-C (the job goes on).
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime

import aiohttp
import requests
import yaml

from ..pipelines.recipe import STAGE_ORDER, RecipeError, load_recipe
from ..pipelines.rundir import StageError
from ..pipelines.runner import preflight
from . import staging, submit as jobs_api


def run_cluster_command(args: argparse.Namespace) -> int:
    try:
        if args.command == "k8s":
            return render_command(args) if args.k8s_command == "render" else validate_command(args)
        if args.command == "submit":
            return submit_command(args)
        return jobs_command(args)
    except (requests.RequestException, aiohttp.ClientError) as e:  # before ValueError: a bad JSON answer is one
        return _error(f"the connection to the cluster failed: {e}", 1)
    except (RecipeError, FileNotFoundError, ValueError, StageError, jobs_api.UsageError) as e:
        return _error(str(e), 2)
    except (jobs_api.SubmitError, RuntimeError, OSError) as e:  # RuntimeError: what the Jobs API client raises
        return _error(str(e).strip(), 1)


def _error(message: str, code: int) -> int:
    print(f"domainsynth: error: {message}", file=sys.stderr)
    return code


def render_command(args: argparse.Namespace) -> int:
    from . import k8s_render  # Serve and the CRDs load only for the k8s commands
    from .k8s_validate import validate_documents

    rendered = k8s_render.render(load_recipe(args.recipe, args.overrides), args.kind, args.project_dir)
    errors = validate_documents(rendered.objects)
    if errors:  # never print a manifest the API server or the operator would refuse
        print("domainsynth: error: the manifest does not pass KubeRay's checks:\n  " + "\n  ".join(errors),
              file=sys.stderr)
        return 1
    for note in rendered.warnings:
        print(f"note: {note}", file=sys.stderr)
    sys.stdout.write(rendered.yaml())
    return 0


def validate_command(args: argparse.Namespace) -> int:
    from .k8s_validate import kustomize_build, validate_documents

    failed = False
    for path in args.paths:
        try:
            if os.path.isdir(path):
                docs = kustomize_build(path)
            else:
                with open(path, encoding="utf-8") as f:
                    docs = [doc for doc in yaml.safe_load_all(f) if doc is not None]
        except (OSError, RuntimeError, yaml.YAMLError) as e:
            print(f"{path}: cannot read it: {e}", file=sys.stderr)
            failed = True
            continue
        errors = validate_documents(docs)
        failed |= bool(errors)
        print(f"{path}: {len(docs)} objects, " + ("valid" if not errors else f"{len(errors)} errors:"))
        for error in errors:
            print(f"  {error}")
    return 1 if failed else 0


def submit_command(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    if not recipe.has_stage():
        raise RecipeError(f"{args.recipe}: no stage to run ({', '.join(STAGE_ORDER)})")
    preflight(recipe)  # a missing input or a broken template fails here, before anything is uploaded
    plan = staging.plan_staging(recipe)  # so does an input staging refuses, before any cluster is contacted
    if args.dry_run:
        return _dry_run(plan)
    staging.check_plan(plan)
    client, address = jobs_api.connect(args.address)
    job_id = jobs_api.submit(client, recipe, args.recipe, args.job_id, plan=plan)
    print(f"Submitted job {job_id} to {address} (dashboard: {address}/#/jobs/{job_id})", flush=True)
    if args.no_wait:
        print(f"Follow it with: domainsynth jobs logs {job_id} --follow --address {address}")
        return 0
    return _wait_for(client, job_id, args.follow)


def _dry_run(plan: staging.StagingPlan) -> int:
    """Print what the job's working_dir would hold; no cluster is contacted. Fails as submit would: 2 when staging
    refuses (a private key, a secret named as an input), 1 beyond the upload limit."""
    print(staging.describe(plan), flush=True)
    staging.check_plan(plan)
    return 0


def _wait_for(client, job_id: str, follow: bool) -> int:
    try:
        if follow:
            jobs_api.follow_logs(client, job_id, _write)
        else:
            jobs_api.wait(client, job_id, echo=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print(f"\nStopped waiting; job {job_id} goes on (domainsynth jobs stop {job_id} stops it).")
        return 130
    code = jobs_api.outcome(client, job_id)
    if code and not follow:
        tail = client.get_job_logs(job_id).splitlines()[-30:]
        print("Last lines of its logs:\n  " + "\n  ".join(tail))
    return code


def jobs_command(args: argparse.Namespace) -> int:
    client, _ = jobs_api.connect(args.address)
    action = args.jobs_command
    if action == "list":
        print(_jobs_table(client.list_jobs()))
    elif action == "status":
        info = client.get_job_info(args.job_id)
        print(f"{args.job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
    elif action == "logs" and args.follow:
        client.get_job_status(args.job_id)  # an unknown id gets the Jobs API's own message, not a websocket error
        jobs_api.follow_logs(client, args.job_id, _write)
        return jobs_api.outcome(client, args.job_id)
    elif action == "logs":
        _write(client.get_job_logs(args.job_id))
    else:
        stopped = client.stop_job(args.job_id)
        print(f"{args.job_id}: {'stop requested' if stopped else 'not running, nothing to stop'}")
    return 0


def _jobs_table(jobs) -> str:
    rows = [("JOB ID", "STATUS", "STARTED", "TOOK", "ENTRYPOINT")]
    for job in sorted(jobs, key=lambda j: j.start_time or 0):
        started = datetime.fromtimestamp(job.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S") if job.start_time else "-"
        took = f"{(job.end_time - job.start_time) / 1000:.0f}s" if job.end_time and job.start_time else "-"
        rows.append((job.submission_id or job.job_id or "-", str(job.status.value), started, took,
                     job.entrypoint[:60]))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4] for row in rows)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
