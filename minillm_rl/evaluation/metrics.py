"""Evaluation metrics (spec §6): Rouge-L and exact match (max over references, mean x 100), and
the shape of an answer's tokens (distinct-n, repeated n-grams, length, EOS)."""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from typing import Hashable, Sequence

_WHITESPACE_RUN = re.compile(r"\s+")


@functools.lru_cache(maxsize=1)
def _rouge_l_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _reference_lists(predictions: Sequence[str],
                     references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    """References as one non-empty list per prediction (a bare string = a single reference)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference "
                         "entries; expected one entry (a string or list of strings) per prediction")
    lists = [[refs] if isinstance(refs, str) else list(refs) for refs in references]
    for index, refs in enumerate(lists):
        if not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references[{index}] = {refs!r}; "
                             "expected a non-empty list of strings")
    return lists


def rouge_l_scores(predictions: Sequence[str],
                   references: Sequence[str | Sequence[str]]) -> list[float]:
    """Per-example Rouge-L F-measure x 100 (``rouge_score``, Porter stemmer), max over refs."""
    scorer = _rouge_l_scorer()
    return [
        100.0 * max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in refs)
        for prediction, refs in zip(predictions, _reference_lists(predictions, references))
    ]


def rouge_l(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean Rouge-L x 100 over the examples (0.0 for no examples)."""
    scores = rouge_l_scores(predictions, references)
    return sum(scores) / len(scores) if scores else 0.0


def normalize_answer(text: str) -> str:
    """Lowercase, drop every Unicode punctuation character, collapse whitespace."""
    no_punctuation = "".join(
        char for char in text.lower() if not unicodedata.category(char).startswith("P"))
    return _WHITESPACE_RUN.sub(" ", no_punctuation).strip()


def exact_match_scores(predictions: Sequence[str],
                       references: Sequence[str | Sequence[str]]) -> list[float]:
    """Per-example 100.0 if the normalised prediction equals any normalised reference, else 0.0."""
    return [
        100.0 * any(normalize_answer(prediction) == normalize_answer(ref) for ref in refs)
        for prediction, refs in zip(predictions, _reference_lists(predictions, references))
    ]


def exact_match(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean exact match x 100 over the examples (0.0 for no examples)."""
    scores = exact_match_scores(predictions, references)
    return sum(scores) / len(scores) if scores else 0.0


def distinct_n(tokens: Sequence[Hashable], n: int) -> float:
    """Share (x 100) of an answer's n-grams that are distinct: ``|set(n-grams)| / |n-grams|``.

    Computed within one answer (Li et al. 2016 pool a whole corpus; per answer it is a per-prompt
    value that can be bootstrapped). NaN (undefined) when the answer has fewer than ``n`` tokens.
    """
    if n < 1:
        raise ValueError(f"distinct_n: n={n}; expected n >= 1")
    ngrams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 100.0 * len(set(ngrams)) / len(ngrams) if ngrams else math.nan


def repeated_ngram_rate(tokens: Sequence[Hashable], n: int = 4) -> float:
    """Share (x 100) of an answer's n-gram positions whose n-gram already occurred at an earlier
    position of the same answer, i.e. ``100 - distinct_n(tokens, n)`` (every distinct n-gram has
    exactly one first occurrence). NaN when the answer has fewer than ``n`` tokens.

    With ``n`` = 4 it catches the loops of a degenerate student even under the test protocol's
    ban of repeated 6-grams.
    """
    return 100.0 - distinct_n(tokens, n)


def answer_shape_scores(answers: Sequence[Sequence[int]], eos_token_id: int) -> dict[str, list[float]]:
    """Per answer (generated token ids up to and including the first EOS, if any):

    - ``distinct_1``, ``distinct_2``: :func:`distinct_n` of the tokens before EOS;
    - ``repeated_4gram_rate``: :func:`repeated_ngram_rate` with ``n = 4``;
    - ``length``: tokens before EOS;
    - ``eos_rate``: 100 when the answer ended with EOS (within ``max_new_tokens``), else 0.
    """
    scores: dict[str, list[float]] = {"distinct_1": [], "distinct_2": [], "repeated_4gram_rate": [],
                                      "length": [], "eos_rate": []}
    for answer in answers:
        ended = eos_token_id in answer
        text_tokens = list(answer[: answer.index(eos_token_id)]) if ended else list(answer)
        scores["distinct_1"].append(distinct_n(text_tokens, 1))
        scores["distinct_2"].append(distinct_n(text_tokens, 2))
        scores["repeated_4gram_rate"].append(repeated_ngram_rate(text_tokens, 4))
        scores["length"].append(float(len(text_tokens)))
        scores["eos_rate"].append(100.0 if ended else 0.0)
    return scores
