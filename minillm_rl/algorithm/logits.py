"""Logit processing shared by the sampler and the learner.

The sampler mixes the *processed* teacher and student distributions, and the learner must
recompute the student's log-probs under exactly the same processing for the PPO ratio to be 1
at the first epoch, so both import this one function.
"""

from __future__ import annotations

import torch


def process_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering.

    Args:
        logits: ``[..., vocab]`` raw next-token logits.
        temperature: > 0; logits are divided by it.
        top_k: keep the ``top_k`` largest logits (0 = keep all).
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p``
            (1.0 = keep all). The most likely token is always kept.

    Returns:
        ``[..., vocab]`` float32 logits with filtered tokens set to ``-inf``; ``log_softmax`` of
        it is the processed log-distribution.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    out = logits.float()
    if temperature != 1.0:
        out = out / temperature
    vocab = out.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(out, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Probability mass strictly before each token: a token is dropped once the tokens
        # ranked above it already reach top_p, so the top token always survives.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out
