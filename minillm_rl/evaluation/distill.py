"""Per-token scores of given responses under the student and the teacher (spec §6 distillation
metrics). Pure torch over HF causal LMs; no Ray or DeepSpeed.

Each (prompt, response) pair goes once through each model (``algorithm.forward.response_logits``:
only the response positions reach the LM head) and, at every response position ``t``, from the
raw logits (temperature 1, no top-k/top-p, no n-gram ban: the metrics judge the models'
distributions, not the decoding protocol that drew the sample):

- ``student_logprobs[t] = log q(y_t | x, y_<t)``, ``teacher_logprobs[t] = log p(y_t | x, y_<t)``;
- ``reverse_kl[t] = KL(q(. | x, y_<t) || p(. | x, y_<t))``, summed over the whole vocabulary
  (``algorithm.chunked_vocab.reverse_kl_to_teacher``).

By the chain rule, ``E_{y ~ q} [sum_t reverse_kl[t]]`` is the sequence-level ``KL(q || p)`` of the
response distribution (tests/test_distill_metrics.py checks it by enumerating every response of a
tiny model). A response ending in EOS is scored at the EOS position too: stopping is part of the
distribution.

Memory: rows are forwarded in groups whose logits hold at most ``max_logit_elements`` values
(``rows x T x V``) per model, rows sorted by length; the chunked kernels then walk over blocks of
positions, so a ``[B, T, V]`` float32 of a whole evaluation batch is never built. One row
(``[1, T, V]``, 50 MB for V = 49k, T = 256) is the floor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from minillm_rl.algorithm.batching import left_pad, right_pad
from minillm_rl.algorithm.chunked_vocab import reverse_kl_to_teacher, token_logprobs
from minillm_rl.algorithm.forward import response_logits

# 2^26 logits = 256 MB in float32 per model and group: 5 rows of T = 256 at V = 49k.
DEFAULT_MAX_LOGIT_ELEMENTS = 2**26


@dataclass
class TokenScores:
    """``[B, T]`` float32 per response position, 0 where ``response_mask`` is 0; the teacher's
    fields are ``None`` without a teacher."""

    student_logprobs: torch.Tensor
    teacher_logprobs: torch.Tensor | None
    reverse_kl: torch.Tensor | None


@dataclass
class ResponseScores:
    """Per response, in input order, means over its tokens (EOS included when it has one):
    ``student_nll`` ``-mean log q``, ``teacher_nll`` ``-mean log p``, ``reverse_kl`` mean
    ``KL(q || p)``. The teacher's fields are ``None`` without a teacher."""

    student_nll: list[float]
    teacher_nll: list[float] | None
    reverse_kl: list[float] | None


def _vocab_size(student, teacher) -> int:
    """The LM heads' output size (some models pad the embeddings), equal for both models."""
    vocab = student.get_output_embeddings().weight.shape[0]
    if teacher is not None and teacher.get_output_embeddings().weight.shape[0] != vocab:
        raise ValueError(f"teacher and student must share the vocabulary: teacher has "
                         f"{teacher.get_output_embeddings().weight.shape[0]} logits, student {vocab}")
    return vocab


def _logits(model, prompt_ids, prompt_mask, response_ids, response_mask) -> torch.Tensor:
    device = model.device
    return response_logits(model, prompt_ids.to(device), prompt_mask.to(device), response_ids.to(device),
                           response_mask.to(device))


@torch.no_grad()
def token_scores(student, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
                 response_mask: torch.Tensor, teacher=None) -> TokenScores:
    """Scores of one batch at every response position.

    Args:
        prompt_ids, prompt_mask: ``[B, P]`` left-padded prompts.
        response_ids, response_mask: ``[B, T]`` right-padded responses.

    Returns:
        :class:`TokenScores` on the student's device.
    """
    student_logits = _logits(student, prompt_ids, prompt_mask, response_ids, response_mask)
    device = student_logits.device
    ids, valid = response_ids.to(device), response_mask.to(device) > 0
    zero = torch.zeros((), device=device)
    student_logprobs = torch.where(valid, token_logprobs(student_logits, ids), zero)
    if teacher is None:
        return TokenScores(student_logprobs, None, None)
    teacher_logits = _logits(teacher, prompt_ids, prompt_mask, response_ids, response_mask).to(device)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} vs student logits "
                         f"{tuple(student_logits.shape)}; expected models with the same vocabulary")
    return TokenScores(student_logprobs, torch.where(valid, token_logprobs(teacher_logits, ids), zero),
                       torch.where(valid, reverse_kl_to_teacher(student_logits, teacher_logits), zero))


def _groups(order: list[int], widths: Sequence[int], vocab: int, max_logit_elements: int) -> list[list[int]]:
    """``order`` (ascending ``widths``) cut into runs whose ``rows x widest x vocab`` fits the budget."""
    groups: list[list[int]] = []
    for index in order:
        if not groups or (len(groups[-1]) + 1) * widths[index] * vocab > max_logit_elements:
            groups.append([])
        groups[-1].append(index)
    return groups


@torch.no_grad()
def score_responses(student, prompt_id_lists: Sequence[Sequence[int]], response_id_lists: Sequence[Sequence[int]],
                    pad_token_id: int, teacher=None,
                    max_logit_elements: int = DEFAULT_MAX_LOGIT_ELEMENTS) -> ResponseScores:
    """Per-token means of :func:`token_scores` for each (prompt, response) pair (models in eval mode).

    Args:
        prompt_id_lists: N non-empty prompts.
        response_id_lists: N non-empty responses (EOS included where the response ended).
        pad_token_id: fills the padding (masked out).
        max_logit_elements: per-model logits budget of one forward (see the module docstring).
    """
    if len(prompt_id_lists) != len(response_id_lists):
        raise ValueError(f"score_responses: {len(prompt_id_lists)} prompts but {len(response_id_lists)} "
                         "responses; expected one response per prompt")
    for name, lists in (("prompt_id_lists", prompt_id_lists), ("response_id_lists", response_id_lists)):
        empty = next((i for i, ids in enumerate(lists) if len(ids) == 0), None)
        if empty is not None:
            raise ValueError(f"score_responses: {name}[{empty}] is empty; expected at least one token")
    if max_logit_elements < 1:
        raise ValueError(f"score_responses: max_logit_elements={max_logit_elements}; expected >= 1")
    vocab = _vocab_size(student, teacher)
    widths = [len(ids) for ids in response_id_lists]
    order = sorted(range(len(widths)), key=lambda i: (widths[i], len(prompt_id_lists[i])))
    per_response = {name: [0.0] * len(widths) for name in ("student_nll", "teacher_nll", "reverse_kl")}
    for rows in _groups(order, widths, vocab, max_logit_elements):
        prompt_ids, prompt_mask = left_pad([prompt_id_lists[i] for i in rows], pad_token_id)
        response_ids, response_mask = right_pad([response_id_lists[i] for i in rows], pad_token_id)
        scores = token_scores(student, prompt_ids, prompt_mask, response_ids, response_mask, teacher)
        per_token = {"student_nll": -scores.student_logprobs}
        if teacher is not None:
            per_token.update(teacher_nll=-scores.teacher_logprobs, reverse_kl=scores.reverse_kl)
        for name, values in per_token.items():
            means = values.double().sum(-1).cpu() / response_mask.double().sum(-1)
            for row, mean in zip(rows, means.tolist()):
                per_response[name][row] = mean
    if teacher is None:
        return ResponseScores(per_response["student_nll"], None, None)
    return ResponseScores(per_response["student_nll"], per_response["teacher_nll"], per_response["reverse_kl"])
