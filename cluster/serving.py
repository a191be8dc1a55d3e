"""``domainsynth serve``: start the generator endpoint on Ray Serve, print where it is, run until Ctrl-C (or
SIGTERM), then take it down: the application always, Serve and Ray too when this process started them."""

from __future__ import annotations

import signal
import time
from typing import Callable

from ..pipelines.recipe import Recipe
from ..pipelines.serve import build_application, served_model_name
from . import ray_runtime


class _Stop(Exception):
    pass


def _raise_stop(signum, frame) -> None:
    raise _Stop()


def serve_until_stopped(recipe: Recipe, echo: Callable[[str], None] = print,
                        until: Callable[[], bool] = lambda: False) -> None:
    """Run the recipe's ``serve`` section; returns after Ctrl-C, SIGTERM or ``until()`` turning true."""
    from ray import serve

    cfg = recipe.serve
    app = build_application(cfg)  # a backend that cannot be built fails here, before Ray starts
    started_ray = ray_runtime.connect(recipe.ray)
    # Serve started here is stopped here, even on a Ray that was already up (``domainsynth adapt`` serves on the Ray
    # its stages ran on): a Serve left running keeps its HTTP proxy on this port, and the next serve.start() on that
    # Ray would connect to it and ignore its own host and port.
    started_serve = not _serve_running()
    # Ctrl-C and a pod's SIGTERM both stop it. SIGINT is set here too: a process started in the background by a
    # non-interactive shell inherits SIGINT ignored, and Python then installs no KeyboardInterrupt for it.
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        started = time.perf_counter()
        serve.run(app, name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
        host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
        url = f"http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
        names = [served_model_name(cfg), *cfg.soft_prompts, *cfg.adapters]
        scale = cfg.autoscaling
        echo(f"Serving {', '.join(names)} ({cfg.engine}, {cfg.backend}) in {time.perf_counter() - started:.1f}s, "
             f"{scale.min_replicas}-{scale.max_replicas} replicas")
        echo(f"  OpenAI API: {url}/v1   (POST /v1/completions, /v1/chat/completions; GET /v1/models)")
        echo(f"  health:     {url}/health")
        if cfg.api_docs:
            echo(f"  API docs:   {url}/docs")
        if cfg.backend == "domainsynth":  # ray-serve-llm applies vLLM's own checks
            limits = cfg.limits
            echo(f"  limits:     {limits.max_prompts} prompts x n {limits.max_n}, max_tokens {limits.max_tokens}, "
                 f"{limits.max_total_tokens} tokens of work, {limits.max_body_bytes} body bytes per request "
                 f"(serve.limits)")
        echo("Ctrl-C stops it.")
        while not until():
            time.sleep(0.5)
    except (KeyboardInterrupt, _Stop):
        echo("Stopping...")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            serve.delete(cfg.app_name)
            if started_ray or started_serve:
                serve.shutdown()
        finally:
            if started_ray:
                ray_runtime.shutdown()
    echo("Stopped.")


def _serve_running() -> bool:
    """Whether Serve's controller is up on the connected Ray (started by someone else, to be left running)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return True
    except ValueError:
        return False
