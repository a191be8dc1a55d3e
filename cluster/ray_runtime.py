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
        ray.init(address=address, logging_level=logging.WARNING)
        return True
    ray.init(num_cpus=config.num_cpus or os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=True)
    return True


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()
