"""What the Ray cluster offers, as the stages size their actor pools and tasks from it."""

from __future__ import annotations

import ray


def cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def cluster_gpus() -> float:
    return ray.cluster_resources().get("GPU", 0)


def largest_node_cpus() -> int:
    """A single task or actor can use at most one node's CPUs."""
    return max(1, int(max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)))
