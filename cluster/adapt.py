"""``domainsynth adapt``: the whole loop as one command — a few examples and a corpus become an adapted model that is
evaluated, reported (``RUN_DIR/index.html``) and served. The stages are the recipe's; this module only adds the two
things a loop has that a stage has not: the report page at the end and the endpoint on the model the run made."""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.error
import urllib.request

from ..pipelines.recipe import Recipe, load_recipe
from .console import Console

EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
BUNDLED_RECIPE = os.path.join(EXAMPLES_DIR, "adapt.yaml")
# The question the endpoint is asked once it is up: in the bundled recipe's domain (CRAFT's BioQA few-shots).
CHECK_QUESTION = "Which organelle produces most of a eukaryotic cell's ATP? Answer in one sentence."


def adapt_recipe(args: argparse.Namespace, say) -> Recipe:
    """The recipe ``adapt`` runs: the given one or the bundled examples/adapt.yaml (whose SmolLM2 is converted
    first, saying so, as the demo does), with --out and --set applied."""
    overrides = ([f"run_dir={args.out}"] if args.out else []) + list(args.overrides)
    if args.recipe is None:
        from .cli import demo_model

        demo_model(say)
        return load_recipe(BUNDLED_RECIPE, overrides)
    return load_recipe(args.recipe, overrides)


def write_report_page(recipe: Recipe, console: Console) -> str | None:
    """RUN_DIR/index.html after a whole recipe ran; its path. A page that cannot be written is reported, never fails
    the run (the stages' own reports are already there)."""
    from ..pipelines.site import write_site

    console.echo("[report] writing the report page (data map, curves, evaluation, every stage's report) ...")
    try:
        return write_site(recipe.run_dir, recipe)
    except Exception as e:  # noqa: BLE001 - the run's results stand without the page
        console.error(f"domainsynth: the report page was not written: {type(e).__name__}: {e}")
        return None


def serve_adapted(recipe: Recipe, console: Console, keep_serving: bool) -> dict | None:
    """Start the recipe's endpoint (serve.model unset = the last model the run made), ask it CHECK_QUESTION through
    the OpenAI chat route and print the answer; then stop, or keep serving until Ctrl-C. Returns the check's
    response (None when the recipe has no serve section)."""
    from .serving import serve_until_stopped

    if recipe.serve is None:
        console.say("No serve section in the recipe: no endpoint started.")
        return None
    checked: dict = {}

    def check_then_maybe_stop() -> bool:
        if not checked:
            checked.update(ask(recipe))
            answer = checked.get("answer")
            console.result(f"Endpoint check: {recipe.serve.model} answered in {checked['seconds']:.1f}s: "
                           + (repr(answer[:300]) if answer is not None else f"failed: {checked.get('error')}"))
        return not keep_serving

    serve_until_stopped(recipe, echo=console.say, until=check_then_maybe_stop)
    return checked


def ask(recipe: Recipe, question: str = CHECK_QUESTION) -> dict:
    """One chat completion from the running endpoint: {answer, seconds} or {error, seconds}."""
    cfg = recipe.serve
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    url = f"http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}/v1/chat/completions"
    from ..pipelines.serve import served_model_name

    body = json.dumps({"model": served_model_name(cfg), "max_tokens": cfg.default_max_tokens, "temperature": 0,
                       "messages": [{"role": "user", "content": question}]}).encode()
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(cfg.api_key_env or "", "")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=300) as response:
            answer = json.load(response)["choices"][0]["message"]["content"]
        return {"answer": answer, "seconds": time.perf_counter() - started}
    except (urllib.error.URLError, OSError, KeyError, ValueError) as e:
        return {"error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - started}
