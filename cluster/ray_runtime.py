"""Connecting to Ray: an embedded local Ray by default (all of the machine's CPUs), or an existing cluster. What
Ray prints in the driver follows the command's output mode (``cluster/console.py``)."""

from __future__ import annotations

import json
import os

import ray

from ..pipelines.recipe import RayConfig
from .console import Console, current, environment


def connect(config: RayConfig, console: Console | None = None) -> bool:
    """Start or join Ray as the recipe says; True when this call did (and so should shut it down). Ray already up
    in this process (a notebook, a test session) is used as it is."""
    if ray.is_initialized():
        return False
    console = console or current()
    common = {"logging_level": console.ray_logging_level, "log_to_driver": console.forward_worker_logs}
    # Inside a Ray job (`domainsynth submit`, a KubeRay RayJob) the job manager sets RAY_ADDRESS: join that cluster.
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
        ray.init(address=address, runtime_env=_runtime_env(console, _job_env_vars()), **common)
        return True
    _state_token_auth()
    _quiet_train_helpers()
    # The embedded Ray's processes inherit this process's environment, and its workers with them: the variables go
    # that way rather than in a runtime_env, which would keep Ray from handing tasks to its prestarted workers.
    # num_cpus None: Ray's own count, which honours a container's CPU quota (os.cpu_count() sees the host's).
    # The package imports as `domainsynth` from site-packages in every worker; nothing needs shipping.
    with environment(console.worker_env()):
        ray.init(num_cpus=config.num_cpus, include_dashboard=False, **common)
    return True


def _runtime_env(console: Console, job_env_vars: dict) -> dict | None:
    """The workers' environment variables (quiet libraries), less those the job's own runtime_env sets: Ray refuses
    a driver's runtime_env that sets a variable of the job's again."""
    env_vars = {k: v for k, v in console.worker_env().items() if k not in job_env_vars}
    return {"env_vars": env_vars} if env_vars else None


def _job_env_vars() -> dict:
    """The env_vars of the runtime_env of the Ray job this driver runs in (Ray's job manager passes the job's
    config in RAY_JOB_CONFIG_JSON_ENV_VAR); none outside a job."""
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        return dict((job.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError, TypeError):
        return {}


def _state_token_auth() -> None:
    """A new local Ray turns token authentication on and warns that it did, unless RAY_AUTH_MODE says what to do:
    say it (the same choice, Ray's default). Ray reads its settings once, at import: they are read again, as Ray
    does itself when it turns the mode on. A RAY_AUTH_MODE of the user's own is left as it is."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    try:
        from ray._raylet import Config
    except ImportError:  # another Ray: its warning stays
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")


def _quiet_train_helpers() -> None:
    """On the embedded one-machine Ray, Ray Train's preemption watcher (an actor polling for nodes being drained) and
    its Prometheus metrics (which nothing scrapes without a dashboard) have nothing to do, but wake every few seconds
    beside the training, which on a small machine shares its cores (docs/benchmarks.md). The user's own setting
    wins; a cluster keeps both."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")


def log_dir() -> str | None:
    """Ray's log folder for this session on this machine (the workers' output, ray-data.log), if Ray runs here."""
    try:
        node = ray._private.worker._global_node
        return node.get_logs_dir_path() if node is not None else None
    except AttributeError:
        return None


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, naming the address, when nothing listens there: ``ray.init`` would retry for minutes.
    ``auto`` (a Ray node's own cluster) is left to Ray."""
    import socket

    if address == "auto":
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--address {address}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"--address {address}: no Ray cluster answers there ({e.strerror or e})") from None


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()
