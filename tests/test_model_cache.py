"""The model cache: a model (here the tiny Llama tests use) is made once under $DOMAINSYNTH_CACHE, never in the
directory the user stands in, and an interrupted make leaves nothing a later run would take for a finished model."""

from __future__ import annotations

import os

import pytest

from domainsynth.actors.tiny_models import make_tiny_llama
from domainsynth.actors.model_cache import CACHE_ENV, cache_dir, cached_model


def test_a_model_is_made_once_in_the_cache_not_in_the_current_directory(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    makes = []

    def make(out: str) -> None:
        makes.append(out)
        make_tiny_llama(out, max_positions=4096)

    folder, made = cached_model("tiny-llama-4k", make)
    assert made and folder == str(tmp_path / "cache" / "models" / "tiny-llama-4k")
    assert os.path.isfile(os.path.join(folder, "config.json")) and os.listdir(project) == []
    made_at = os.path.getmtime(os.path.join(folder, "config.json"))
    assert cached_model("tiny-llama-4k", make) == (folder, False) and len(makes) == 1  # found, not made again
    assert os.path.getmtime(os.path.join(folder, "config.json")) == made_at
    assert sorted(os.listdir(tmp_path / "cache" / "models")) == ["tiny-llama-4k"]  # no scratch folder left


def test_an_interrupted_make_leaves_no_model_behind(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))

    def half_then_fail(out: str) -> None:
        open(os.path.join(out, "config.json"), "w").write("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_model("m", half_then_fail)
    assert os.listdir(tmp_path / "cache" / "models") == []
    folder, made = cached_model("m", lambda out: open(os.path.join(out, "config.json"), "w").write("{}"))
    assert made and os.path.isfile(os.path.join(folder, "config.json"))


def test_without_the_variable_the_cache_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == str(tmp_path / "domainsynth")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "domainsynth")
