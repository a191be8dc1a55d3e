"""Connecting to Ray: an embedded local Ray by default (all of the machine's CPUs), or an existing cluster."""

from __future__ import annotations

import logging
import os

import ray

from ..pipelines.recipe import RayConfig


def connect(config: RayConfig) -> bool:
    """Start or join Ray as the recipe says; True when this call did (and so should shut it down). Ray already up
    in this process (a notebook, a test session) is used as it is."""
    if ray.is_initialized():
        return False
    # The package imports as `domainsynth` from site-packages in every worker; nothing needs shipping.
    os.environ.setdefault("RAY_ACCEPT_CALLBACK_WARNINGS", "1")
    # Inside a Ray job (`domainsynth submit`, a KubeRay RayJob) the job manager sets RAY_ADDRESS: join that cluster.
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
        ray.init(address=address, logging_level=logging.WARNING)
        return True
    # num_cpus None: Ray's own count, which honours a container's CPU quota (os.cpu_count() sees the host's).
    ray.init(num_cpus=config.num_cpus, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=True)
    return True


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
