"""The heuristic quality scorer's Gopher/C4 rules (actors/quality.py), one at a time: for each rule a text that
passes every rule, and a variant that breaks that rule alone (at the threshold's edge where the rule has one), so
that the rule's flag flips and the score drops by exactly one rule's share; then the Ray Data batch function that
turns the rules into ``quality_score``."""

from __future__ import annotations

import pyarrow as pa
import pytest

from domainsynth.actors.quality import (RULE_NAMES, HeuristicQualityScorer, HeuristicRules, heuristic_quality_score,
                                        heuristic_rule_results)

# Ordinary prose: 60 words of 3-10 letters, no symbols, and the stop words "the", "of", "and", "with".
VOCAB = ("The membrane of each cell controls which molecules enter and leave, with channel proteins carrying "
         "charged ions across").split()
CONTENT = [w for w in VOCAB if w.lower().strip(",") not in {"the", "of", "and", "with"}]


def prose(n_words: int = 60) -> list[str]:
    return [VOCAB[i % len(VOCAB)] for i in range(n_words)]


def text(words: list[str]) -> str:
    return " ".join(words)


def lines_text(lines: list[str]) -> str:
    return "\n".join(lines)


# Ten different lines of ten words each (100 words): the line rules count among these.
LINES = [f"Line {tag} says the membrane of each cell controls transport"
         for tag in ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa")]


def only_failing(results: dict[str, bool]) -> set[str]:
    return {rule for rule, ok in results.items() if not ok}


def assert_breaks_only(sample: str, rule: str) -> None:
    results = heuristic_rule_results(sample)
    assert only_failing(results) == {rule}, results
    assert heuristic_quality_score(sample) == pytest.approx((len(RULE_NAMES) - 1) / len(RULE_NAMES))


def assert_passes_all(sample: str) -> None:
    results = heuristic_rule_results(sample)
    assert only_failing(results) == set(), results
    assert heuristic_quality_score(sample) == 1.0


def test_every_rule_is_reported_and_the_base_texts_pass_them_all():
    assert set(heuristic_rule_results(text(prose()))) == set(RULE_NAMES) and len(RULE_NAMES) == 7
    assert_passes_all(text(prose()))
    assert_passes_all(lines_text(LINES))


def test_word_count_rule_needs_50_to_100000_words():
    rules = HeuristicRules()
    assert_passes_all(text(prose(rules.min_words)))
    assert_breaks_only(text(prose(rules.min_words - 1)), "word_count")
    assert_passes_all(text(prose(rules.max_words)))
    assert_breaks_only(text(prose(rules.max_words + 1)), "word_count")


def test_mean_word_length_rule_needs_3_to_10_characters():
    # Sixty words averaging exactly 3 characters ("the" and "and" are stop words): the lower bound passes.
    assert_passes_all(text(["the", "and"] + ["cat"] * 58))
    # One letter shorter on average than 3 (mean 2.9): too short.
    assert_breaks_only(text(["the", "and"] + ["cat"] * 52 + ["at"] * 6), "mean_word_length")
    # Long words: mean 10 passes, above 10 fails.
    assert_passes_all(text(["the", "and"] + ["x" * 10] * 58 + ["y" * 24]))  # (6 + 580 + 24) / 61 = 10
    long_words = ["the", "and"] + ["internationalisation"] * 58  # 20 letters
    assert_breaks_only(text(long_words), "mean_word_length")


def test_symbol_ratio_rule_allows_one_hash_or_ellipsis_per_ten_words():
    words = prose(60)
    six = [("#" + w) if i < 6 else w for i, w in enumerate(words)]  # 6 / 60 = 0.1
    assert_passes_all(text(six))
    seven = [("#" + w) if i < 7 else w for i, w in enumerate(words)]  # 7 / 60 > 0.1
    assert_breaks_only(text(seven), "symbol_ratio")
    # Ellipses inside a line count as symbols too ("..." and "…"); the line does not end with one.
    dots = [(w + "...") if i % 8 == 1 else w for i, w in enumerate(words[:-1])] + ["end"]
    assert sum(w.endswith("...") for w in dots) == 8
    assert_breaks_only(text(dots), "symbol_ratio")
    unicode_dots = [(w + "…") if i % 8 == 1 else w for i, w in enumerate(words[:-1])] + ["end"]
    assert_breaks_only(text(unicode_dots), "symbol_ratio")


def test_alphabetic_words_rule_needs_80_percent_of_words_with_a_letter():
    words = prose(60)
    twelve = ["1234" if i % 5 == 4 else w for i, w in enumerate(words)]  # 48 / 60 = 0.8 have a letter
    assert sum(w == "1234" for w in twelve) == 12
    assert_passes_all(text(twelve))
    thirteen = ["5678"] + twelve[1:]
    assert sum(not any(c.isalpha() for c in w) for w in thirteen) == 13  # 47 / 60 < 0.8
    assert_breaks_only(text(thirteen), "alphabetic_words")
    # Underscores and digits are not letters; a word with one letter among them is alphabetic.
    assert_breaks_only(text(["__9_"] + twelve[1:]), "alphabetic_words")
    assert_passes_all(text(["_9a_"] + twelve[1:]))


def test_stop_words_rule_needs_two_different_gopher_stop_words():
    content = [CONTENT[i % len(CONTENT)] for i in range(58)]
    assert_breaks_only(text(content + ["gene", "cell"]), "stop_words")
    assert_breaks_only(text(content + ["the", "THE"]), "stop_words")  # one stop word, twice, is one
    assert_passes_all(text(content + ["The,", "(with"]))  # case and punctuation are ignored
    assert_passes_all(text(content + ["have", "that"]))


def test_duplicate_lines_rule_allows_30_percent_repeated_lines():
    three_repeats = [LINES[0]] * 4 + LINES[4:]  # 10 lines, 7 distinct: 3 / 10 repeated
    assert_passes_all(lines_text(three_repeats))
    four_repeats = [LINES[0]] * 5 + LINES[5:]  # 4 / 10 repeated
    assert_breaks_only(lines_text(four_repeats), "duplicate_lines")
    # Lines are compared stripped, and blank lines do not count.
    spaced = [LINES[0], "  " + LINES[0] + " ", "", *([LINES[0]] * 3), *LINES[6:]]
    assert_breaks_only(lines_text(spaced), "duplicate_lines")


def test_ellipsis_lines_rule_allows_30_percent_of_lines_ending_in_an_ellipsis():
    three = [line + "..." if i < 3 else line for i, line in enumerate(LINES)]
    assert_passes_all(lines_text(three))
    four = [line + "..." if i < 4 else line for i, line in enumerate(LINES)]
    assert_breaks_only(lines_text(four), "ellipsis_lines")
    four_unicode = [line + "…" if i < 4 else line for i, line in enumerate(LINES)]
    assert_breaks_only(lines_text(four_unicode), "ellipsis_lines")


def test_empty_text_fails_every_rule_that_needs_words():
    results = heuristic_rule_results("")
    assert only_failing(results) == {"word_count", "mean_word_length", "symbol_ratio", "alphabetic_words",
                                     "stop_words"}
    assert heuristic_quality_score("") == pytest.approx(2 / 7)


def test_thresholds_are_parameters():
    short = text(prose(20))
    assert "word_count" in only_failing(heuristic_rule_results(short))
    relaxed = HeuristicRules(min_words=20)
    assert only_failing(heuristic_rule_results(short, relaxed)) == set()
    assert heuristic_quality_score(short, relaxed) == 1.0
    strict = HeuristicRules(min_stop_words=5)  # the prose has four: the, of, and, with
    assert only_failing(heuristic_rule_results(text(prose()), strict)) == {"stop_words"}


def test_scorer_adds_the_fraction_of_rules_passed_as_quality_score():
    samples = {
        "good": text(prose()),
        "short": text(prose(10)),  # fails word_count only
        "numbers": text(["1234"] * 60),  # fails alphabetic_words and stop_words
        "missing": None,
    }
    batch = pa.table({"id": list(samples), "doc": list(samples.values()), "extra": [1, 2, 3, 4]})
    out = HeuristicQualityScorer("doc")(batch)
    assert out.column_names == ["id", "doc", "extra", "quality_score"]
    assert out.schema.field("quality_score").type == pa.float32()
    scores = dict(zip(out.column("id").to_pylist(), out.column("quality_score").to_pylist()))
    assert scores["good"] == 1.0
    assert scores["short"] == pytest.approx(6 / 7)
    assert only_failing(heuristic_rule_results(samples["numbers"])) == {"alphabetic_words", "stop_words"}
    assert scores["numbers"] == pytest.approx(5 / 7)
    assert scores["missing"] is None  # no text, no score (not a zero that passes as a bad document)
    assert out.column("extra").to_pylist() == [1, 2, 3, 4]
    strict = HeuristicQualityScorer("doc", HeuristicRules(min_words=61))(batch)
    assert strict.column("quality_score").to_pylist()[0] == pytest.approx(6 / 7)
