"""Pools on an autoscaling cluster are sized from what the cluster may grow to, as the autoscaler publishes it.

KubeRay's autoscaler (v2) cannot run here; what it publishes can: its node groups, written to the real local Ray's
GCS under the key the autoscaler uses, in its own protobuf. The stages then read them through the same code path as
on Kubernetes."""

from __future__ import annotations

import pytest
import ray
from ray.core.generated import autoscaler_pb2
from ray.experimental import internal_kv

from domainsynth.pipelines import resources
from domainsynth.pipelines.synthesis.generate import GenerateError, engine_pool
from domainsynth.pipelines.synthesis.generate import GenerateConfig


def published(*groups: tuple[str, dict, int]) -> bytes:
    config = autoscaler_pb2.ClusterConfig()
    for name, per_node, most in groups:
        group = config.node_group_configs.add(name=name, min_count=0, max_count=most)
        group.resources.update(per_node)
    return config.SerializeToString()


@pytest.fixture
def autoscaler(ray_local):
    namespace = ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE
    key = ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY

    def publish(config: bytes) -> None:
        internal_kv._internal_kv_put(key, config, overwrite=True, namespace=namespace)

    yield publish
    internal_kv._internal_kv_del(key, namespace=namespace)


def test_without_an_autoscaler_the_pools_fit_what_is_up(ray_local):
    assert resources.cluster_cpus() == 2 and resources.cluster_gpus() == 0
    cfg = GenerateConfig(prompts=["p.jsonl"], model="m", num_gpus=1, concurrency=(1, 4))
    with pytest.raises(GenerateError, match="no engine actor fits: 0 GPUs"):
        engine_pool(cfg, resources.cluster_cpus(), resources.cluster_gpus())


def test_gpu_pools_are_planned_for_the_gpu_group_that_is_still_at_zero_pods(autoscaler):
    # A head with no Ray CPUs, up to 4 CPU pods of 8 CPUs, up to 3 GPU pods of 2 GPUs (none up yet).
    autoscaler(published(("head", {"CPU": 0}, 1), ("cpu-workers", {"CPU": 8}, 4),
                         ("gpu-workers", {"CPU": 16, "GPU": 2}, 3)))
    # The groups describe the whole cluster (KubeRay lists the head too): their total, not added to what is up.
    # CPU stages are planned on the CPU group only, so that they never make the autoscaler start GPU pods.
    assert resources.cluster_cpus() == 32 and resources.cluster_gpus() == 6
    assert resources.largest_node_cpus() == 8
    cfg = GenerateConfig(prompts=["p.jsonl"], model="m", num_gpus=1, concurrency=(2, 6))
    low, high, cpus_each = engine_pool(cfg, resources.cluster_cpus(), resources.cluster_gpus())
    assert (low, high, cpus_each) == (2, 6, 1.0)  # the actors' demand is what makes the autoscaler add GPU pods


@pytest.mark.parametrize("most", [-1, 2**31 - 1])  # the autoscaler's "no maximum", and KubeRay's default maxReplicas
def test_a_group_without_a_maximum_does_not_size_pools_for_infinity(autoscaler, most):
    autoscaler(published(("cpu-workers", {"CPU": 8}, most)))
    assert resources.cluster_cpus() == 2


def test_an_index_uses_a_gpu_only_when_one_is_up(autoscaler):
    """A GPU group the autoscaler could start does not make the faiss build ask for a GPU (and so start a pod)."""
    from domainsynth.actors.vector_index import IndexPlan
    from domainsynth.pipelines.curation.index import wants_gpu

    autoscaler(published(("gpu-workers", {"CPU": 8, "GPU": 1}, 2)))
    assert resources.cluster_gpus() == 2 and resources.gpus_up() == 0
    plan = IndexPlan(kind="flat", dim=384)
    assert wants_gpu(None, plan) is False and wants_gpu(True, plan) is True
