"""Offline checks of Kubernetes manifests, so that a manifest is known good before it meets a cluster.

KubeRay's ``ray.io/v1`` RayCluster, RayJob and RayService are checked the way the API server and the operator would:

1. the API server's part: drop nulls, fill in the CRD schema's ``default``s, then validate against the CRD's v1
   ``openAPIV3Schema`` as strictly as ``kubectl apply --validate=strict`` (an unknown field is an error), with the
   list-type rules and the CRDs' CEL rules (``x-kubernetes-validations``);
2. the operator's part (``ray-operator/controllers/ray/utils/validation.go`` and the RayCluster webhook, KubeRay
   v1.7.0): replicas bounds, unique group names, a head container, the RayJob and RayService rules;
3. the strings that carry other configs: ``runtimeEnvYAML`` against Ray's ``RuntimeEnv``, ``serveConfigV2`` against
   Ray Serve's ``ServeDeploySchema`` (and, for our application, its ``args`` against the recipe's ``ServeConfig``).

A few core kinds (ConfigMap, Secret, Service, ServiceAccount, PersistentVolumeClaim, Namespace) are checked by shape.
The CRDs are unmodified copies of KubeRay v1.7.0's (``k8s/crds``, see its README). Errors name the JSON path and
what was expected, e.g. ``spec.workerGroupSpecs[1].minReplicas (5) > maxReplicas (2)``.
"""

from __future__ import annotations

import copy
import functools
import gzip
import os
import re
import shutil
import subprocess
import typing

import yaml
from jsonschema import Draft4Validator
from pydantic import BaseModel, ValidationError

from ..pipelines.serve import APP_BUILDER as SERVE_APP_BUILDER

CRD_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "k8s", "crds")
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml.gz", "RayJob": "ray.io_rayjobs.yaml.gz",
             "RayService": "ray.io_rayservices.yaml.gz"}
RAY_API_VERSION = "ray.io/v1"
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
UPGRADE_TYPES = ("NewClusterWithIncrementalUpgrade", "NewCluster", "None")


# --- the public API -----------------------------------------------------------------------------------------------

def validate_manifest(doc: dict) -> list[str]:
    """Errors for one Kubernetes object (empty list = valid)."""
    if not isinstance(doc, dict):
        return [f"expected a mapping (a Kubernetes object), got {_type_name(doc)}"]
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if api_version == RAY_API_VERSION and kind in CRD_FILES:
        return _ray_errors(doc)
    if api_version == "v1" and kind in CORE_FIELDS:
        return _metadata_errors(doc.get("metadata"), kind) + _core_errors(doc)
    known = [f"{RAY_API_VERSION} {k}" for k in CRD_FILES] + [f"v1 {k}" for k in CORE_FIELDS]
    return [f"apiVersion {api_version!r}, kind {kind!r}: not a kind this validator knows ({', '.join(known)})"]


def validate_documents(docs: list[dict]) -> list[str]:
    """Errors for several objects, each prefixed 'Kind/name: '."""
    errors, seen = [], set()
    for doc in docs:
        obj = doc if isinstance(doc, dict) else {}
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        label = f"{obj.get('kind')}/{meta.get('name')}"
        identity = (obj.get("apiVersion"), obj.get("kind"), meta.get("namespace"), meta.get("name"))
        if identity in seen:
            errors.append(f"{label}: defined twice (the second would replace the first)")
        seen.add(identity)
        errors += [f"{label}: {error}" for error in validate_manifest(doc)]
    return errors


def kustomize_build(path: str) -> list[dict]:
    """`kubectl kustomize PATH` parsed into objects; raises RuntimeError with kubectl's stderr on failure,
    and a clear RuntimeError if kubectl is not on PATH."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise RuntimeError("kubectl is not on PATH: it renders the kustomizations (`kubectl kustomize`, built in since "
                           "kubectl 1.14); install it: https://kubernetes.io/docs/tasks/tools/")
    result = subprocess.run([kubectl, "kustomize", path], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {path} failed:\n{result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


# --- names and metadata -------------------------------------------------------------------------------------------

DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# kind -> (pattern, what it is called, longest name). KubeRay names Services after the object ("-serve-svc" is the
# longest suffix, 63 - 10 = 53) and a RayJob's or RayService's cluster after its own name plus 6 characters.
NAME_RULES = {
    "RayCluster": (DNS1035_LABEL, "a DNS-1035 label", 53),
    "RayJob": (DNS1035_LABEL, "a DNS-1035 label", 47),
    "RayService": (DNS1035_LABEL, "a DNS-1035 label", 47),
    "Service": (DNS1035_LABEL, "a DNS-1035 label", 63),
    "Namespace": (DNS1123_LABEL, "a DNS-1123 label", 63),
}
DEFAULT_NAME_RULE = (DNS1123_SUBDOMAIN, "a DNS-1123 subdomain", 253)
NAME_SYNTAX = {"a DNS-1035 label": "lower-case letters, digits and '-', starting with a letter and ending with a "
                                   "letter or digit",
               "a DNS-1123 label": "lower-case letters, digits and '-', starting and ending with a letter or digit",
               "a DNS-1123 subdomain": "dot-separated DNS-1123 labels: lower-case letters, digits and '-'"}
OBJECT_META_FIELDS = {"name", "generateName", "namespace", "labels", "annotations", "finalizers", "ownerReferences",
                      "uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp",
                      "deletionGracePeriodSeconds", "managedFields", "selfLink"}


def _metadata_errors(meta, kind: str) -> list[str]:
    if not isinstance(meta, dict):
        return [f"metadata: expected a mapping with at least a name, got {_type_name(meta)}"]
    errors = [f"metadata.{key}: unknown field" for key in meta if key not in OBJECT_META_FIELDS]
    errors += _name_errors("metadata.name", meta.get("name"), *NAME_RULES.get(kind, DEFAULT_NAME_RULE))
    if "namespace" in meta:
        errors += _name_errors("metadata.namespace", meta["namespace"], *NAME_RULES["Namespace"])
    for field in ("labels", "annotations"):
        errors += _string_map_errors(f"metadata.{field}", meta.get(field) or {})
    labels = meta.get("labels") if isinstance(meta.get("labels"), dict) else {}
    errors += [f"{_path_text(('metadata.labels', key))}: {value!r} is not a label value (at most 63 letters, digits, "
               f"'-', '_' or '.', starting and ending with a letter or digit)" for key, value in labels.items()
               if isinstance(value, str) and (len(value) > 63 or not LABEL_VALUE.match(value))]
    return errors


def _name_errors(path: str, name, pattern: re.Pattern, called: str, longest: int) -> list[str]:
    if name is None:
        return [f"{path}: required field is missing"]
    if not isinstance(name, str):
        return [f"{path}: expected string, got {_type_name(name)} {_short(name)}"]
    if not pattern.match(name) or len(name) > longest:
        return [f"{path} {name!r}: must be {called} ({NAME_SYNTAX[called]}) of at most {longest} characters"]
    return []


def _string_map_errors(path: str, value) -> list[str]:
    if not isinstance(value, dict):
        return [f"{path}: expected a mapping of strings, got {_type_name(value)}"]
    return [f"{_path_text((path, key))}: expected string, got {_type_name(v)} {_short(v)}"
            for key, v in value.items() if not isinstance(v, str)]


# --- core kinds: shape only ---------------------------------------------------------------------------------------

def _string_map(path: str, value) -> list[str]:
    errors = _string_map_errors(path, value)
    keys = value if isinstance(value, dict) else {}
    return errors + [f"{_path_text((path, key))}: keys are letters, digits, '-', '_' or '.'" for key in keys
                     if not re.match(r"^[-._a-zA-Z0-9]+$", str(key))]


def _of_type(expected: type):
    def check(path: str, value) -> list[str]:
        if type(value) is expected:
            return []
        return [f"{path}: expected {TYPE_NAMES[expected]}, got {_type_name(value)} {_short(value)}"]
    return check


def _pvc_spec(path: str, spec) -> list[str]:
    errors = _of_type(dict)(path, spec)
    if errors:
        return errors
    modes = spec.get("accessModes")
    allowed = ("ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod")
    if not isinstance(modes, list) or not modes or any(mode not in allowed for mode in modes):
        errors.append(f"{path}.accessModes: expected a non-empty list of {', '.join(allowed)}, got {_short(modes)}")
    storage = ((spec.get("resources") or {}).get("requests") or {}).get("storage")
    if storage is None:
        errors.append(f"{path}.resources.requests.storage: required field is missing (the size, e.g. 10Gi)")
    return errors


_COMMON_FIELDS = {"apiVersion": _of_type(str), "kind": _of_type(str),
                  "metadata": lambda path, value: []}  # checked by _metadata_errors
CORE_FIELDS = {
    "ConfigMap": {"data": _string_map, "binaryData": _string_map, "immutable": _of_type(bool)},
    "Secret": {"data": _string_map, "stringData": _string_map, "type": _of_type(str), "immutable": _of_type(bool)},
    "Service": {"spec": _of_type(dict)},
    "ServiceAccount": {"secrets": _of_type(list), "imagePullSecrets": _of_type(list),
                       "automountServiceAccountToken": _of_type(bool)},
    "PersistentVolumeClaim": {"spec": _pvc_spec},
    "Namespace": {"spec": _of_type(dict)},
}


def _core_errors(doc: dict) -> list[str]:
    fields = {**_COMMON_FIELDS, **CORE_FIELDS[doc["kind"]]}
    errors = [f"{key}: unknown field" for key in doc if key not in fields]
    for key, value in doc.items():
        if key in fields:
            errors += fields[key](key, value)
    if doc["kind"] == "PersistentVolumeClaim" and "spec" not in doc:
        errors.append("spec: required field is missing")
    return errors


# --- the CRD schemas: what the API server does --------------------------------------------------------------------

INT_RANGES = {"int32": (-2**31, 2**31 - 1), "int64": (-2**63, 2**63 - 1)}


@functools.cache
def _crd_schema(kind: str) -> dict:
    """The CRD's v1 openAPIV3Schema, made strict (parsed once per process: the files are about 1 MB each)."""
    with gzip.open(os.path.join(CRD_DIR, CRD_FILES[kind]), "rt", encoding="utf-8") as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _strict_schema(version["schema"]["openAPIV3Schema"])


@functools.cache
def _validator(kind: str) -> Draft4Validator:
    return Draft4Validator(_crd_schema(kind))


def _strict_schema(schema: dict) -> dict:
    """A structural schema in plain JSON Schema, as strict as the API server with strict field validation: an object
    with `properties` is closed unless it preserves unknown fields (`additionalProperties` maps stay as they are);
    int-or-string, nullable, embedded resources and the int32/int64 formats become what they mean."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {key: _strict_schema(sub) for key, sub in out["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = _strict_schema(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [_strict_schema(sub) for sub in out[key]]
    if out.get("x-kubernetes-embedded-resource"):  # a whole object inside: apiVersion and kind, metadata allowed
        out["properties"] = {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                             "metadata": {"type": "object"}, **out.get("properties", {})}
        out["required"] = sorted({*out.get("required", ()), "apiVersion", "kind"})
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("type") == "integer" and out.get("format") in INT_RANGES:
        low, high = INT_RANGES[out["format"]]
        out["minimum"], out["maximum"] = max(out.get("minimum", low), low), min(out.get("maximum", high), high)
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def _apply_defaults(schema: dict, value) -> None:
    """What the API server does before it validates, in place: drop the nulls of non-nullable fields, fill in each
    missing field's `default`, recursively (object fields, array items, map values)."""
    if isinstance(value, dict) and "properties" in schema:
        for key, sub in schema["properties"].items():
            if key in value and value[key] is None and not sub.get("nullable"):
                del value[key]
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                _apply_defaults(sub, value[key])
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for item in value.values():
            _apply_defaults(schema["additionalProperties"], item)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _apply_defaults(schema["items"], item)


def _schema_errors(validator: Draft4Validator, obj: dict) -> list[str]:
    # A set: jsonschema reports each missing required field as an error of the whole `required` list.
    return sorted({text for error in validator.iter_errors(obj) for text in _describe(error)})


def _describe(error) -> list[str]:
    """jsonschema's error as `path: what was expected`."""
    path, value, kind, expected = tuple(error.absolute_path), error.instance, error.validator, error.validator_value
    if kind == "additionalProperties":
        known = error.schema.get("properties", {})
        return [f"{_path_text(path + (key,))}: unknown field" for key in value if key not in known]
    if kind == "required":
        return [f"{_path_text(path + (key,))}: required field is missing" for key in expected if key not in value]
    where = _path_text(path) or "(top level)"
    if kind == "type":
        wanted = " or ".join(expected) if isinstance(expected, list) else expected
        return [f"{where}: expected {wanted}, got {_type_name(value)} {_short(value)}"]
    if kind == "anyOf" and error.schema.get("x-kubernetes-int-or-string"):
        return [f"{where}: expected integer or string, got {_type_name(value)} {_short(value)}"]
    if kind == "enum":
        return [f"{where}: expected one of {', '.join(map(str, expected))}, got {_short(value)}"]
    if kind in ("minimum", "maximum"):
        named = f" ({error.schema['format']})" if error.schema.get("format") in INT_RANGES else ""
        return [f"{where}: {value} is out of range{named}: expected {_bounds(error.schema)}"]
    if kind == "pattern":
        return [f"{where}: {_short(value)} does not match {expected}"]
    return [f"{where}: {error.message}"]


def _bounds(schema: dict) -> str:
    low, high = schema.get("minimum"), schema.get("maximum")
    if low is not None and high is not None:
        return f"{low}..{high}"
    return f">= {low}" if low is not None else f"<= {high}"


# CEL rules (x-kubernetes-validations) of the three CRDs, by their text, written in Python. Rules that compare with
# `oldSelf` are transition rules: they only apply when an object is updated, so an offline check has nothing to do.
CEL_RULES = {
    "self in ['ray.io/kuberay-operator', 'kueue.x-k8s.io/multikueue']":
        lambda v: v in ("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"),
    "!((has(self.onSuccess) || has(self.onFailure)) && has(self.deletionRules))":
        lambda v: not (("onSuccess" in v or "onFailure" in v) and "deletionRules" in v),
    "((has(self.onSuccess) && has(self.onFailure)) || has(self.deletionRules))":
        lambda v: ("onSuccess" in v and "onFailure" in v) or "deletionRules" in v,
    "!(has(self.jobStatus) && has(self.jobDeploymentStatus))":
        lambda v: not ("jobStatus" in v and "jobDeploymentStatus" in v),
    "has(self.jobStatus) || has(self.jobDeploymentStatus)":
        lambda v: "jobStatus" in v or "jobDeploymentStatus" in v,
}


def _extension_errors(schema: dict, value, path: tuple = ()) -> list[str]:
    """The rules the schema states beside JSON Schema: CEL rules and list types (unique sets, list-maps whose keys
    must be unique, e.g. container names, env names, (containerPort, protocol))."""
    errors = []
    for rule in schema.get("x-kubernetes-validations", ()):
        check = CEL_RULES.get(rule["rule"])
        if check and not check(value):
            got = "" if isinstance(value, (dict, list)) else f" (got {_short(value)})"
            errors.append(f"{_path_text(path)}: {rule['message']}{got}")
    if isinstance(value, list):
        errors += _list_type_errors(schema, value, path)
        for index, item in enumerate(value):
            errors += _extension_errors(schema.get("items", {}), item, path + (index,))
    elif isinstance(value, dict):
        properties, other = schema.get("properties", {}), schema.get("additionalProperties")
        for key, item in value.items():
            sub = properties.get(key, other if isinstance(other, dict) else None)
            if sub is not None:
                errors += _extension_errors(sub, item, path + (key,))
    return errors


def _list_type_errors(schema: dict, items: list, path: tuple) -> list[str]:
    list_type, keys = schema.get("x-kubernetes-list-type"), schema.get("x-kubernetes-list-map-keys", ())
    if list_type not in ("set", "map"):
        return []
    errors, seen = [], set()
    for index, item in enumerate(items):
        key = tuple((k, item.get(k)) for k in keys) if list_type == "map" and isinstance(item, dict) else repr(item)
        if key in seen:
            what = ", ".join(f"{k}={v!r}" for k, v in key) if list_type == "map" else _short(item)
            errors.append(f"{_path_text(path + (index,))}: duplicate entry ({what}): the items of this list must "
                          f"be unique")
        seen.add(key)
    return errors


def _ray_errors(doc: dict) -> list[str]:
    kind = doc["kind"]
    obj = copy.deepcopy(doc)
    _apply_defaults(_crd_schema(kind), obj)
    errors = _metadata_errors(obj.get("metadata"), kind) + _schema_errors(_validator(kind), obj)
    if errors:  # the rules below read fields the schema guarantees
        return errors
    errors = _extension_errors(_crd_schema(kind), obj)
    if not isinstance(obj.get("spec"), dict):
        return errors + ["spec: required field is missing"]
    return errors + OPERATOR_RULES[kind](obj["spec"])


# --- the operator's rules (KubeRay v1.7.0 validation.go and webhooks) ---------------------------------------------

RAY_START_RESOURCES = ("num-cpus", "num-gpus", "memory", "resources")
AUTOSCALER_V2_ENV = "RAY_enable_autoscaler_v2"


def _cluster_errors(spec: dict, at: str) -> list[str]:
    head = spec["headGroupSpec"]
    errors = _pod_errors(head, f"{at}.headGroupSpec", "the head pod")
    names: set = set()
    for index, group in enumerate(spec.get("workerGroupSpecs", ())):
        where = f"{at}.workerGroupSpecs[{index}]"
        if group["groupName"] in names:
            errors.append(f"{where}.groupName: {group['groupName']!r} is taken by another group; worker group names "
                          f"must be unique")
        names.add(group["groupName"])
        errors += _pod_errors(group, where, f"worker group {group['groupName']!r}") + _replica_errors(group, where)
    return errors + _autoscaler_errors(spec, at) + _auth_errors(spec, at)


def _pod_errors(group: dict, where: str, what: str) -> list[str]:
    errors = []
    if not group["template"].get("spec", {}).get("containers"):
        errors.append(f"{where}.template.spec.containers: {what} needs at least one container (the Ray container "
                      f"comes first)")
    params = group.get("rayStartParams", {})
    if group.get("resources") and any(params.get(key) for key in RAY_START_RESOURCES):
        errors.append(f"{where}: Ray resources are set both in rayStartParams ({', '.join(RAY_START_RESOURCES)}) "
                      f"and in resources; use only one")
    if "labels" in params:
        errors.append(f"{where}.rayStartParams.labels: not supported; use {where}.labels")
    return errors


def _replica_errors(group: dict, where: str) -> list[str]:
    low, high, replicas = group["minReplicas"], group["maxReplicas"], group.get("replicas", 0)
    errors = [f"{where}.{name} ({group[name]}) is negative" for name in ("minReplicas", "maxReplicas")
              if group[name] < 0]
    if low > high:
        errors.append(f"{where}.minReplicas ({low}) > maxReplicas ({high})")
    # replicas defaults to 0, which the operator raises to minReplicas: only a replicas set above 0 can be wrong.
    elif replicas > high or 0 < replicas < low:
        errors.append(f"{where}.replicas ({replicas}) is outside minReplicas..maxReplicas ({low}..{high})")
    return errors


def _autoscaler_errors(spec: dict, at: str) -> list[str]:
    containers = spec["headGroupSpec"]["template"].get("spec", {}).get("containers") or [{}]
    env = {item["name"]: item.get("value") for item in containers[0].get("env", ())}
    env_v2 = env.get(AUTOSCALER_V2_ENV) in ("1", "true")
    options = spec.get("autoscalerOptions", {})
    if not spec.get("enableInTreeAutoscaling"):
        if env_v2:
            return [f"{at}.headGroupSpec: {AUTOSCALER_V2_ENV}={env[AUTOSCALER_V2_ENV]} needs "
                    f"{at}.enableInTreeAutoscaling: true"]
        return []
    errors = []
    if "version" in options and AUTOSCALER_V2_ENV in env:
        errors.append(f"{at}.autoscalerOptions.version and the head container's {AUTOSCALER_V2_ENV} are both set; "
                      f"use only autoscalerOptions.version")
    if options.get("version") == "v2" or env_v2:  # v2 replaces failed pods itself
        groups = [(f"{at}.headGroupSpec", spec["headGroupSpec"])] + [
            (f"{at}.workerGroupSpecs[{i}]", g) for i, g in enumerate(spec.get("workerGroupSpecs", ()))]
        errors += [f"{where}.template.spec.restartPolicy: must be Never or unset with autoscaler v2, got "
                   f"{group['template']['spec']['restartPolicy']!r}" for where, group in groups
                   if group["template"].get("spec", {}).get("restartPolicy", "Never") != "Never"]
    return errors


def _auth_errors(spec: dict, at: str) -> list[str]:
    if spec.get("authOptions", {}).get("mode") != "token":
        return []
    version = re.match(r"^(\d+)\.(\d+)", spec.get("rayVersion", ""))
    if version is None or tuple(map(int, version.groups())) < (2, 52):
        return [f"{at}.rayVersion: authOptions.mode token needs Ray 2.52.0 or later, got "
                f"{spec.get('rayVersion', 'none')!r}"]
    return []


def _rayjob_errors(spec: dict) -> list[str]:
    errors = []
    mode, ttl, shutdown = spec["submissionMode"], spec["ttlSecondsAfterFinished"], spec.get("shutdownAfterJobFinishes")
    if mode not in SUBMISSION_MODES:
        errors.append(f"spec.submissionMode: expected one of {', '.join(SUBMISSION_MODES)}, got {mode!r}")
    if ttl < 0:
        errors.append(f"spec.ttlSecondsAfterFinished ({ttl}) is negative")
    if ttl > 0 and not shutdown:
        errors.append(f"spec.ttlSecondsAfterFinished ({ttl}) needs spec.shutdownAfterJobFinishes: true (the TTL is "
                      f"the wait before the finished job's cluster is deleted)")
    if spec.get("suspend") and not shutdown:
        errors.append("spec.suspend needs spec.shutdownAfterJobFinishes: true")
    selector, cluster = spec.get("clusterSelector"), spec.get("rayClusterSpec")
    if bool(selector) == (cluster is not None):
        errors.append("spec: set one of rayClusterSpec (a new cluster for the job) or clusterSelector (an existing "
                      "cluster), not " + ("both" if selector else "neither"))
    if selector and not selector.get("ray.io/cluster"):
        errors.append("spec.clusterSelector['ray.io/cluster']: required (the name of the cluster to run on)")
    if mode != "InteractiveMode" and not spec.get("entrypoint"):
        errors.append(f"spec.entrypoint: required in {mode} (the command the job runs)")
    if mode == "InteractiveMode" and spec["backoffLimit"] > 0:
        errors.append(f"spec.backoffLimit ({spec['backoffLimit']}): InteractiveMode does not retry; set 0")
    if spec["backoffLimit"] < 0:
        errors.append(f"spec.backoffLimit ({spec['backoffLimit']}) is negative")
    deadline = spec.get("activeDeadlineSeconds")
    if deadline is not None and deadline <= 0:
        errors.append(f"spec.activeDeadlineSeconds ({deadline}) must be positive")
    if cluster is not None:
        errors += _cluster_errors(cluster, "spec.rayClusterSpec")
    return errors + _runtime_env_errors(spec.get("runtimeEnvYAML"), "spec.runtimeEnvYAML")


def _rayservice_errors(spec: dict) -> list[str]:
    errors = _cluster_errors(spec["rayClusterConfig"], "spec.rayClusterConfig")
    upgrade = spec.get("upgradeStrategy", {}).get("type")
    if upgrade is not None and upgrade not in UPGRADE_TYPES:
        errors.append(f"spec.upgradeStrategy.type: expected one of {', '.join(UPGRADE_TYPES)}, got {upgrade!r}")
    return errors + _serve_config_errors(spec.get("serveConfigV2"), "spec.serveConfigV2")


OPERATOR_RULES = {"RayCluster": lambda spec: _cluster_errors(spec, "spec"), "RayJob": _rayjob_errors,
                  "RayService": _rayservice_errors}


# --- configs carried as strings: runtimeEnvYAML and serveConfigV2 -------------------------------------------------

def _parse_mapping(text: str, at: str, what: str):
    """(mapping or None, errors) of a YAML string that must hold a mapping."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return None, [f"{at}: not valid YAML: {_yaml_problem(e)}"]
    if value is not None and not isinstance(value, dict):
        return None, [f"{at}: expected a YAML mapping ({what}), got {_type_name(value)}"]
    return value, []


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1} of the string)" if mark else ""
    return f"{getattr(error, 'problem', None) or error}{where}"


def _runtime_env_errors(text, at: str) -> list[str]:
    env, errors = _parse_mapping(text or "", at, "runtime_env fields: env_vars, pip, working_dir, ...")
    if not env:
        return errors
    from ray.runtime_env import RuntimeEnv

    public = sorted(field for field in RuntimeEnv.known_fields if not field.startswith("_"))
    errors = [f"{at}: {key}: unknown runtime_env field (known: {', '.join(public)})"
              for key in env if key not in RuntimeEnv.known_fields]
    # Local paths (working_dir, py_modules) are the submitter pod's: Ray's own check would look for them here.
    checkable = {key: value for key, value in env.items()
                 if key in RuntimeEnv.known_fields and key not in ("working_dir", "py_modules")}
    try:
        RuntimeEnv(**checkable)
    except (TypeError, ValueError) as e:
        errors.append(f"{at}: {e}")
    return errors


def _serve_config_errors(text, at: str) -> list[str]:
    if text is None:
        return []
    config, errors = _parse_mapping(text, at, "Ray Serve's config: http_options, applications, ...")
    if config is None:
        return errors
    from ray.serve.schema import ServeDeploySchema

    errors = [f"{at}: {error}" for error in _unknown_serve_fields(ServeDeploySchema, config)]
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as e:
        errors += [f"{at}: {problem}" for problem in _pydantic_problems(e)]
    return errors or [f"{at}: {error}" for error in _our_app_errors(config)]


def _unknown_serve_fields(model, raw: dict, path: tuple = ()) -> list[str]:
    """Serve ignores fields it does not know (forward compatibility), so a misspelt one would silently do nothing;
    here it is an error. Sections Serve keeps as plain dicts and validates only when it deploys (a deployment's
    autoscaling_config) are validated here too."""
    fields = {(info.alias or name): info for name, info in model.model_fields.items()} | model.model_fields
    errors = []
    for key, value in raw.items():
        if key not in fields:
            errors.append(f"{_path_text(path + (key,))}: unknown field")
            continue
        nested = _nested_model(fields[key].annotation)
        for where, section in _sections(value, path + (key,)) if nested else ():
            errors += _unknown_serve_fields(nested, section, where)
            if _allows_plain_dict(fields[key].annotation):
                try:
                    nested.model_validate(section)
                except ValidationError as e:
                    errors += _pydantic_problems(e, where)
    return errors


def _sections(value, path: tuple) -> list[tuple]:
    """(path, mapping) of a field holding a mapping or a list of them."""
    if isinstance(value, dict):
        return [(path, value)]
    items = enumerate(value) if isinstance(value, list) else ()
    return [(path + (index,), item) for index, item in items if isinstance(item, dict)]


def _nested_model(annotation):
    """The pydantic model inside Optional[...], Union[...], List[...] (not inside Dict[str, ...]), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) is dict:
        return None
    return next(filter(None, map(_nested_model, typing.get_args(annotation))), None)


def _allows_plain_dict(annotation) -> bool:
    return any(arg is dict or typing.get_origin(arg) is dict for arg in typing.get_args(annotation))


def _pydantic_problems(error, at: tuple = ()) -> list[str]:
    return [f"{_path_text(at + tuple(item['loc'])) or '(top level)'}: {item['msg']}" for item in error.errors()]


def _our_app_errors(config: dict) -> list[str]:
    """For our application: the import path is the one there is, args are a recipe's serve section, and its one
    deployment is named `generator`."""
    from ..actors.serve_app import DEPLOYMENT_NAME
    from ..pipelines.recipe import ServeConfig

    errors = []
    for index, app in enumerate(config.get("applications") or ()):
        where, import_path = ("applications", index), app.get("import_path", "")
        if import_path.startswith("domainsynth.") and import_path != SERVE_APP_BUILDER:
            errors.append(f"{_path_text(where + ('import_path',))}: {import_path!r} is not domainsynth's Serve "
                          f"application, {SERVE_APP_BUILDER!r}")
        if import_path != SERVE_APP_BUILDER:
            continue
        try:
            ServeConfig.model_validate(app.get("args") or {})
        except ValidationError as e:
            errors += _pydantic_problems(e, where + ("args",))
        errors += [f"{_path_text(where + ('deployments', i, 'name'))}: our application has one deployment, "
                   f"{DEPLOYMENT_NAME!r}, got {d.get('name')!r}"
                   for i, d in enumerate(app.get("deployments") or ()) if d.get("name") != DEPLOYMENT_NAME]
    return errors


# --- formatting ---------------------------------------------------------------------------------------------------

def _path_text(path: tuple) -> str:
    """('spec', 'workerGroupSpecs', 1, 'minReplicas') -> spec.workerGroupSpecs[1].minReplicas; keys that are not
    plain names are quoted: limits['nvidia.com/gpu']."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif re.match(r"^[A-Za-z_][-A-Za-z0-9_]*$", part) or not text:
            text += f".{part}" if text else part
        else:
            text += f"[{part!r}]"
    return text


TYPE_NAMES = {dict: "mapping", list: "list", str: "string", bool: "boolean", int: "integer", float: "number",
              type(None): "null"}


def _type_name(value) -> str:
    return TYPE_NAMES.get(type(value), type(value).__name__)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
