"""``domainsynth k8s render``: KubeRay manifests made from a recipe.

The recipe's ``kubernetes`` section gives the image, the pods' resources and the worker groups; the stages and the
``serve`` section say whether a GPU group is needed and how many pods each group may grow to. The pipeline travels
as a ConfigMap holding the recipe (RayJob), the endpoint as ``serveConfigV2`` running our Serve application builder
(RayService). Local paths of the recipe are rewritten to where the pods find them: the image's copy of the project
(``kubernetes.project_dir``) or the shared volume; anything else is reported, since a pod cannot read this machine.
"""

from __future__ import annotations

import fnmatch
import math
import os
import posixpath
from dataclasses import dataclass, field

import ray
import yaml

from ..actors.serve_app import DEPLOYMENT_NAME
from ..pipelines.paths import is_uri
from ..pipelines.recipe import (STAGE_ORDER, GpuWorkerGroup, KubernetesConfig, PodResources, Recipe, map_local_paths,
                                travelling_recipe)
from ..pipelines.serve import APP_BUILDER, autoscaling_config

KINDS = ("rayjob", "rayservice", "raycluster")
RECIPE_MOUNT = "/home/ray/recipe"
DEFAULT_MAX_WORKERS = 4  # a group's ceiling when no pool of the recipe has a maximum


@dataclass
class Rendered:
    objects: list[dict]
    warnings: list[str] = field(default_factory=list)

    def yaml(self) -> str:
        return yaml.dump_all([_without_empty_lists(o) for o in self.objects], Dumper=_BlockDumper, sort_keys=False)


def _without_empty_lists(value):
    """Pod specs start with empty volume lists that only some manifests fill; an empty list says nothing."""
    if isinstance(value, dict):
        return {k: _without_empty_lists(v) for k, v in value.items() if v != []}
    if isinstance(value, list):
        return [_without_empty_lists(v) for v in value]
    return value


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the recipe, runtimeEnvYAML, serveConfigV2) as readable ``|`` blocks."""


_BlockDumper.add_representer(
    str, lambda dumper, s: dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def render(recipe: Recipe, kind: str, project_root: str | None = None) -> Rendered:
    if kind not in KINDS:
        raise ValueError(f"--kind {kind!r}: expected one of {', '.join(KINDS)}")
    paths = _PodPaths(recipe.kubernetes, os.path.abspath(project_root or os.getcwd()))
    if kind == "rayjob":
        return _rayjob(recipe, paths)
    if kind == "rayservice":
        return _rayservice(recipe, paths)
    return Rendered([_object("RayCluster", recipe.kubernetes, _cluster_spec(recipe, recipe.kubernetes, "all"))],
                    paths.warnings)


class _PodPaths:
    """Where a pod finds a path of this machine: under the image's project folder, or on the shared volume."""

    def __init__(self, k8s: KubernetesConfig, project_root: str):
        self.k8s, self.project_root, self.warnings = k8s, project_root, []
        self.left_out = _dockerignore(project_root)

    def __call__(self, field_name: str, path: str) -> str:
        """An input: where the pods find it, with a note when they will not."""
        moved = self._in_pod(path)
        if moved is None:
            self.warnings.append(f"{field_name}: {path} is outside the project ({self.project_root}) and not on "
                                 f"kubernetes.volume: the pods will look for it as it is; use a URI (s3://...), the "
                                 f"volume, or keep it in the project the image is built from")
            return path
        top = os.path.relpath(path, self.project_root).split(os.sep)[0]
        if not self.on_volume(path) and any(fnmatch.fnmatch(top, pattern) for pattern in self.left_out):
            self.warnings.append(f"{field_name}: {os.path.relpath(path, self.project_root)} is left out of the image "
                                 f"by the project's .dockerignore: the pods find it only if the image makes it "
                                 f"(k8s/Dockerfile makes models/tiny-llama and models/tiny-llama-4k); else use a URI "
                                 f"or the volume")
        return moved

    def run_dir(self, run_dir: str) -> str:
        """The output: it must be shared by every pod, or the parts written on the others are lost."""
        if is_uri(run_dir):
            return run_dir
        path = os.path.abspath(run_dir)
        if self.on_volume(path):
            return path
        moved = self._in_pod(path) or path
        self.warnings.append(f"run_dir: {moved} is on each pod's own disk: Ray Data workers on other pods write "
                             f"their parts there and the results go with the pods; use a URI (s3://, gs://) or "
                             f"kubernetes.volume")
        return moved

    def on_volume(self, path: str) -> bool:
        volume = self.k8s.volume
        return bool(volume) and (path + "/").startswith(volume.mount_path.rstrip("/") + "/")

    def _in_pod(self, path: str) -> str | None:
        """The path on the volume, or in the image's copy of the project; None when it is in neither."""
        if self.on_volume(path):
            return path
        relative = os.path.relpath(path, self.project_root)
        if relative == ".." or relative.startswith(".." + os.sep):
            return None
        return posixpath.join(self.k8s.project_dir, *relative.split(os.sep))


def _dockerignore(project_root: str) -> list[str]:
    """The top-level patterns of the project's .dockerignore: what the image built from it does not hold."""
    try:
        with open(os.path.join(project_root, ".dockerignore"), encoding="utf-8") as f:
            lines = [line.strip().strip("/") for line in f]
    except OSError:
        return []
    return [line for line in lines if line and not line.startswith(("#", "!")) and "/" not in line]


def pod_recipe(recipe: Recipe, paths: _PodPaths) -> dict:
    """The recipe as the job inside the cluster reads it: stages only (the job joins the cluster it runs in), paths
    rewritten to where the pods find them."""
    raw = travelling_recipe(recipe, paths)
    if recipe.run_dir:
        raw["run_dir"] = paths.run_dir(recipe.run_dir)
    return raw


def _rayjob(recipe: Recipe, paths: _PodPaths) -> Rendered:
    if not recipe.has_stage():
        raise ValueError(f"--kind rayjob: the recipe has no stage ({', '.join(STAGE_ORDER)}) to run")
    k8s = recipe.kubernetes
    recipe_map = _object("ConfigMap", k8s, None, suffix="-recipe")
    recipe_map["data"] = {"recipe.yaml": yaml.safe_dump(pod_recipe(recipe, paths), sort_keys=False)}
    cluster = _cluster_spec(recipe, k8s, "stages")
    head_pod = cluster["headGroupSpec"]["template"]["spec"]
    head_pod["volumes"].append({"name": "recipe", "configMap": {"name": recipe_map["metadata"]["name"]}})
    head_pod["containers"][0]["volumeMounts"].append({"name": "recipe", "mountPath": RECIPE_MOUNT})
    # Tokenizers' threads do not survive the fork of Ray's worker processes; models downloaded from the Hub are
    # kept on the shared volume, once for every pod and run. (RAY_ADDRESS is set by Ray's job manager: the job's
    # `domainsynth run` joins this cluster.)
    env_vars = {"TOKENIZERS_PARALLELISM": "false"}
    if k8s.volume:
        env_vars["HF_HOME"] = posixpath.join(k8s.volume.mount_path, "huggingface")
    spec = {
        "entrypoint": f"domainsynth run {RECIPE_MOUNT}/recipe.yaml",
        "runtimeEnvYAML": yaml.safe_dump({"env_vars": env_vars}, sort_keys=False),
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": k8s.job.ttl_seconds_after_finished,
        "backoffLimit": k8s.job.backoff_limit,
        "rayClusterSpec": cluster,
    }
    if k8s.job.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = k8s.job.active_deadline_seconds
    return Rendered([recipe_map, _object("RayJob", k8s, spec)], paths.warnings)


def _rayservice(recipe: Recipe, paths: _PodPaths) -> Rendered:
    serve = recipe.serve
    if serve is None:
        raise ValueError("--kind rayservice: the recipe has no serve section (the endpoint to deploy)")
    args = map_local_paths({"serve": serve.model_dump(mode="json", exclude_unset=True)}, paths)["serve"]
    for key in ("host", "port", "app_name", "route_prefix"):  # set by the Serve config itself
        args.pop(key, None)
    app = {"name": serve.app_name, "route_prefix": serve.route_prefix, "import_path": APP_BUILDER, "args": args}
    if serve.backend == "domainsynth":
        # Serve's own autoscaling decides the replicas; the KubeRay autoscaler then adds pods for them.
        app["deployments"] = [{
            "name": DEPLOYMENT_NAME, "max_ongoing_requests": serve.max_ongoing_requests,
            "autoscaling_config": autoscaling_config(serve),
            "ray_actor_options": {"num_cpus": serve.num_cpus, "num_gpus": serve.num_gpus}}]
    config = {"http_options": {"host": "0.0.0.0", "port": serve.port}, "applications": [app]}
    cluster = _cluster_spec(recipe, recipe.kubernetes, "serve")
    cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"].append(
        {"name": "serve", "containerPort": serve.port})
    if serve.api_key_env:
        # Serve builds the application (which reads the key) on any node: every pod gets it, from a Secret that
        # may be absent (then no key is required).
        secret = {"name": f"{recipe.kubernetes.name}-api-key", "key": "key", "optional": True}
        for pod in _pods(cluster):
            pod["containers"][0].setdefault("env", []).append(
                {"name": serve.api_key_env, "valueFrom": {"secretKeyRef": secret}})
    spec = {"serveConfigV2": yaml.safe_dump(config, sort_keys=False), "rayClusterConfig": cluster}
    return Rendered([_object("RayService", recipe.kubernetes, spec)], paths.warnings)


def _object(kind: str, k8s: KubernetesConfig, spec: dict | None, suffix: str = "") -> dict:
    metadata: dict = {"name": k8s.name + suffix, "labels": {"app.kubernetes.io/name": "domainsynth",
                                                            "app.kubernetes.io/instance": k8s.name}}
    if k8s.namespace:
        metadata["namespace"] = k8s.namespace
    obj = {"apiVersion": "v1" if kind == "ConfigMap" else "ray.io/v1", "kind": kind, "metadata": metadata}
    if spec is not None:
        obj["spec"] = spec
    return obj


# --- the RayCluster spec ------------------------------------------------------------------------------------------

def _cluster_spec(recipe: Recipe, k8s: KubernetesConfig, workload: str) -> dict:
    """Head (no Ray work of its own: it keeps the GCS, the dashboard and the drivers), a CPU worker group and, when
    the workload asks for GPUs, a GPU group, all scaled by KubeRay's in-tree autoscaler (v2) from Ray's demand."""
    cpu_pools, gpu_pools = _pools(recipe, workload)
    gpu = k8s.gpu_workers
    if gpu is None and gpu_pools:
        gpu = GpuWorkerGroup()
    image = k8s.image or f"domainsynth:0.1.0-{'cpu' if gpu is None else 'gpu'}"  # the tags k8s/Dockerfile builds
    groups = [_worker_group("cpu", k8s, image, k8s.cpu_workers, _ceiling(cpu_pools, _cpus(k8s.cpu_workers.cpu)))]
    if gpu is not None:
        group = _worker_group("gpu", k8s, image, gpu, _ceiling(gpu_pools, gpu.gpus))
        container = group["template"]["spec"]["containers"][0]
        for amounts in container["resources"].values():  # KubeRay turns the limit into Ray's num-gpus
            amounts["nvidia.com/gpu"] = str(gpu.gpus)
        # GPU nodes are usually tainted so that only GPU work lands there.
        group["template"]["spec"]["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                     "effect": "NoSchedule"}]
        if gpu.accelerator_type:
            # Lets the autoscaler start this group from zero for tasks that ask for this accelerator.
            group["resources"] = {f"accelerator_type:{gpu.accelerator_type}": "1"}
        groups.append(group)
    head_container = _container("ray-head", k8s, image, k8s.head)
    head_container["ports"] = [{"name": "gcs", "containerPort": 6379}, {"name": "dashboard", "containerPort": 8265},
                               {"name": "client", "containerPort": 10001}]
    spec = {
        "rayVersion": ray.__version__,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"version": "v2", "upscalingMode": "Default",
                              "idleTimeoutSeconds": k8s.idle_timeout_seconds},
        "headGroupSpec": {"rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                          "template": {"spec": _pod_spec(k8s, head_container)}},
        "workerGroupSpecs": groups,
    }
    if k8s.auth == "token":
        spec["authOptions"] = {"mode": "token"}
    return spec


def _pods(cluster: dict) -> list[dict]:
    return [g["template"]["spec"] for g in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"])]


def _worker_group(name: str, k8s: KubernetesConfig, image: str, group, ceiling: int) -> dict:
    maximum = group.max_replicas or max(ceiling, group.min_replicas, 1)
    pod = _pod_spec(k8s, _container("ray-worker", k8s, image, group))
    if group.node_selector:
        pod["nodeSelector"] = dict(group.node_selector)
    return {"groupName": name, "replicas": group.min_replicas, "minReplicas": group.min_replicas,
            "maxReplicas": maximum, "rayStartParams": {}, "template": {"spec": pod}}


def _container(name: str, k8s: KubernetesConfig, image: str, resources: PodResources) -> dict:
    # Requests = limits: Ray sizes its node from the limits, and the scheduler then guarantees them.
    amounts = {"cpu": resources.cpu, "memory": resources.memory}
    return {"name": name, "image": image, "imagePullPolicy": k8s.image_pull_policy,
            "resources": {"requests": dict(amounts), "limits": dict(amounts)}, "volumeMounts": []}


def _pod_spec(k8s: KubernetesConfig, container: dict) -> dict:
    spec: dict = {"containers": [container], "volumes": []}
    if k8s.volume:
        spec["volumes"].append({"name": "shared", "persistentVolumeClaim": {"claimName": k8s.volume.claim_name}})
        container["volumeMounts"].append({"name": "shared", "mountPath": k8s.volume.mount_path})
        spec["securityContext"] = {"fsGroup": 100}  # the image's user (ray, group users = 100) may write there
    return spec


def _pools(recipe: Recipe, workload: str) -> tuple[list[tuple[int | None, float]], list[tuple[int | None, float]]]:
    """(most actors, CPUs or GPUs each) of every actor pool the workload runs, split into CPU and GPU pools."""
    pools: list[tuple[int | None, float, float]] = []  # (most actors, cpus each, gpus each)
    if workload in ("stages", "all"):
        if recipe.select and recipe.select.quality.num_gpus:
            pools.append((recipe.select.quality.concurrency, 1.0, recipe.select.quality.num_gpus))
        if recipe.embed:
            pools.append((recipe.embed.concurrency, recipe.embed.num_cpus or 1.0, recipe.embed.num_gpus))
        if recipe.softprompt:  # Ray Train's workers: a fixed group, all at once
            sp = recipe.softprompt
            pools.append((sp.workers, sp.cpus_per_worker, sp.gpus_per_worker))
        for stage in ("generate", "synthesize", "judge"):
            cfg = getattr(recipe, stage)
            if cfg is not None:
                most = cfg.concurrency if isinstance(cfg.concurrency, (int, type(None))) else cfg.concurrency[1]
                pools.append((most, cfg.num_cpus or 1.0, cfg.num_gpus))
    if workload in ("serve", "all") and recipe.serve:
        serve = recipe.serve
        pools.append((serve.autoscaling.max_replicas, serve.num_cpus, serve.num_gpus))
    cpu = [(most, cpus) for most, cpus, gpus in pools if not gpus]
    gpu = [(most, gpus) for most, cpus, gpus in pools if gpus]
    return cpu, gpu


def _ceiling(pools: list[tuple[int | None, float]], per_pod: float) -> int:
    """Pods the largest pool needs at its most; a pool without a maximum counts as DEFAULT_MAX_WORKERS pods."""
    needs = [DEFAULT_MAX_WORKERS if most is None else math.ceil(most * each / per_pod) for most, each in pools]
    return max(needs, default=DEFAULT_MAX_WORKERS)


def _cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)
