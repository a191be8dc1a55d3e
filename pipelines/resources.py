"""What the Ray cluster offers, as the stages size their actor pools and tasks from it.

On an autoscaling cluster (KubeRay's autoscaler v2) what is up now can be far less than what the cluster may grow
to: a job's cluster starts with no GPU pod at all. The autoscaler publishes its node groups (resources per node,
most nodes) to the GCS; pools are sized from that ceiling, their actors ask for resources that are not there yet,
and the autoscaler starts pods for them. Without an autoscaler (a local Ray, a fixed cluster) nothing is published
and what is up now is what there is.
"""

from __future__ import annotations

import contextlib
import sys
import warnings

import ray


def cluster_cpus() -> int:
    return max(1, int(max(ray.cluster_resources().get("CPU", 0), _ceiling("CPU"))))


def cluster_gpus() -> float:
    return max(gpus_up(), _ceiling("GPU"))


def gpus_up() -> float:
    """GPUs on the nodes up now: for work that would use a GPU if one is there, but must not start a GPU pod."""
    return ray.cluster_resources().get("GPU", 0)


def largest_node_cpus() -> int:
    """A single task or actor can use at most one node's CPUs."""
    up = (n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive"))
    possible = (group.resources.get("CPU", 0) for group in _node_groups(_cluster_config(), "CPU")
                if group.max_count != 0)
    return max(1, int(max((*up, *possible), default=1)))


def _node_groups(config, resource: str) -> list:
    """The autoscaler's node groups that offer ``resource``. CPU work is planned on the CPU groups only: sized for
    the GPU pods' CPUs too, a CPU stage would make the autoscaler start GPU pods for it."""
    groups = list(config.node_group_configs) if config is not None else []
    return [g for g in groups if resource == "GPU" or not g.resources.get("GPU", 0)]


# KubeRay's default maxReplicas (the CRD's int32 maximum) means "no maximum", like the autoscaler's own -1.
UNBOUNDED_NODES = 2**31 - 1


def _ceiling(resource: str) -> float:
    """The most of ``resource`` the autoscaler may provide (0 without an autoscaler), within the cluster's own
    ``max_resources``. A group without a maximum makes the ceiling unknowable: then only what is up counts, rather
    than pools sized for infinity."""
    config = _cluster_config()
    total = 0.0
    for group in _node_groups(config, resource):
        per_node = group.resources.get(resource, 0)
        if per_node and (group.max_count < 0 or group.max_count >= UNBOUNDED_NODES):
            return 0.0
        total += per_node * group.max_count
    cap = config.max_resources.get(resource, 0) if config is not None else 0
    return min(total, cap) if cap else total


_warned = False


def _cluster_config():
    # What Ray Train and Ray Data read for the same purpose (ray/_private/state.py); private, so a Ray that moved
    # it leaves us with what is up now instead of failing the stage.
    global _warned
    try:
        return ray._private.state.state.get_cluster_config()
    except Exception as e:  # noqa: BLE001 - any failure means "no autoscaler we can read"
        if not _warned:
            print(f"note: cannot read the autoscaler's node groups ({e}); sizing pools from the nodes up now",
                  file=sys.stderr)
            _warned = True
        return None


@contextlib.contextmanager
def retry_limits_allowed():
    """Ray 2.60 deprecates ``ray_remote_args`` in favour of named parameters, but names none for the retry limits
    (``max_retries`` of tasks, ``max_restarts``/``max_task_retries`` of actors): until it does, the stages' bounded
    retries go through it, without the deprecation warning on every dataset."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        yield

