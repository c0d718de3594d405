"""Exact sequence-level quantities of tiny models, by enumerating every possible response."""

from __future__ import annotations

import itertools

import torch

from minillm_rl.algorithm.forward import response_logits


def all_responses(vocab_size: int, eos_token_id: int, horizon: int) -> list[list[int]]:
    """Every response the sampler can produce: it stops at the first EOS or after ``horizon``."""
    responses = []
    for length in range(1, horizon + 1):
        for seq in itertools.product(range(vocab_size), repeat=length):
            if eos_token_id in seq[:-1]:
                continue
            if length < horizon and seq[-1] != eos_token_id:
                continue
            responses.append(list(seq))
    return responses


def sequence_logprobs(model, prompt: list[int], responses: list[list[int]]) -> torch.Tensor:
    """``[N]`` float64 log-probability of each response given ``prompt``, differentiable."""
    n, width = len(responses), max(map(len, responses))
    response_ids = torch.zeros(n, width, dtype=torch.long)
    response_mask = torch.zeros(n, width)
    for i, r in enumerate(responses):
        response_ids[i, : len(r)] = torch.tensor(r)
        response_mask[i, : len(r)] = 1.0
    prompt_ids = torch.tensor([prompt] * n)
    logits = response_logits(model, prompt_ids, torch.ones_like(prompt_ids), response_ids, response_mask)
    logp = logits.double().log_softmax(-1).gather(-1, response_ids[..., None])[..., 0]
    return (logp * response_mask).sum(-1)


def reverse_kl(student, teacher, prompt: list[int], vocab_size: int, eos_token_id: int, horizon: int) -> torch.Tensor:
    """Exact sequence-level ``KL(q_student || p_teacher)`` (a differentiable float64 scalar)."""
    responses = all_responses(vocab_size, eos_token_id, horizon)
    logq = sequence_logprobs(student, prompt, responses)
    with torch.no_grad():
        logp = sequence_logprobs(teacher, prompt, responses)
    return (logq.exp() * (logq - logp)).sum()
