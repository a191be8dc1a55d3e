"""Where domainsynth keeps the models it makes for the user (the demo's tiny Llama; later, converted models):
``$DOMAINSYNTH_CACHE`` or, unset, ``$XDG_CACHE_HOME/domainsynth`` (``~/.cache/domainsynth``). Never the directory the
user stands in: a demo run from a project folder must not leave ``models/`` there."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable

CACHE_ENV = "DOMAINSYNTH_CACHE"


def cache_dir() -> str:
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return os.path.abspath(os.path.expanduser(configured))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "domainsynth")


def cached_model(name: str, make: Callable[[str], object]) -> tuple[str, bool]:
    """The folder of model ``name`` under the cache's ``models/``, made by ``make(folder)`` the first time; and
    whether it was made now."""
    return model_folder(os.path.join(cache_dir(), "models", name), make)


def model_folder(folder: str, make: Callable[[str], object]) -> tuple[str, bool]:
    """``folder``, made by ``make(folder)`` unless it holds a model already; and whether it was made now. It is made
    in a hidden sibling folder and moved into place, so an interrupted make leaves no half-written model that a
    later run would take for a finished one."""
    folder = os.path.abspath(folder)
    name = os.path.basename(folder)
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder, False
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{name}-", dir=os.path.dirname(folder))
    try:
        make(scratch)
        if os.path.isdir(folder):  # a half-made folder from before this rule, or one another process just made
            if os.path.isfile(os.path.join(folder, "config.json")):
                return folder, False
            shutil.rmtree(folder)
        os.replace(scratch, folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder, True
