"""`domainsynth k8s render`: manifests made from recipes pass the KubeRay v1.7.0 CRDs strictly and the operator's
rules (cluster/k8s_validate.py, itself tested in test_k8s_manifests.py), and carry the recipe's image, resources,
replicas and paths. No Kubernetes API server exists here; the CRD schemas stand in for it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from domainsynth.cluster import k8s_render
from domainsynth.cluster.cli import main
from domainsynth.cluster.k8s_validate import validate_documents
from domainsynth.pipelines.recipe import ServeConfig, build_recipe

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = str(REPO / "examples" / "quickstart.yaml")
GENERATOR = str(REPO / "examples" / "generator.yaml")


@pytest.fixture(autouse=True)
def in_the_repository(monkeypatch):
    """The example recipes' run_dir is relative to the current directory, as for `domainsynth run`."""
    monkeypatch.chdir(REPO)


def render(capsys, recipe: str, kind: str, *sets: str) -> tuple[list[dict], str]:
    code = main(["k8s", "render", recipe, "--kind", kind, "--project-dir", str(REPO),
                 *[arg for s in sets for arg in ("--set", s)]])
    out, err = capsys.readouterr()
    assert code == 0, err
    return list(yaml.safe_load_all(out)), err


def groups(cluster_spec: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in cluster_spec["workerGroupSpecs"]}


@pytest.mark.parametrize("recipe,kind", [(QUICKSTART, "rayjob"), (QUICKSTART, "raycluster"),
                                         (GENERATOR, "rayservice"), (GENERATOR, "rayjob")])
def test_every_render_passes_the_crds_and_the_operator_rules(capsys, recipe, kind):
    objects, _ = render(capsys, recipe, kind)
    assert objects and validate_documents(objects) == []
    assert {o["kind"] for o in objects} >= {{"rayjob": "RayJob", "raycluster": "RayCluster",
                                            "rayservice": "RayService"}[kind]}


def test_rayjob_carries_the_recipe_the_image_and_the_job_settings(capsys):
    objects, notes = render(capsys, QUICKSTART, "rayjob", "kubernetes.image=registry.example/ds:1.2",
                            "kubernetes.job.ttl_seconds_after_finished=600", "kubernetes.job.backoff_limit=2",
                            "kubernetes.job.active_deadline_seconds=7200", "kubernetes.namespace=research",
                            "judge.model=../models/tiny-llama-4k")
    config_map, job = objects
    spec = job["spec"]
    assert spec["entrypoint"] == "domainsynth run /home/ray/recipe/recipe.yaml"
    assert (spec["shutdownAfterJobFinishes"], spec["ttlSecondsAfterFinished"], spec["backoffLimit"],
            spec["activeDeadlineSeconds"], spec["submissionMode"]) == (True, 600, 2, 7200, "K8sJobMode")
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    assert job["metadata"]["namespace"] == config_map["metadata"]["namespace"] == "research"
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["image"] == "registry.example/ds:1.2"
    assert {"name": "recipe", "configMap": {"name": config_map["metadata"]["name"]}} in head["volumes"]
    # The recipe inside is a valid recipe whose local paths point into the image's copy of the project.
    raw = yaml.safe_load(config_map["data"]["recipe.yaml"])
    recipe = build_recipe(raw, "configmap", "/home/ray/recipe")
    assert recipe.select.in_domain == ["/home/ray/domainsynth/examples/data/medical_in_domain.jsonl"]
    assert recipe.synthesize.model == "smollm2"  # a name: each pod finds the model its image converted
    assert recipe.judge.model == "/home/ray/domainsynth/models/tiny-llama-4k"
    assert recipe.embed.model == "all-MiniLM-L6-v2" and "kubernetes" not in raw and "ray" not in raw
    # run_dir on a pod's own disk works only for one pod, and models/ is not in the build context: said on
    # stderr, not hidden.
    assert "run_dir: /home/ray/domainsynth/runs/quickstart is on each pod's own disk" in notes
    assert "judge.model: models/tiny-llama-4k is left out of the image by the project's .dockerignore" in notes
    assert "synthesize.model" not in notes


def test_a_cpu_recipe_gets_no_gpu_group_and_a_gpu_recipe_gets_one_sized_from_its_pools(capsys):
    objects, _ = render(capsys, QUICKSTART, "raycluster", "kubernetes.cpu_workers.max_replicas=6",
                        "kubernetes.cpu_workers.cpu=8", "kubernetes.cpu_workers.memory=32Gi")
    spec = objects[0]["spec"]
    assert list(groups(spec)) == ["cpu"]
    assert {c["image"] for g in (spec["headGroupSpec"], *spec["workerGroupSpecs"])
            for c in g["template"]["spec"]["containers"]} == {"domainsynth:0.1.0-cpu"}
    cpu = groups(spec)["cpu"]
    assert (cpu["minReplicas"], cpu["maxReplicas"]) == (0, 6)
    assert cpu["template"]["spec"]["containers"][0]["resources"]["limits"] == {"cpu": "8", "memory": "32Gi"}
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"

    # vLLM on 1 GPU per engine, 3 engines at most, 2 GPUs per pod: the GPU group may grow to 2 pods.
    objects, _ = render(capsys, QUICKSTART, "raycluster", "synthesize.engine=vllm", "synthesize.num_gpus=1",
                        "synthesize.concurrency=[1, 3]", "kubernetes.gpu_workers.gpus=2",
                        "kubernetes.gpu_workers.accelerator_type=H100",
                        "kubernetes.gpu_workers.node_selector={nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}")
    gpu = groups(objects[0]["spec"])["gpu"]
    pod = gpu["template"]["spec"]
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (0, 2)
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert pod["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == "2"
    assert gpu["resources"] == {"accelerator_type:H100": "1"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["containers"][0]["image"] == "domainsynth:0.1.0-gpu"  # a GPU group: the GPU build of the image
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_softprompt_training_workers_on_gpus_get_a_gpu_group_for_all_of_them(capsys):
    """Ray Train's workers start together: 4 workers of 1 GPU on pods of 2 GPUs need 2 pods at once."""
    objects, _ = render(capsys, QUICKSTART, "raycluster", "softprompt.references=data/medical_in_domain.jsonl",
                        "softprompt.model=smollm2", "softprompt.workers=4", "softprompt.gpus_per_worker=1",
                        "kubernetes.gpu_workers.gpus=2")
    assert groups(objects[0]["spec"])["gpu"]["maxReplicas"] == 2


def test_rayservice_runs_our_serve_app_with_the_recipes_autoscaling(capsys):
    objects, _ = render(capsys, GENERATOR, "rayservice", "serve.autoscaling.max_replicas=6",
                        "serve.num_gpus=1", "serve.engine=vllm")
    service = objects[0]
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    app = config["applications"][0]
    assert app["import_path"] == "domainsynth.pipelines.serve:app_builder"
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    deployment = app["deployments"][0]
    assert deployment["name"] == "generator"
    assert (deployment["autoscaling_config"]["min_replicas"], deployment["autoscaling_config"]["max_replicas"],
            deployment["autoscaling_config"]["target_ongoing_requests"]) == (1, 6, 2.0)
    assert deployment["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    args = ServeConfig.model_validate(app["args"])
    assert args.model == "/home/ray/domainsynth/models/tiny-llama" and args.engine == "vllm"
    # Six replicas of one GPU each, one GPU per pod: the GPU group may grow to six pods.
    cluster = service["spec"]["rayClusterConfig"]
    assert groups(cluster)["gpu"]["maxReplicas"] == 6
    # Every pod may build the app, so every pod gets the API key from the (optional) Secret.
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    assert all(p["template"]["spec"]["containers"][0]["env"] == [{"name": "DOMAINSYNTH_API_KEY", "valueFrom": {
        "secretKeyRef": {"name": "domainsynth-api-key", "key": "key", "optional": True}}}] for p in pods)


def test_paths_on_the_volume_stay_and_paths_outside_the_project_are_reported(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "run_dir": "/data/runs/r1",
        "select": {"in_domain": "/data/in/bio.jsonl", "corpus": ["s3://bucket/cc/*.jsonl.gz", "local.jsonl"]},
        "kubernetes": {"volume": {"claim_name": "shared-runs", "mount_path": "/data"}}}))
    objects, notes = render(capsys, str(recipe), "rayjob")
    pipeline = yaml.safe_load(objects[0]["data"]["recipe.yaml"])
    assert pipeline["run_dir"] == "/data/runs/r1" and pipeline["select"]["in_domain"] == ["/data/in/bio.jsonl"]
    assert pipeline["select"]["corpus"] == ["s3://bucket/cc/*.jsonl.gz", str(tmp_path / "local.jsonl")]
    assert f"select.corpus: {tmp_path / 'local.jsonl'} is outside the project" in notes
    assert "run_dir" not in notes
    pod = objects[1]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert {"name": "shared", "persistentVolumeClaim": {"claimName": "shared-runs"}} in pod["volumes"]
    assert {"name": "shared", "mountPath": "/data"} in pod["containers"][0]["volumeMounts"]


def test_bad_requests_fail_before_anything_is_printed(capsys, tmp_path):
    assert main(["k8s", "render", QUICKSTART, "--kind", "rayservice"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "the recipe has no serve section" in err
    assert main(["k8s", "render", QUICKSTART, "--kind", "raycluster", "--set", "kubernetes.name=Bad_Name"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "kubernetes.name" in err
    assert main(["k8s", "render", QUICKSTART, "--kind", "raycluster",
                 "--set", "kubernetes.cpu_workers.min_replicas=5", "--set", "kubernetes.cpu_workers.max_replicas=2"]) == 2
    assert "min_replicas (5) is above max_replicas (2)" in capsys.readouterr().err
    assert main(["k8s", "render", QUICKSTART, "--kind", "raycluster", "--set", "kubernetes.head.cpu=0"]) == 2
    assert "kubernetes.head.cpu: Value error, expected more than 0 CPUs" in capsys.readouterr().err


def test_a_manifest_that_fails_the_checks_is_never_printed(capsys, monkeypatch):
    """Should a change to the renderer ever produce something the operator would refuse, the command says so and
    prints nothing (the broken object is made here by hand: the renderer itself makes none)."""
    real_render = k8s_render.render

    def broken(*args, **kwargs):
        rendered = real_render(*args, **kwargs)
        rendered.objects[0]["spec"]["workerGroupSpecs"][0]["minReplicas"] = 9
        return rendered

    monkeypatch.setattr(k8s_render, "render", broken)
    assert main(["k8s", "render", QUICKSTART, "--kind", "raycluster"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "minReplicas" in err and "maxReplicas" in err


def test_k8s_validate_checks_files_and_kustomize_folders(capsys, tmp_path):
    assert main(["k8s", "validate", str(REPO / "k8s" / "overlays" / "dev"), str(REPO / "k8s" / "base" / "rayjob.yaml")]) == 0
    assert capsys.readouterr().out.count("valid") == 2
    assert main(["k8s", "render", QUICKSTART, "--kind", "raycluster"]) == 0
    broken = yaml.safe_load(capsys.readouterr().out)
    broken["spec"]["workerGroupSpecs"][0]["rayStartParam"] = {}  # a typo of rayStartParams
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    assert main(["k8s", "validate", str(tmp_path / "broken.yaml")]) == 1
    assert "spec.workerGroupSpecs[0].rayStartParam: unknown field" in capsys.readouterr().out
