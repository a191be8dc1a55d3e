"""Bad recipes and CLI arguments fail before any work starts, naming the file, the field and what was expected."""

from __future__ import annotations

import pytest

from domainsynth.cluster.cli import main
from domainsynth.pipelines.recipe import RecipeError, load_recipe

GOOD = """
run_dir: runs/x
select:
  in_domain: in.jsonl
  corpus: [corpus/, "more/*.jsonl.gz"]
  keep_fraction: 0.1
"""


def _recipe(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_valid_recipe_resolves_inputs_against_its_folder_and_fills_defaults(tmp_path):
    recipe = load_recipe(str(_recipe(tmp_path, GOOD)))
    assert recipe.select.in_domain == [str(tmp_path / "in.jsonl")]
    assert recipe.select.corpus == [str(tmp_path / "corpus"), str(tmp_path / "more/*.jsonl.gz")]
    assert recipe.run_dir == "runs/x"
    assert recipe.select.quality.scorer == "heuristic" and recipe.select.fasttext.word_ngrams == 2


@pytest.mark.parametrize("edit, field, expected", [
    ("  keep_fraction: 1.5", "select.keep_fraction", "less than or equal to 1"),
    ("  keep_fraction: lots", "select.keep_fraction", "valid number"),
    ("  keep_fraction: 0.1\n  threshold: 0.5", "select", "keep_fraction or threshold, not both"),
    ("  keep_fraction: 0.1\n  quality: {scorer: magic}", "select.quality.scorer", "'heuristic', 'none' or 'hf:MODEL'"),
    ("  keep_fraction: 0.1\n  keep_fracton: 0.2", "select.keep_fracton", "unknown field"),
    ("  keep_fraction: 0.1\n  fasttext: {epoch: 0}", "select.fasttext.epoch", "greater than 0"),
])
def test_invalid_field_is_named_with_what_was_expected(tmp_path, edit, field, expected):
    text = GOOD.replace("  keep_fraction: 0.1", edit)
    with pytest.raises(RecipeError) as err:
        load_recipe(str(_recipe(tmp_path, text)))
    message = str(err.value)
    assert str(tmp_path / "recipe.yaml") in message
    assert f"  {field}:" in message and expected in message


def test_missing_required_fields_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match=r"select.corpus: required field is missing"):
        load_recipe(str(_recipe(tmp_path, "run_dir: r\nselect:\n  in_domain: a.jsonl\n")))
    with pytest.raises(RecipeError, match=r"run_dir: required when the recipe has a stage"):
        load_recipe(str(_recipe(tmp_path, "select: {in_domain: a, corpus: b}\n")))
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(_recipe(tmp_path, "run_dir: [unclosed\n")))
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(str(tmp_path / "nope.yaml"))


def test_set_overrides_any_field_and_is_validated(tmp_path):
    path = str(_recipe(tmp_path, GOOD))
    recipe = load_recipe(path, ["select.keep_fraction=0.25", "select.quality.scorer=none", "ray.num_cpus=2"])
    assert recipe.select.keep_fraction == 0.25 and recipe.select.quality.scorer == "none" and recipe.ray.num_cpus == 2
    with pytest.raises(RecipeError, match=r"select.keep_fraction: .*valid number"):
        load_recipe(path, ["select.keep_fraction=abc"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(path, ["select.keep_fraction"])


def test_cli_rejects_bad_arguments_before_any_work(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "hello"}\n')
    # argparse: out-of-range fraction, both rules at once, missing required flag -> exit 2 with a message.
    for argv, expected in [
        (["select", "--in-domain", str(corpus), "--corpus", str(corpus), "--out", "r", "--keep-fraction", "2"],
         "expected a number in (0, 1]"),
        (["select", "--in-domain", str(corpus), "--corpus", str(corpus), "--out", "r", "--keep-fraction", "0.1",
          "--threshold", "0.5"], "not allowed with argument"),
        (["select", "--corpus", str(corpus), "--out", "r"], "--in-domain"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert expected in capsys.readouterr().err
    # Recipe-level and input checks: exit 2, field named, Ray never started.
    assert main(["select", "--in-domain", str(corpus), "--corpus", str(tmp_path / "missing/*.jsonl"),
                 "--out", str(tmp_path / "r")]) == 2
    assert "select.corpus: no input files match" in capsys.readouterr().err
    assert main(["select", "--in-domain", str(corpus), "--corpus", str(corpus), "--out", str(tmp_path / "r"),
                 "--quality", "bogus"]) == 2
    assert "select.quality.scorer" in capsys.readouterr().err
    assert main(["select", "--in-domain", str(corpus), "--corpus", str(tmp_path / "c.csv"),
                 "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()  # nothing was started or written


def test_help_texts_describe_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["select", "--help"])
    out = capsys.readouterr().out
    for flag in ("--in-domain", "--corpus", "--out", "--keep-fraction", "--threshold", "--text-field", "--quality",
                 "--classifier", "--address", "--set"):
        assert flag in out
    assert "hf:MODEL" in out
