"""``domainsynth submit`` and ``domainsynth jobs``: pipeline runs on a Ray cluster through the Ray Jobs API.

A submission packs the recipe and its local inputs (files, folders, model folders) into a staging folder that
becomes the job's ``working_dir``: Ray uploads it to the cluster and unpacks it on every node, and the job runs
``domainsynth run recipe.yaml`` there. URIs (s3://, gs://) and Hugging Face ids travel as they are. What is staged,
and what never is, is ``staging.py``'s business.

Authentication follows Ray's token auth: with ``RAY_AUTH_MODE=token`` a token is required (``RAY_AUTH_TOKEN``,
the file named by ``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token``) and sent; otherwise none is sent (as Ray's
own clients do: a token found on disk does not go to whatever address is given), and a cluster that wants one is
reported as such.
"""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Callable

import requests

from ..pipelines.recipe import Recipe
from .staging import StagingPlan, stage

CONNECT_TIMEOUT_S = 5.0
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
PORT_FORWARD_HINT = "on Kubernetes: kubectl port-forward svc/CLUSTER-head-svc 8265:8265"


class SubmitError(Exception):
    """The submission cannot go ahead; the message says why and what to do."""


class UsageError(SubmitError):
    """An argument or a setting of this machine is wrong (found before anything is sent)."""


# --- where the cluster is and how to talk to it -------------------------------------------------------------------

def dashboard_address(given: str | None) -> str:
    """The Jobs API address: --address, else RAY_API_SERVER_ADDRESS or RAY_ADDRESS (as Ray's own CLI reads them)."""
    address = given or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UsageError(f"give --address http://HEAD:8265 (the Ray dashboard; {PORT_FORWARD_HINT}), or set "
                          f"RAY_API_SERVER_ADDRESS")
    if "://" not in address:
        address = "http://" + address
    if not address.startswith(("http://", "https://")):
        raise UsageError(f"--address {address}: expected the dashboard's HTTP address such as http://HEAD:8265 "
                          f"(ray:// is Ray Client's address, not the Jobs API's)")
    return address.rstrip("/")


def auth_headers() -> dict[str, str]:
    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode not in ("", "token", "disabled"):
        raise UsageError(f"RAY_AUTH_MODE={mode!r}: expected token or disabled")
    if mode != "token":
        return {}
    token = _read_token()
    if not token:
        raise UsageError("RAY_AUTH_MODE=token but no token was found: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH "
                         "to a file holding it, or write it to ~/.ray/auth_token (on a KubeRay cluster it is in a "
                         "Secret; see docs/kubernetes.md)")
    return {"Authorization": f"Bearer {token}"}


def _read_token() -> str | None:
    """Ray's own order: RAY_AUTH_TOKEN, then RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(named).expanduser() if named else Path.home() / ".ray" / "auth_token"
    try:
        return path.read_text().strip() or None
    except OSError:
        if named:
            raise UsageError(f"RAY_AUTH_TOKEN_PATH={named}: cannot read the token there") from None
        return None


def connect(address: str | None):
    """(JobSubmissionClient, the dashboard's URL), after a quick check (seconds, not minutes) that the dashboard
    answers and accepts our credentials."""
    from ray.job_submission import JobSubmissionClient

    url, headers = dashboard_address(address), auth_headers()
    try:  # /api/version answers quickly and, on a cluster with token auth, only to a valid token
        probe = requests.get(f"{url}/api/version", headers=headers, timeout=CONNECT_TIMEOUT_S)
    except requests.RequestException as e:
        errno = re.search(r"\[Errno -?\d+\] [^'\")]+", str(e))
        reason = errno.group(0) if errno else "timed out" if isinstance(e, requests.Timeout) else type(e).__name__
        raise SubmitError(f"cannot reach the Ray dashboard at {url} ({reason}); is the head running and port 8265 "
                          f"open? ({PORT_FORWARD_HINT})") from None
    if probe.status_code == 401:
        raise SubmitError(f"the cluster at {url} requires a token and none was sent: set RAY_AUTH_MODE=token and "
                          f"RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token)")
    if probe.status_code == 403:
        raise SubmitError(f"the cluster at {url} rejected the token: check RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / "
                          f"~/.ray/auth_token")
    if not probe.ok:
        raise SubmitError(f"{url} answered HTTP {probe.status_code}: is it a Ray dashboard (port 8265)?")
    return JobSubmissionClient(url, headers=headers), url


# --- submitting and following -------------------------------------------------------------------------------------

def submit(client, recipe: Recipe, recipe_path: str, job_id: str | None = None,
           echo: Callable[[str], None] = print, plan: StagingPlan | None = None) -> str:
    with tempfile.TemporaryDirectory(prefix="domainsynth-job-") as staging:
        name = stage(recipe, staging, echo, plan)
        try:
            return client.submit_job(
                entrypoint=f"domainsynth run {name}", submission_id=job_id, runtime_env={"working_dir": staging},
                metadata={"domainsynth_recipe": os.path.basename(recipe_path)})
        except (RuntimeError, ValueError) as e:  # the upload refused, a job id already taken
            raise SubmitError(f"the cluster refused the job: {e}") from None


def follow_logs(client, job_id: str, write: Callable[[str], None]) -> None:
    """Print the job's logs as they come, until it ends (should the stream close before, e.g. a proxy's idle
    timeout, wait for the end without them)."""
    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    asyncio.run(tail())
    if str(client.get_job_status(job_id).value) not in TERMINAL:
        write("(the log stream closed; waiting for the job to end)\n")
        wait(client, job_id, echo=lambda line: write(line + "\n"))


def wait(client, job_id: str, echo: Callable[[str], None] = print, poll_s: float = 2.0) -> str:
    """Wait for the job to end, with a status line now and then; its final status."""
    started, last = time.monotonic(), None
    while True:
        status = str(client.get_job_status(job_id).value)
        if status != last or status in TERMINAL:
            echo(f"  {status} after {time.monotonic() - started:.0f}s")
            last = status
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def outcome(client, job_id: str, echo: Callable[[str], None] = print) -> int:
    """Exit status of the command for the job's final status: 0 only for SUCCEEDED."""
    info = client.get_job_info(job_id)
    status = str(info.status.value)
    if status == "SUCCEEDED":
        echo(f"Job {job_id} succeeded.")
        return 0
    echo(f"Job {job_id} {status.lower()}: {info.message or 'no message'}")
    return 1
