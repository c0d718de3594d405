"""Rouge-L equals rouge-score's own numbers; exact-match normalisation."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

from minillm_rl.evaluation.metrics import (
    exact_match,
    exact_match_scores,
    normalize_answer,
    rouge_l,
    rouge_l_scores,
)

PREDICTIONS = [
    "The cats are running quickly to the houses.",
    "Paris is the capital of France.",
    "",
    "completely unrelated words here",
]
REFERENCES = [
    ["A cat runs quickly to the house."],
    ["The capital of France is Paris.", "Paris is the capital of France!"],
    ["Something."],
    ["nothing in common", "also nothing", "words unrelated completely here"],
]


def reference_scores():
    """The spec's definition, written directly against rouge-score."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [100 * max(scorer.score(r, p)["rougeL"].fmeasure for r in refs)
            for p, refs in zip(PREDICTIONS, REFERENCES)]


def test_rouge_l_equals_rouge_score():
    expected = reference_scores()
    assert rouge_l_scores(PREDICTIONS, REFERENCES) == pytest.approx(expected, abs=1e-12)
    assert rouge_l(PREDICTIONS, REFERENCES) == pytest.approx(sum(expected) / 4, abs=1e-12)
    # Sanity on the reference itself: stemming makes the first pair overlap heavily; the
    # second takes the exact-match reference (max over refs); an empty prediction scores 0.
    assert expected[1] == pytest.approx(100.0)
    assert expected[2] == 0.0
    assert 50 < expected[0] < 100


def test_rouge_l_max_over_references_not_mean_or_first():
    single_first = rouge_l_scores(PREDICTIONS[3:], [REFERENCES[3][:1]])[0]
    multi = rouge_l_scores(PREDICTIONS[3:], REFERENCES[3:])[0]
    assert single_first < multi
    assert multi == pytest.approx(
        max(rouge_l_scores(PREDICTIONS[3:] * 3, [[r] for r in REFERENCES[3]])))


def test_bare_string_reference_is_one_reference():
    assert rouge_l_scores(["a cat"], ["a cat"]) == rouge_l_scores(["a cat"], [["a cat"]])


@pytest.mark.parametrize("predictions,references,fragment", [
    (["a", "b"], [["a"]], "2 predictions but 1 reference"),
    (["a"], [[]], "references[0]"),
    (["a"], [["a", 3]], "references[0]"),
])
def test_bad_inputs_are_clear_errors(predictions, references, fragment):
    for metric in (rouge_l, exact_match):
        with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            metric(predictions, references)


@pytest.mark.parametrize("text,normalised", [
    ("  Hello,   World!  ", "hello world"),
    ("It's\tA\nTEST.", "its a test"),
    ("«Guillemets» — and “quotes”…", "guillemets and quotes"),
    ("", ""),
    ("3.14", "314"),
])
def test_normalize_answer(text, normalised):
    assert normalize_answer(text) == normalised


def test_exact_match_normalisation_and_max_over_references():
    predictions = ["Paris!", "the answer is 4", "  BLUE  sky", "no"]
    references = [["paris"], ["4", "The answer is 4."], ["blue sky"], ["yes", "maybe"]]
    assert exact_match_scores(predictions, references) == [100.0, 100.0, 100.0, 0.0]
    assert exact_match(predictions, references) == 75.0
    assert exact_match([], []) == 0.0 and rouge_l([], []) == 0.0
