"""Rouge-L equals rouge-score's own numbers; exact-match normalisation; distinct-n and repeated
n-grams against their definitions."""

from __future__ import annotations

import math
import random

import pytest
from rouge_score import rouge_scorer

from minillm_rl.evaluation.metrics import (
    answer_shape_scores,
    distinct_n,
    exact_match,
    exact_match_scores,
    normalize_answer,
    repeated_ngram_rate,
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


# ------------------------------------------------- answer shape: distinct-n, repeated n-grams, length, EOS

def _repeated_positions_brute_force(tokens: list[int], n: int) -> float:
    """The definition written out: an n-gram position counts when the same n-gram starts at an
    earlier position of the answer."""
    starts = range(len(tokens) - n + 1)
    repeated = sum(any(tokens[j:j + n] == tokens[i:i + n] for j in range(i)) for i in starts)
    return 100.0 * repeated / len(starts)


def test_distinct_n_and_repeated_ngrams_by_hand():
    tokens = [1, 2, 1, 2, 3]
    assert distinct_n(tokens, 1) == pytest.approx(60.0)  # {1, 2, 3} of 5
    assert distinct_n(tokens, 2) == pytest.approx(75.0)  # (1,2) (2,1) (1,2) (2,3): 3 of 4
    assert math.isnan(distinct_n(tokens, 6)) and math.isnan(repeated_ngram_rate([5, 6, 7], 4))
    loop = [5, 6, 7, 8, 5, 6, 7, 8, 5]  # 6 four-grams, the last two repeat the first two
    assert repeated_ngram_rate(loop, 4) == pytest.approx(100 * 2 / 6)
    with pytest.raises(ValueError, match="n=0"):
        distinct_n(tokens, 0)


def test_repeated_ngram_rate_equals_its_definition_on_random_answers():
    rng = random.Random(0)
    for _ in range(200):
        tokens = [rng.randrange(4) for _ in range(rng.randint(4, 30))]
        for n in (1, 2, 4):
            assert repeated_ngram_rate(tokens, n) == pytest.approx(_repeated_positions_brute_force(tokens, n))


def test_answer_shape_scores_count_tokens_before_eos():
    eos = 1
    scores = answer_shape_scores([[5, 6, eos], [5, 5, 5, 5, 5], [eos], [7, 8, 7, 8, 7, 8, 7]], eos)
    assert scores["length"] == [2.0, 5.0, 0.0, 7.0]
    assert scores["eos_rate"] == [100.0, 0.0, 100.0, 0.0]
    assert scores["distinct_1"][:2] == [100.0, 20.0] and math.isnan(scores["distinct_1"][2])
    assert scores["distinct_2"][:2] == [100.0, 25.0] and math.isnan(scores["distinct_2"][2])
    assert math.isnan(scores["repeated_4gram_rate"][0]) and scores["repeated_4gram_rate"][1] == 50.0
    assert scores["repeated_4gram_rate"][3] == pytest.approx(100 * 2 / 4)  # 7878 8787 7878 8787
