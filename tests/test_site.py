"""The run's report site (pipelines/site/) on a run of real stages — select, qc and evaluate (tiny Llama) run on a
real local Ray on tiny inputs — beside pretrain and finetune folders written as those stages write them (their
metrics.jsonl, report.json, report.md; training on Ray Train would take minutes here): index.html parses, links
every stage that ran and none that did not, every relative link and image resolves, the data map has the groups the
run has, the training curves run over pretraining's stages with the boundary marked; a stage whose report.json is
corrupt shows "not readable" and the rest of the page is still written; a figure a stage did not write is drawn from
its data; a run directory on S3 gets its page there. (The page in a real browser: benchmarks/check_site.py.)"""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from domainsynth.pipelines import site
from domainsynth.pipelines.recipe import build_recipe
from domainsynth.pipelines.runner import run_recipe

from conftest import DATA, write_jsonl

TASKS = Path(site.__file__).parents[1] / "evaluation" / "tasks"
RAN = ["select", "qc", "pretrain", "finetune", "evaluate"]
ALL_GROUPS = {"general corpus", "in-domain examples", "selected documents", "synthetic samples",
              "downstream-task items"}


class Page(HTMLParser):
    """The links, images and element ids of an HTML page."""

    def __init__(self, path: Path):
        super().__init__()
        self.path, self.hrefs, self.images, self.ids = path, [], [], set()
        self.feed(path.read_text(encoding="utf-8"))
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "a" and a.get("href"):
            self.hrefs.append(a["href"])
        if tag == "img":
            self.images.append(a.get("src") or "")

    def unresolved(self) -> list[str]:
        """Relative links and images that name no file (or, for #anchors, no element of this page)."""
        bad = []
        for url in self.hrefs + self.images:
            if "://" in url or url.startswith(("mailto:", "data:")):
                continue
            target, _, anchor = url.partition("#")
            if not target:
                if anchor not in self.ids:
                    bad.append(url)
            elif not (self.path.parent / target).is_file():
                bad.append(url)
        return bad


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, medical_abstracts, general_pool) -> dict:
    root = tmp_path_factory.mktemp("site-inputs")
    write_jsonl(root / "in_domain.jsonl", [{"id": r["id"], "text": r["text"]} for r in medical_abstracts[:80]])
    corpus = [{"id": r["id"], "text": r["text"]} for r in medical_abstracts[80:140]] + \
             [{"id": r["id"], "text": r["text"]} for r in general_pool[:340]]
    for shard in range(2):
        write_jsonl(root / "corpus" / f"part-{shard}.jsonl.gz", corpus[shard::2])
    # Synthetic samples as CRAFT writes them (instruction, output, text), some of them twice (qc drops those).
    shots = [json.loads(line) for line in open(DATA / "craft_bioqa_fewshot.jsonl")]
    samples = [{"id": f"s{i}", "instruction": s["Instruction"], "output": s["Output"],
                "text": f"{s['Instruction']}\n{s['Output']}"} for i, s in enumerate(shots)]
    write_jsonl(root / "samples.jsonl", samples + [{**s, "id": s["id"] + "-again"} for s in samples[:4]])
    return {"in_domain": str(root / "in_domain.jsonl"), "corpus": str(root / "corpus"),
            "samples": str(root / "samples.jsonl")}


def history(steps: int, start: float, eval_splits: tuple[str, ...]) -> list[dict]:
    """metrics.jsonl's entries as the Hugging Face trainer of actors/hf_training.py logs them: a training entry per
    step, an evaluation entry per held-out set before the first step and every 2 steps, the closing summary."""
    rows = []
    for step in range(steps + 1):
        if step:
            rows.append({"loss": start - 0.15 * step, "grad_norm": 1.9, "learning_rate": 3e-3, "epoch": step / 600,
                         "num_input_tokens_seen": 256 * step, "step": step})
        if step % 2 == 0:
            rows += [{f"eval_{split}_loss": start + 0.1 - 0.1 * step, f"eval_{split}_runtime": 0.03,
                      "epoch": step / 600, "step": step} for split in eval_splits]
    return rows + [{"train_runtime": 1.0, "train_loss": start - 0.3, "epoch": steps / 600, "step": steps},
                   {"step": steps, "train_wall_seconds": 1.01}]


def write_jsonl_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_training_stages(run_dir: Path) -> None:
    """pretrain (stages knowledge and tasks, 6 steps each) and finetune, as their stages write them: metrics.jsonl,
    report.json (through the report contract), report.md; pretrain's loss.png drawn by its own helper, finetune's
    left out (the page draws it)."""
    from domainsynth.pipelines.report import write_report
    from domainsynth.pipelines.rundir import StageDir
    from domainsynth.pipelines.training.hf_run import curve_png, train_entries

    loss, offset = [], 0
    for name, start in (("knowledge", 7.6), ("tasks", 7.0)):
        rows = history(6, start, ("domain", "general"))
        write_jsonl_rows(run_dir / "pretrain" / name / "metrics.jsonl", rows)
        loss += [(offset + h["step"], h["loss"]) for h in train_entries(rows)]
        offset += 6
    pretrain = StageDir(str(run_dir / "pretrain"))
    pretrain.write_bytes("loss.png", curve_png([("training loss", loss)], "pretrain: training loss", "nats / token",
                                               [(6.5, "tasks starts")]))
    write_report(pretrain, {"stage": "pretrain", "rows_in": 610, "rows_out": 610, "seconds": 51.2,
                            "phases": {"pack": 20.1, "train knowledge": 15.3, "train tasks": 15.8},
                            "steps": {"knowledge": 6, "tasks": 6}, "final_loss": {"knowledge": 6.7, "tasks": 6.1},
                            "block_size": 64, "strategy": "ddp"},
                 "# pretrain — continual pretraining\n\n![loss](loss.png)\n")
    finetune = StageDir(str(run_dir / "finetune"))
    write_jsonl_rows(run_dir / "finetune" / "metrics.jsonl", history(6, 3.0, ("validation",)))
    write_report(finetune, {"stage": "finetune", "rows_in": 36, "rows_out": 36, "seconds": 20.5, "steps": 6,
                            "final_loss": 2.1, "validation_loss": 2.3},
                 "# finetune — LoRA SFT\n\n![loss](loss.png)\n")


@pytest.fixture(scope="module")
def site_run(ray_local, tiny_llama, inputs, tmp_path_factory):
    """A real run (select -> qc -> evaluate) with pretrain and finetune folders beside, then its site with the
    recipe."""
    run_dir = tmp_path_factory.mktemp("site-run") / "run"
    recipe = build_recipe({
        "run_dir": str(run_dir),
        "select": {"in_domain": inputs["in_domain"], "corpus": inputs["corpus"], "keep_fraction": 0.25,
                   "negatives_sample": 300, "quality": {"scorer": "none"}},
        "qc": {"input": inputs["samples"], "diversity": {"sample": 0},
               "decontaminate": {"eval_files": str(TASKS / "mmlu_college_biology.test.jsonl")}},
        "evaluate": {"models": [{"model": tiny_llama, "name": "base"}], "tasks": ["mmlu_college_biology"],
                     "limit": 4, "cpus_per_model": 1},
    }, "test", "/")
    run_recipe(recipe, echo=lambda _: None)
    write_training_stages(run_dir)
    original = site.MAP_POINTS
    site.MAP_POINTS = 40  # a few points per group: the map's cost is the embedding model's start
    try:
        index = site.write_site(str(run_dir), recipe)
    finally:
        site.MAP_POINTS = original
    return run_dir, Path(index)


def stage_links(page: Page, stage: str) -> list[str]:
    return [u for u in page.hrefs + page.images
            if u.startswith((f"{stage}/", f"site/reports/{stage}.html", f"#stage-{stage}"))]


def test_index_links_every_stage_that_ran_and_resolves(site_run):
    run_dir, index = site_run
    assert index == run_dir / "index.html"
    page = Page(index)
    assert page.unresolved() == []
    for stage in site.stage_names():
        links = stage_links(page, stage)
        if stage in RAN:
            assert f"{stage}/report.md" in links and f"site/reports/{stage}.html" in links, stage
            assert f"#stage-{stage}" in links and f"stage-{stage}" in page.ids, stage
        else:
            assert links == [] and f"stage-{stage}" not in page.ids, stage
    text = index.read_text()
    assert "not readable" not in text
    # The stages' own figures, each report rendered with its images found from its new place.
    for figure in ("select/domain_scores.png", "pretrain/loss.png", "site/finetune_loss.png", "evaluate/results.png",
                   "site/embedding_map.png", "site/training_curves.png"):
        assert figure in page.images, figure
    for stage in RAN:
        report = Page(run_dir / "site" / "reports" / f"{stage}.html")
        assert report.unresolved() == [], stage
    assert "../../pretrain/loss.png" in Page(run_dir / "site" / "reports" / "pretrain.html").images
    # The summary table: a row per stage with its counts; the evaluation table from results.json.
    assert "select: kept" in text and "qc: kept" in text
    assert "mmlu_college_biology" in text and "acc,none" in text


def test_data_map_has_the_run_s_groups(site_run):
    run_dir, _ = site_run
    info = json.loads((run_dir / "site" / "embedding_map.json").read_text())
    assert set(info["groups"]) == ALL_GROUPS, info
    assert info["groups"]["synthetic samples"]["source"] == "qc/data"
    assert info["groups"]["downstream-task items"]["source"].startswith("evaluate's tasks")
    assert info["groups"]["general corpus"]["source"] == "select.corpus"
    assert all(0 < g["points"] <= 40 for g in info["groups"].values())
    assert info["method"] == "t-SNE" and info["model"] == "all-MiniLM-L6-v2"
    sources = json.loads((run_dir / "site" / "sources.json").read_text())
    assert [e["what"] for e in sources["general"]] == ["select.corpus"]


def test_training_curves_mark_the_stage_boundary(site_run):
    run_dir, _ = site_run
    series, bounds, notes = site.pretrain_curves(site.Run(str(run_dir)))
    assert notes == [] and bounds == [(6, "knowledge → tasks")]
    assert [p[0] for p in series["training loss"]] == list(range(1, 13))  # both stages, end to end
    assert [p[0] for p in series["held-out domain loss"]] == [0, 2, 4, 6, 6, 8, 10, 12]
    assert series["held-out general loss"] and "validation loss" not in series


def test_a_corrupt_file_is_noted_and_the_rest_renders(site_run, tmp_path):
    run_dir, _ = site_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("ray", "packed", "model", "models"))
    (copy / "index.html").unlink()
    (copy / "select" / "report.json").write_text('{"stage": "select", "rows_in": ')
    (copy / "pretrain" / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (copy / "finetune" / "metrics.jsonl").write_text("{not json\n")
    (copy / "evaluate" / "results.json").write_text("[]")
    with open(copy / "qc" / "report.md", "a", encoding="utf-8") as f:  # text a report quotes is shown, not run
        f.write("\nA sample said: <script>alert(1)</script>\n")
    # A judge that left its ratings in report.json but no ratings.png: the chart is drawn from them.
    judge = copy / "judge"
    judge.mkdir()
    (judge / "report.json").write_text(json.dumps({
        "stage": "judge", "rows_in": 10, "rows_out": 7, "rows_filtered": {"below_threshold": 3, "unrated": 0},
        "rows_quarantined": 0, "seconds": 1.5, "acceptance_rate": 0.7, "threshold": "average",
        "ratings": {"very poor": 1, "poor": 2, "average": 3, "good": 3, "excellent": 1, "unrated": 0}}))
    original = site.MAP_POINTS
    site.MAP_POINTS = 20
    try:
        index = Path(site.write_site(str(copy)))  # no recipe: the inputs remembered in site/sources.json
    finally:
        site.MAP_POINTS = original
    page = Page(index)
    text = index.read_text()
    assert page.unresolved() == []
    assert "not readable: select/report.json: not valid JSON" in text
    assert "not readable: pretrain/loss.png: a broken PNG" in text and "pretrain/loss.png" not in page.images
    assert "not readable: finetune/metrics.jsonl: line 1 is not valid JSON" in text
    assert "not readable: evaluate/results.json" in text
    assert "select/domain_scores.png" in page.images  # the section's figures stay
    assert "site/judge_ratings.png" in page.images and (copy / "site" / "judge_ratings.png").is_file()
    assert "qc: kept" in text and "site/training_curves.png" in page.images  # pretrain's curves still drawn
    qc = (copy / "site" / "reports" / "qc.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in qc and "<script>" not in qc
    assert set(json.loads((copy / "site" / "embedding_map.json").read_text())["groups"]) == ALL_GROUPS


def test_an_empty_run_directory(tmp_path):
    index = Path(site.write_site(str(tmp_path)))
    page = Page(index)
    assert page.unresolved() == [] and page.images == []
    assert "holds no stage yet" in index.read_text()


def test_a_run_on_s3_gets_its_site_there(site_run, monkeypatch, tmp_path):
    """The same page for a run directory on an object store (moto's S3 server, local): read and written there."""
    import boto3
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    from conftest import free_port

    port = free_port()
    for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
        client.create_bucket(Bucket="site")
        run_dir, _ = site_run
        for stage in ("select", "qc"):
            for path in (run_dir / stage).rglob("*"):
                if path.is_file() and path.suffix in (".json", ".md", ".png", ".parquet"):
                    client.upload_file(str(path), "site", f"run/{path.relative_to(run_dir)}")
        original = site.MAP_POINTS
        site.MAP_POINTS = 20
        try:
            index = site.write_site("s3://site/run")
        finally:
            site.MAP_POINTS = original
        assert index == "s3://site/run/index.html"
        local = tmp_path / "run"
        pafs.copy_files("s3://site/run", str(local))  # the bucket's run, as someone syncs it to look at it
        page = Page(local / "index.html")
        assert page.unresolved() == []
        assert {"select/report.md", "qc/report.md", "site/reports/select.html"} <= set(page.hrefs)
        assert "site/embedding_map.png" in page.images and "not readable" not in (local / "index.html").read_text()
        groups = json.loads((local / "site" / "embedding_map.json").read_text())["groups"]
        assert set(groups) == {"selected documents", "synthetic samples"}  # no recipe, no sources.json there
    finally:
        server.stop()
