"""A run on an object store: the corpus is read from, and the run directory written to, s3:// URIs served by a local
S3-compatible server (moto's server mode, started by this module in this process; no network), on the shared real
local Ray. Rerunning the recipe skips the finished stages, as on a local disk.

Ray's workers are separate processes that find the endpoint and credentials as the driver does, from AWS_* variables
(read by pyarrow's S3 filesystem). The workers inherit the environment of the Ray started by the shared session
fixture, so the variables are set when this module is imported (at collection, before any fixture starts Ray) for a
port chosen then; the server starts on that port when the test runs.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest

from domainsynth.pipelines.recipe import build_recipe
from domainsynth.pipelines.runner import run_recipe

from conftest import BIOMEDICAL_POOL_SUBSETS, free_port

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
BUCKET = "domainsynth-test"
S3_PORT = free_port()
S3_ENV = {
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata look-ups for credentials
}
os.environ.update(S3_ENV)


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def bucket(s3_server):
    """A bucket holding the quickstart's inputs: 300 in-domain abstracts and two of its three corpus shards."""
    import boto3

    client = boto3.client("s3", endpoint_url=S3_ENV["AWS_ENDPOINT_URL"], region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    client.upload_file(str(EXAMPLES / "medical_in_domain.jsonl"), BUCKET, "inputs/medical_in_domain.jsonl")
    for name in ("web-000.jsonl.gz", "web-001.jsonl.gz"):
        client.upload_file(str(EXAMPLES / "corpus" / name), BUCKET, f"inputs/corpus/{name}")
    return client


def keys(client, prefix: str) -> dict[str, tuple]:
    """Every object under ``prefix``, with its ETag and when it was written (a stage redone rewrites its objects)."""
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        found.update({o["Key"]: (o["ETag"], o["LastModified"]) for o in page.get("Contents", [])})
    return found


def of_stage(objects: dict, stage: str) -> dict:
    return {k: v for k, v in objects.items() if k.startswith(f"runs/quickstart/{stage}/")}


def read_json(client, key: str):
    return json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())


def test_a_run_reads_from_and_writes_to_s3_and_resumes_there(ray_local, bucket, tmp_path):
    # The corpus rows, read here from the local copies of what was uploaded: the run must read them from the bucket.
    corpus_rows = []
    for name in ("web-000.jsonl.gz", "web-001.jsonl.gz"):
        with gzip.open(EXAMPLES / "corpus" / name, "rt", encoding="utf-8") as f:
            corpus_rows += [json.loads(line) for line in f if line.strip()]
    by_id = {r["id"]: r for r in corpus_rows}
    run_dir = f"s3://{BUCKET}/runs/quickstart"
    raw = {"run_dir": run_dir,
           "select": {"in_domain": f"s3://{BUCKET}/inputs/medical_in_domain.jsonl",
                      "corpus": f"s3://{BUCKET}/inputs/corpus/", "keep_fraction": 0.05,
                      "negatives_sample": 1000, "quality": {"scorer": "none"}},
           "embed": {"batch_size": 32, "max_seq_length": 64},  # embed.corpus unset: select's output, on S3
           "index": {"kind": "flat"}}
    assert not keys(bucket, "runs/")
    reports = run_recipe(build_recipe(raw, "test", str(tmp_path)), echo=lambda _: None)
    assert list(reports) == ["select", "embed", "index"]

    select, embed, index = reports["select"], reports["embed"], reports["index"]
    assert select["rows_in"] == len(corpus_rows) == 2000 and select["rows_quarantined"] == 0
    assert select["rows_out"] == 100  # 5% of 2,000
    assert embed["rows_in"] == embed["rows_out"] == select["rows_out"]
    assert index["rows_out"] == select["rows_out"]

    # Everything a stage writes is in the bucket, nothing on the local disk; the marker is there, written last.
    objects = keys(bucket, "runs/quickstart/")
    markers = {}
    for stage in ("select", "embed", "index"):
        prefix = f"runs/quickstart/{stage}/"
        assert f"{prefix}report.json" in objects and f"{prefix}_COMPLETE.json" in objects, stage
        assert read_json(bucket, f"{prefix}report.json")["stage"] == stage
        markers[stage] = read_json(bucket, f"{prefix}_COMPLETE.json")["fingerprint"]
        written = of_stage(objects, stage)
        assert max(when for _, when in written.values()) == written[f"{prefix}_COMPLETE.json"][1], stage
    assert any(k.startswith("runs/quickstart/select/data/") and k.endswith(".parquet") for k in objects)
    assert any(k.startswith("runs/quickstart/embed/data/") and k.endswith(".parquet") for k in objects)
    assert "runs/quickstart/select/classifier.bin" in objects
    assert not any("_quarantine" in k for k in objects)  # the embed read tasks' parts were merged and removed
    assert not any(tmp_path.iterdir())  # the recipe's folder (relative paths resolve there) holds nothing

    # The rows written to the bucket are corpus rows, with every input field and the stage's scores.
    fs, path = pafs.FileSystem.from_uri(f"{run_dir}/select/data")
    rows = pads.dataset(path, filesystem=fs, format="parquet").to_table().to_pylist()
    assert len(rows) == select["rows_out"] and len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert {k: r[k] for k in by_id[r["id"]]} == by_id[r["id"]]
        assert 0.0 <= r["domain_score"] <= 1.0 and r["_source_file"].startswith("web-00")
    # Most of what a 5% cut keeps from the quickstart corpus is biomedical: its hidden abstracts ("medabs-") and
    # The Pile's PubMed documents.
    biomedical = sum(r["id"].startswith("medabs-") or r.get("subsource") in BIOMEDICAL_POOL_SUBSETS for r in rows)
    print(f"biomedical kept: {biomedical} of {len(rows)}")
    assert biomedical >= 80
    fs, path = pafs.FileSystem.from_uri(f"{run_dir}/embed/data")
    vectors = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    assert sorted(vectors.column("id").to_pylist()) == sorted(r["id"] for r in rows)

    # Rerun: every stage is found complete in the bucket and skipped (its report read back from there); no object
    # in the bucket is rewritten.
    again = run_recipe(build_recipe(raw, "test", str(tmp_path)), echo=lambda _: None)
    assert again == reports  # the same timings too: nothing ran again
    assert keys(bucket, "runs/quickstart/") == objects

    # A changed index setting redoes the index alone, in the bucket; select and embed stay as they are.
    raw["index"]["kind"] = "hnsw"
    redone = run_recipe(build_recipe(raw, "test", str(tmp_path)), echo=lambda _: None)
    assert {k: redone[k] for k in ("select", "embed")} == {k: reports[k] for k in ("select", "embed")}
    after = keys(bucket, "runs/quickstart/")
    for stage in ("select", "embed"):
        assert of_stage(after, stage) == of_stage(objects, stage), stage
        assert read_json(bucket, f"runs/quickstart/{stage}/_COMPLETE.json")["fingerprint"] == markers[stage]
    marker = "runs/quickstart/index/_COMPLETE.json"
    assert after[marker][1] > objects[marker][1]  # written again, later
    assert read_json(bucket, marker)["fingerprint"] != markers["index"]
    assert redone["index"] != reports["index"] and redone["index"]["rows_out"] == select["rows_out"]
    print({k: v["seconds"] for k, v in reports.items()})


def test_a_uri_keeps_its_query_when_stage_folders_are_made_from_it():
    """A run_dir URI may carry the filesystem's options (pyarrow reads them from the query string): every folder
    made from it keeps the query at the end, where pyarrow looks for it."""
    from domainsynth.pipelines import paths
    from domainsynth.pipelines.rundir import StageDir

    run = "s3://bucket/run?endpoint_override=127.0.0.1:9000&scheme=http"
    select = StageDir(paths.join(run, "select"))
    assert select.uri == "s3://bucket/run/select?endpoint_override=127.0.0.1:9000&scheme=http"
    assert select.child("data") == "s3://bucket/run/select/data?endpoint_override=127.0.0.1:9000&scheme=http"
    assert select.sibling("index", "meta.json") == \
        "s3://bucket/run/index/meta.json?endpoint_override=127.0.0.1:9000&scheme=http"
    assert select.fs_path[1] == "bucket/run/select"


def test_softprompt_on_s3_restarts_a_killed_worker_from_its_latest_whole_checkpoint_there(ray_local, bucket,
                                                                                           tiny_llama):
    """DOMINO's soft-prompt learning with its references and run directory in the bucket, 2 Ray Train workers: rank
    0 is SIGKILLed after its first checkpoint (its pid from the progress file, read from the bucket); the workers
    resume from the latest whole checkpoint they find there and the run ends at exactly its planned steps, each
    once, with the PEFT folder in the bucket. The look-up itself passes over a checkpoint that lacks a rank's
    files."""
    from safetensors.numpy import load as load_safetensors

    from domainsynth.actors.softprompt_training import latest_checkpoint

    from conftest import DATA, read_jsonl_gz, run_killing_rank0

    lines = [json.dumps({"id": r["id"], "text": r["text"][:300]})
             for r in read_jsonl_gz(DATA / "medical_abstracts.jsonl.gz")[:12]]
    bucket.put_object(Bucket=BUCKET, Key="inputs/references.jsonl", Body="\n".join(lines).encode())
    run_dir = f"s3://{BUCKET}/runs/softprompt"
    section = {"references": f"s3://{BUCKET}/inputs/references.jsonl", "model": tiny_llama, "num_tokens": 8,
               "private_tokens": 4, "max_steps": 60, "batch_size": 3, "max_length": 48, "workers": 2,
               "strategy": "ddp", "checkpoint_every": 10, "log_every": 5, "lr": 0.02}
    recipe = build_recipe({"run_dir": run_dir, "softprompt": section}, "test", "/")

    def read_progress() -> dict:
        try:
            return read_json(bucket, "runs/softprompt/softprompt/progress.json")
        except bucket.exceptions.NoSuchKey:
            return {}

    outcome, said = run_killing_rank0(recipe, read_progress, at_step=15)
    assert outcome["softprompt"]["steps"] == 60
    resumed = [line for line in said if "resumed from step" in line]
    assert resumed and int(resumed[0].split("resumed from step ")[1].split()[0]) >= 10, said[-5:]
    body = bucket.get_object(Bucket=BUCKET, Key="runs/softprompt/softprompt/metrics.jsonl")["Body"].read()
    assert [json.loads(line)["step"] for line in body.decode().splitlines()] == list(range(1, 61))
    objects = keys(bucket, "runs/softprompt/softprompt/")
    assert {"runs/softprompt/softprompt/soft_prompt/adapter_config.json",
            "runs/softprompt/softprompt/soft_prompt/adapter_model.safetensors",
            "runs/softprompt/softprompt/private_prompts.safetensors"} <= set(objects)
    weights = bucket.get_object(Bucket=BUCKET, Key="runs/softprompt/softprompt/soft_prompt/adapter_model.safetensors")
    assert load_safetensors(weights["Body"].read())["prompt_embeddings"].shape[0] == 8

    # The checkpoints kept in the bucket (the last two): the latest whole one is step 60's, and once a rank's marker
    # is gone from it, step 50's.
    run_folder = f"{run_dir}/softprompt/ray/{outcome['softprompt']['outputs']['checkpoints'].rsplit('/', 1)[-1]}"
    latest = latest_checkpoint(run_folder)
    with latest.as_directory() as folder:
        assert json.loads(open(os.path.join(folder, "checkpoint.json")).read())["step"] == 60
    marker = latest.path.split("/", 1)[1] + "/rank1.done"
    bucket.delete_object(Bucket=BUCKET, Key=marker)
    with latest_checkpoint(run_folder).as_directory() as folder:
        assert json.loads(open(os.path.join(folder, "checkpoint.json")).read())["step"] == 50
