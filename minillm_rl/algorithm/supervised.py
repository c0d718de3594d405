"""Supervised phases on (prompt, response) pairs: SFT (§2) and word-level KD (§5).

Both are one forward over ``SupervisedBatch`` (the rollout layout), loss on response tokens only.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from minillm_rl.algorithm.batching import SupervisedBatch
from minillm_rl.algorithm.forward import response_logits
from minillm_rl.algorithm.losses import kd_loss, sft_loss
from minillm_rl.algorithm.teacher_head import HiddenTeacher


def supervised_micro_batch_loss(
    model: torch.nn.Module,
    batch: SupervisedBatch,
    teacher_logits: torch.Tensor | HiddenTeacher | None = None,
    kd_ratio: float = 0.5,
) -> tuple[torch.Tensor, dict[str, float]]:
    """SFT cross-entropy, or with ``teacher_logits [B, T, V]`` (or the teacher's hidden states and
    head, :class:`HiddenTeacher`) the KD mix ``(1 - kd_ratio)·CE + kd_ratio·(−Σ_v p(v) log q(v))``."""
    # Batches are collated on CPU; the model (a DeepSpeed engine, which does not move its inputs, or
    # an HF model) may live on a GPU. ppo_round moves its micro-batches the same way.
    device = getattr(model, "device", torch.device("cpu"))
    batch = batch.to(device)
    if isinstance(teacher_logits, torch.Tensor):
        teacher_logits = teacher_logits.to(device)
    logits = response_logits(model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
    if teacher_logits is None:
        return sft_loss(logits, batch.labels)
    return kd_loss(logits, teacher_logits, batch.labels, kd_ratio=kd_ratio)


@torch.no_grad()
def validation_loss(model: torch.nn.Module, batches: Iterable[SupervisedBatch]) -> float:
    """Token-weighted mean response cross-entropy over ``batches`` (the SFT-init selection
    criterion, §2)."""
    total, tokens = 0.0, 0.0
    for batch in batches:
        loss, _ = supervised_micro_batch_loss(model, batch)
        count = batch.response_mask.sum().item()
        total += loss.item() * count
        tokens += count
    return total / max(tokens, 1.0)
