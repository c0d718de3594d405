"""Evaluation metrics (spec §6): Rouge-L and exact match, max over references, mean x 100."""

from __future__ import annotations

import functools
import re
import unicodedata
from typing import Sequence

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
