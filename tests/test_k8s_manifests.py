"""The KubeRay manifests in k8s/: every file and every kustomization validates offline (cluster/k8s_validate.py:
the KubeRay v1.7.0 CRD schemas, the operator's rules, Ray's runtime_env and Serve config schemas), the overlays
differ as they should, the recipe and the Serve application they carry are ours and valid, and broken manifests are
rejected with the error that names what is wrong. Needs kubectl (`kubectl kustomize`); no Ray cluster."""

from __future__ import annotations

import copy
import functools
import gzip
import hashlib
import importlib
import importlib.metadata
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from domainsynth.cluster import k8s_validate
from domainsynth.cluster.k8s_validate import kustomize_build, validate_documents, validate_manifest
from domainsynth.pipelines.recipe import ServeConfig, build_recipe

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
KUSTOMIZATIONS = ["base", "overlays/dev", "overlays/gpu"]
RAY_KINDS = ("RayCluster", "RayJob", "RayService")
IMAGE_PROJECT = "/home/ray/domainsynth/"  # where k8s/Dockerfile puts the project
MANIFEST_FILES = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"
                        and "patches" not in p.parts and "crds" not in p.parts)


def load(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


@functools.cache
def _rendered(kustomization: str) -> tuple:
    return tuple(kustomize_build(str(K8S / kustomization)))  # raises (the test fails) without kubectl


def rendered(kustomization: str) -> list[dict]:
    return copy.deepcopy(list(_rendered(kustomization)))


def the(docs: list[dict], kind: str) -> dict:
    [obj] = [doc for doc in docs if doc["kind"] == kind]
    return obj


def cluster_spec(obj: dict) -> dict:
    """A RayCluster's spec, or the cluster spec a RayJob or RayService carries."""
    field = {"RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}.get(obj["kind"])
    return obj["spec"][field] if field else obj["spec"]


def group(obj: dict, name: str) -> dict:
    [found] = [g for g in cluster_spec(obj)["workerGroupSpecs"] if g["groupName"] == name]
    return found


def containers(obj: dict) -> list[dict]:
    spec = cluster_spec(obj)
    return [c for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]] for c in g["template"]["spec"]["containers"]]


def serve_app(service: dict) -> tuple[dict, dict]:
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    [app] = config["applications"]
    return config, app


# --- the manifests as they are ------------------------------------------------------------------------------------

def test_the_manifest_files_are_found():
    names = {p.relative_to(K8S).as_posix() for p in MANIFEST_FILES}
    assert {"base/raycluster.yaml", "base/rayjob.yaml", "base/rayservice.yaml", "base/recipe-configmap.yaml",
            "base/runs-pvc.yaml"} <= names


@pytest.mark.parametrize("path", MANIFEST_FILES, ids=lambda p: p.relative_to(K8S).as_posix())
def test_every_manifest_file_validates(path):
    docs = load(path)
    assert docs
    assert validate_documents(docs) == []


def test_kubectl_is_there():
    assert shutil.which("kubectl"), "kubectl is not on PATH: the kustomize tests need it (`kubectl kustomize`, " \
                                    "kubectl >= 1.14)"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_kustomization_renders_valid_objects(kustomization):
    docs = rendered(kustomization)
    assert sorted(doc["kind"] for doc in docs) == sorted(
        ["PersistentVolumeClaim", "ConfigMap", "RayCluster", "RayJob", "RayService"])
    assert validate_documents(docs) == []


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_clusters_autoscale_with_v2_and_keep_work_off_the_head(kustomization):
    for obj in (the(rendered(kustomization), kind) for kind in RAY_KINDS):
        spec = cluster_spec(obj)
        assert spec["enableInTreeAutoscaling"] is True
        assert spec["autoscalerOptions"]["version"] == "v2"
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        assert spec["rayVersion"] == importlib.metadata.version("ray")


def test_dev_overlay_is_cpu_only():
    docs = rendered("overlays/dev")
    for obj in (the(docs, kind) for kind in RAY_KINDS):
        assert [g["groupName"] for g in cluster_spec(obj)["workerGroupSpecs"]] == ["cpu"]
        assert {c["image"] for c in containers(obj)} == {"domainsynth:0.1.0-cpu"}
    assert "nvidia.com/gpu" not in json.dumps(docs)
    assert the(docs, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_gpu_overlay_has_a_gpu_group_that_starts_from_zero():
    docs = rendered("overlays/gpu")
    for obj in (the(docs, kind) for kind in RAY_KINDS):
        gpu = group(obj, "gpu")
        assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
        assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert gpu["resources"] == {"accelerator_type:H100": "1"}  # the autoscaler can start it for H100 work
        assert {c["image"] for c in containers(obj)} == {"domainsynth:0.1.0-gpu"}
    _, app = serve_app(the(docs, "RayService"))
    assert app["args"]["engine"] == "vllm" and app["args"]["num_gpus"] == 1
    assert app["deployments"][0]["ray_actor_options"]["num_gpus"] == 1


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_the_endpoint_runs_our_serve_application(kustomization):
    from ray.serve.schema import ServeDeploySchema

    service = the(rendered(kustomization), "RayService")
    config, app = serve_app(service)
    ServeDeploySchema.model_validate(config)
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    module, name = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), name))
    args = ServeConfig.model_validate(app["args"])
    _exists_in_image(args.model)
    # The deployment's overrides say what the args say: Serve applies the overrides, our builder reads the args.
    [deployment] = app["deployments"]
    assert deployment["name"] == "generator"
    assert deployment["autoscaling_config"] == args.autoscaling.model_dump(
        include={"min_replicas", "max_replicas", "target_ongoing_requests"})
    assert deployment["ray_actor_options"] == {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus}
    assert deployment["max_ongoing_requests"] == args.max_ongoing_requests
    head = cluster_spec(service)["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "serve", "containerPort": 8000} in head["ports"]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_the_job_runs_the_recipe_in_its_configmap(kustomization):
    docs = rendered(kustomization)
    recipe_map, job = the(docs, "ConfigMap"), the(docs, "RayJob")
    raw = yaml.safe_load(recipe_map["data"]["recipe.yaml"])
    recipe = build_recipe(copy.deepcopy(raw), "configmap", "/home/ray/recipe")
    assert job["spec"]["entrypoint"] == "domainsynth run /home/ray/recipe/recipe.yaml"
    head = cluster_spec(job)["headGroupSpec"]["template"]["spec"]
    [volume] = [v for v in head["volumes"] if v.get("configMap", {}).get("name") == recipe_map["metadata"]["name"]]
    assert {"name": volume["name"], "mountPath": "/home/ray/recipe", "readOnly": True} in \
        head["containers"][0]["volumeMounts"]
    # run_dir is on the shared volume, mounted on every pod of the job's cluster.
    claim = the(docs, "PersistentVolumeClaim")["metadata"]["name"]
    for pod in [cluster_spec(job)["headGroupSpec"], *cluster_spec(job)["workerGroupSpecs"]]:
        spec = pod["template"]["spec"]
        [runs] = [v["name"] for v in spec["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == claim]
        mounts = [m["mountPath"] for m in spec["containers"][0]["volumeMounts"] if m["name"] == runs]
        assert any(recipe.run_dir.startswith(mount + "/") for mount in mounts)
    for path in _strings(raw):
        _exists_in_image(path)


def _strings(value):
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def _exists_in_image(path: str) -> None:
    """A path into the image names a file of this repository, or a model the Dockerfile makes."""
    if not path.startswith(IMAGE_PROJECT):
        return
    relative = path[len(IMAGE_PROJECT):].rstrip("/")
    if relative.startswith("models/"):
        assert f"make-tiny {IMAGE_PROJECT}{relative}" in (K8S / "Dockerfile").read_text()
    else:
        assert (ROOT / relative).exists(), path


# --- broken manifests are rejected --------------------------------------------------------------------------------

@functools.cache
def _base_objects() -> dict:
    return {doc["kind"]: doc for path in MANIFEST_FILES if path.parent.name == "base" for doc in load(path)}


def base(kind: str) -> dict:
    return copy.deepcopy(_base_objects()[kind])


def at(obj, path: str):
    """The node at 'spec.workerGroupSpecs.1' (dotted, list indices as numbers)."""
    for part in path.split(".") if path else ():
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]
    return obj


def setting(path: str, value):
    parent, _, key = path.rpartition(".")
    return lambda obj: at(obj, parent).__setitem__(int(key) if key.isdigit() else key, value)


def deleting(path: str):
    parent, _, key = path.rpartition(".")
    return lambda obj: at(obj, parent).pop(int(key) if key.isdigit() else key)


def serve_config_edit(edit):
    def mutate(service):
        config = yaml.safe_load(service["spec"]["serveConfigV2"])
        edit(config["applications"][0])
        service["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    return mutate


WORKER = "spec.workerGroupSpecs"
JOB_CLUSTER = "spec.rayClusterSpec"
HEAD_CONTAINER = "headGroupSpec.template.spec.containers"
LIMITS = f"{WORKER}.0.template.spec.containers.0.resources.limits"

BROKEN = [
    # The CRD schema, strictly.
    ("unknown field deep down", "RayJob", setting(f"{JOB_CLUSTER}.{HEAD_CONTAINER}.0.imagePullPolicyy", "Always"),
     "spec.rayClusterSpec.headGroupSpec.template.spec.containers[0].imagePullPolicyy: unknown field"),
    ("unknown field in spec", "RayCluster", setting("spec.workerGroupSpec", []), "spec.workerGroupSpec: unknown field"),
    ("wrong type", "RayCluster", setting(f"{WORKER}.0.maxReplicas", "eight"),
     "spec.workerGroupSpecs[0].maxReplicas: expected integer, got string 'eight'"),
    ("int32 out of range", "RayCluster", setting(f"{WORKER}.0.maxReplicas", 2**31),
     "spec.workerGroupSpecs[0].maxReplicas: 2147483648 is out of range (int32): expected -2147483648..2147483647"),
    ("not int-or-string", "RayCluster", setting(f"{LIMITS}.cpu", [4]),
     "spec.workerGroupSpecs[0].template.spec.containers[0].resources.limits.cpu: expected integer or string, "
     "got list [4]"),
    ("not a quantity", "RayCluster", setting(f"{LIMITS}.memory", "lots"),
     "spec.workerGroupSpecs[0].template.spec.containers[0].resources.limits.memory: 'lots' does not match ^"),
    ("enum", "RayCluster", setting("spec.autoscalerOptions.upscalingMode", "Eager"),
     "spec.autoscalerOptions.upscalingMode: expected one of Default, Aggressive, Conservative, got 'Eager'"),
    ("required field", "RayService", deleting("spec.rayClusterConfig.headGroupSpec"),
     "spec.rayClusterConfig.headGroupSpec: required field is missing"),
    ("duplicate container names", "RayCluster",
     lambda c: at(c, f"spec.{HEAD_CONTAINER}").append(copy.deepcopy(at(c, f"spec.{HEAD_CONTAINER}.0"))),
     "spec.headGroupSpec.template.spec.containers[1]: duplicate entry (name='ray-head'): the items of this list "
     "must be unique"),
    # CEL rules of the CRDs.
    ("CEL: managedBy", "RayJob", setting("spec.managedBy", "me"),
     "spec.managedBy: the managedBy field value must be either 'ray.io/kuberay-operator' or "
     "'kueue.x-k8s.io/multikueue' (got 'me')"),
    ("CEL: deletionStrategy", "RayJob", setting("spec.deletionStrategy", {"onSuccess": {"policy": "DeleteCluster"}}),
     "spec.deletionStrategy: deletionStrategy requires either BOTH onSuccess and onFailure, OR the deletionRules "
     "field (cannot be empty)"),
    # The operator's rules.
    ("minReplicas > maxReplicas", "RayCluster", setting(f"{WORKER}.1.minReplicas", 5),
     "spec.workerGroupSpecs[1].minReplicas (5) > maxReplicas (2)"),
    ("replicas above maxReplicas", "RayJob", setting(f"{JOB_CLUSTER}.workerGroupSpecs.0.replicas", 9),
     "spec.rayClusterSpec.workerGroupSpecs[0].replicas (9) is outside minReplicas..maxReplicas (1..8)"),
    ("duplicate group names", "RayCluster", setting(f"{WORKER}.1.groupName", "cpu"),
     "spec.workerGroupSpecs[1].groupName: 'cpu' is taken by another group; worker group names must be unique"),
    ("no head container", "RayService", setting(f"spec.rayClusterConfig.{HEAD_CONTAINER}", []),
     "spec.rayClusterConfig.headGroupSpec.template.spec.containers: the head pod needs at least one container "
     "(the Ray container comes first)"),
    ("Ray resources set twice", "RayCluster", setting(f"{WORKER}.1.rayStartParams.num-gpus", "1"),
     "spec.workerGroupSpecs[1]: Ray resources are set both in rayStartParams (num-cpus, num-gpus, memory, "
     "resources) and in resources; use only one"),
    ("restartPolicy with autoscaler v2", "RayCluster", setting("spec.headGroupSpec.template.spec.restartPolicy",
                                                               "Always"),
     "spec.headGroupSpec.template.spec.restartPolicy: must be Never or unset with autoscaler v2, got 'Always'"),
    ("token auth on an old Ray", "RayCluster", setting("spec.rayVersion", "2.40.0"),
     "spec.rayVersion: authOptions.mode token needs Ray 2.52.0 or later, got '2.40.0'"),
    ("ttl without shutdown", "RayJob", setting("spec.shutdownAfterJobFinishes", False),
     "spec.ttlSecondsAfterFinished (600) needs spec.shutdownAfterJobFinishes: true"),
    ("bad submissionMode", "RayJob", setting("spec.submissionMode", "K8sMode"),
     "spec.submissionMode: expected one of K8sJobMode, HTTPMode, InteractiveMode, SidecarMode, got 'K8sMode'"),
    ("no entrypoint", "RayJob", deleting("spec.entrypoint"),
     "spec.entrypoint: required in K8sJobMode (the command the job runs)"),
    ("cluster and selector", "RayJob", setting("spec.clusterSelector", {"ray.io/cluster": "domainsynth"}),
     "spec: set one of rayClusterSpec (a new cluster for the job) or clusterSelector (an existing cluster), not "
     "both"),
    ("bad upgradeStrategy", "RayService", setting("spec.upgradeStrategy", {"type": "BlueGreen"}),
     "spec.upgradeStrategy.type: expected one of NewClusterWithIncrementalUpgrade, NewCluster, None, got "
     "'BlueGreen'"),
    # runtimeEnvYAML.
    ("runtimeEnvYAML not YAML", "RayJob", setting("spec.runtimeEnvYAML", "env_vars: {A: '1'"),
     "spec.runtimeEnvYAML: not valid YAML: "),
    ("runtimeEnvYAML not a mapping", "RayJob", setting("spec.runtimeEnvYAML", "- pip\n- env_vars\n"),
     "spec.runtimeEnvYAML: expected a YAML mapping (runtime_env fields: env_vars, pip, working_dir, ...), got list"),
    ("unknown runtime_env field", "RayJob", setting("spec.runtimeEnvYAML", "env_varz: {A: '1'}\n"),
     "spec.runtimeEnvYAML: env_varz: unknown runtime_env field (known: conda, config, container, env_vars, "),
    ("bad runtime_env value", "RayJob", setting("spec.runtimeEnvYAML", "env_vars: {A: 1}\n"),
     "spec.runtimeEnvYAML: runtime_env['env_vars'] must be of type Dict[str, str]"),
    # serveConfigV2.
    ("serveConfigV2 not YAML", "RayService", setting("spec.serveConfigV2", "applications: [\n"),
     "spec.serveConfigV2: not valid YAML: "),
    ("unknown field in an application", "RayService", serve_config_edit(lambda app: app.update(import_pth="x.y")),
     "spec.serveConfigV2: applications[0].import_pth: unknown field"),
    ("unknown autoscaling_config field", "RayService",
     serve_config_edit(lambda app: app["deployments"][0]["autoscaling_config"].update(max_replica=3)),
     "spec.serveConfigV2: applications[0].deployments[0].autoscaling_config.max_replica: unknown field"),
    ("Serve schema: import path", "RayService", serve_config_edit(lambda app: app.update(import_path="domainsynth")),
     "spec.serveConfigV2: applications[0].import_path: Value error, Got invalid import path \"domainsynth\""),
    ("Serve schema: autoscaling bounds", "RayService",
     serve_config_edit(lambda app: app["deployments"][0]["autoscaling_config"].update(min_replicas=5)),
     "spec.serveConfigV2: applications[0].deployments[0].autoscaling_config: Value error, max_replicas (4) must be "
     "greater than or equal to min_replicas (5)!"),
    ("our import path", "RayService",
     serve_config_edit(lambda app: app.update(import_path="domainsynth.pipelines.serve:app_buider")),
     "spec.serveConfigV2: applications[0].import_path: 'domainsynth.pipelines.serve:app_buider' is not "
     "domainsynth's Serve application, 'domainsynth.pipelines.serve:app_builder'"),
    ("our args: ServeConfig", "RayService", serve_config_edit(lambda app: app["args"].update(engine="tensorrt")),
     "spec.serveConfigV2: applications[0].args.engine: Input should be 'transformers' or 'vllm'"),
    ("our deployment's name", "RayService", serve_config_edit(lambda app: app["deployments"][0].update(name="llm")),
     "spec.serveConfigV2: applications[0].deployments[0].name: our application has one deployment, 'generator', "
     "got 'llm'"),
    # Metadata and core kinds.
    ("bad metadata.name", "RayCluster", setting("metadata.name", "Domain_Synth"),
     "metadata.name 'Domain_Synth': must be a DNS-1035 label (lower-case letters, digits and '-', starting with a "
     "letter and ending with a letter or digit) of at most 53 characters"),
    ("RayJob name too long", "RayJob", setting("metadata.name", "a" * 48), "metadata.name 'aaaa"),
    ("no metadata.name", "ConfigMap", deleting("metadata.name"), "metadata.name: required field is missing"),
    ("ConfigMap value not a string", "ConfigMap", lambda cm: cm["data"].update({"recipe.yaml": 3}),
     "data['recipe.yaml']: expected string, got integer 3"),
    ("PVC without a size", "PersistentVolumeClaim", deleting("spec.resources"),
     "spec.resources.requests.storage: required field is missing (the size, e.g. 10Gi)"),
    ("old apiVersion", "RayCluster", setting("apiVersion", "ray.io/v1alpha1"),
     "apiVersion 'ray.io/v1alpha1', kind 'RayCluster': not a kind this validator knows (ray.io/v1 RayCluster, "),
]


@pytest.mark.parametrize("kind, mutate, expected", [case[1:] for case in BROKEN], ids=[case[0] for case in BROKEN])
def test_broken_manifests_are_rejected(kind, mutate, expected):
    obj = base(kind)
    assert validate_manifest(obj) == []
    mutate(obj)
    errors = validate_manifest(obj)
    assert any(error.startswith(expected) for error in errors), errors


def test_documents_are_named_in_errors_and_duplicates_found():
    cluster = base("RayCluster")
    broken = setting(f"{WORKER}.1.minReplicas", 5)
    broken(cluster)
    assert validate_documents([cluster, base("RayCluster")]) == [
        "RayCluster/domainsynth: spec.workerGroupSpecs[1].minReplicas (5) > maxReplicas (2)",
        "RayCluster/domainsynth: defined twice (the second would replace the first)"]


def test_schema_defaults_are_applied_before_validation():
    """minReplicas and maxReplicas are required by the schema but have defaults (0 and 2147483647): the API server
    fills them in first, and so does the validator, without touching the caller's object."""
    cluster = base("RayCluster")
    for worker in cluster["spec"]["workerGroupSpecs"]:
        del worker["minReplicas"], worker["maxReplicas"]
    cluster["spec"]["workerGroupSpecs"][0]["replicas"] = 3  # within 0..2147483647 once defaulted
    cluster["spec"]["headGroupSpec"]["serviceType"] = None  # a null of a non-nullable field is dropped
    before = copy.deepcopy(cluster)
    assert validate_manifest(cluster) == []
    assert cluster == before
    job = base("RayJob")
    del job["spec"]["submissionMode"]  # defaults to K8sJobMode, which needs the entrypoint
    del job["spec"]["entrypoint"]
    assert validate_manifest(job) == ["spec.entrypoint: required in K8sJobMode (the command the job runs)"]


def test_every_cel_rule_of_the_crds_is_checked():
    """A rule the validator does not know would be skipped silently; transition rules (oldSelf) only apply to
    updates."""
    def rules(schema):
        found = [rule["rule"] for rule in schema.get("x-kubernetes-validations", ())]
        children = [*schema.get("properties", {}).values(), schema.get("items"), schema.get("additionalProperties")]
        return found + [r for child in children if isinstance(child, dict) for r in rules(child)]

    for kind in RAY_KINDS:
        unknown = {r for r in rules(k8s_validate._crd_schema(kind)) if r not in k8s_validate.CEL_RULES
                   and "oldSelf" not in r}
        assert not unknown, f"{kind}: CEL rules without a Python version in CEL_RULES: {unknown}"


def test_strict_schema_keywords():
    """What the KubeRay CRDs do not use yet but the API server honours: preserved unknown fields, embedded
    resources, int-or-string without an anyOf, nullable."""
    schema = k8s_validate._strict_schema({"type": "object", "properties": {
        "open": {"type": "object", "properties": {"a": {"type": "string"}},
                 "x-kubernetes-preserve-unknown-fields": True},
        "embedded": {"type": "object", "x-kubernetes-embedded-resource": True,
                     "x-kubernetes-preserve-unknown-fields": True},
        "port": {"x-kubernetes-int-or-string": True},
        "note": {"type": "string", "nullable": True}}})
    validator = k8s_validate.Draft4Validator(schema)

    def errors(obj):
        return k8s_validate._schema_errors(validator, obj)

    assert errors({"open": {"a": "x", "b": 1}, "embedded": {"apiVersion": "v1", "kind": "Pod", "spec": {}},
                   "port": "http", "note": None}) == []
    assert errors({"embedded": {"spec": {}}, "port": 1.5, "other": 1}) == [
        "embedded.apiVersion: required field is missing", "embedded.kind: required field is missing",
        "other: unknown field", "port: expected integer or string, got number 1.5"]


def test_the_crds_are_the_ones_the_readme_names():
    rows = re.findall(r"^\| `(ray\.io_\w+\.yaml\.gz)` \| (\w+) \| (\d+) \| `([0-9a-f]{64})` \|$",
                      (K8S / "crds" / "README.md").read_text(), re.MULTILINE)
    assert sorted(name for name, *_ in rows) == sorted(k8s_validate.CRD_FILES.values())
    for name, kind, size, sha256 in rows:
        data = gzip.decompress((K8S / "crds" / name).read_bytes())
        assert (len(data), hashlib.sha256(data).hexdigest()) == (int(size), sha256), name
        assert k8s_validate.CRD_FILES[kind] == name


def test_kustomize_build_failures_are_clear(tmp_path, monkeypatch):
    (tmp_path / "kustomization.yaml").write_text("resources: [missing.yaml]\n")
    with pytest.raises(RuntimeError, match="kubectl kustomize .* failed:\n.*missing.yaml"):
        kustomize_build(str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="kubectl is not on PATH"):
        kustomize_build(str(tmp_path))
