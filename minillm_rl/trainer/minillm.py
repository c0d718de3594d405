"""One MiniLLM round on the learner side (algorithm.md §3.7 and §4).

``minillm_micro_batch_loss`` is the whole objective for one micro-batch of rollouts;
``ppo_round`` runs ``ppo_epochs`` shuffled passes of it over a round's rollouts, one optimizer
step per micro-batch, after which the caller discards the rollouts and samples afresh.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from minillm_rl.advantages import AdvantageConfig, compute_advantages, importance_weights, masked_mean
from minillm_rl.forward import response_logits
from minillm_rl.losses import minillm_loss
from minillm_rl.rollout.sampler import Rollout, SamplingConfig


@dataclass
class MiniLLMLossConfig:
    """Loss switches. Defaults: the reference code; ``single_step_weighted=True`` is the paper's
    variant that weights the single-step term by ``w``."""

    clip_eps: float = 0.2
    single_step: bool = True
    single_step_weighted: bool = False


def select_rows(rollout: Rollout, rows: torch.Tensor) -> Rollout:
    """The sub-batch ``rows`` of ``rollout`` (every ``[B, ...]`` tensor indexed on dim 0)."""
    fields = {name: value[rows] if isinstance(value, torch.Tensor) else value
              for name, value in vars(rollout).items()}
    return Rollout(**fields)


def minillm_micro_batch_loss(
    model: torch.nn.Module,
    rollout: Rollout,
    sampling: SamplingConfig,
    advantage_cfg: AdvantageConfig,
    loss_cfg: MiniLLMLossConfig,
    group: torch.distributed.ProcessGroup | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``L_pg + L_single`` for one micro-batch (§4.1–§4.3), plus rollout statistics.

    Advantages are computed here, per micro-batch, because their whitening statistics are the
    micro-batch's (pooled over the data-parallel ``group``), as in the reference.
    """
    logits = response_logits(model, rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids,
                             rollout.response_mask)
    mask = rollout.response_mask
    weights = importance_weights(rollout.student_logprobs, rollout.teacher_logprobs, rollout.alpha, mask)
    advantages, rewards = compute_advantages(rollout, advantage_cfg, group=group)
    if not loss_cfg.single_step:
        rollout = dataclasses.replace(rollout, teacher_dist_logprobs=None, teacher_topk_logprobs=None,
                                      teacher_topk_ids=None)
    # The sampler recorded log q_old under this processing; the ratio must use the same.
    loss, stats = minillm_loss(logits, rollout, advantages, weights, clip_eps=loss_cfg.clip_eps,
                               temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                               weight_single_step=loss_cfg.single_step_weighted)
    stats.update({
        "reward/mean": masked_mean(rewards, mask).item(),
        # log q_old - log p per sampled token estimates the reverse-KL rate of the responses.
        "reverse_kl/per_token": masked_mean(rollout.student_logprobs - rollout.teacher_logprobs_raw, mask).item(),
        "w/mean": masked_mean(weights, mask).item(),
        "w/max": weights[mask > 0].max().item() if mask.any() else 0.0,
        "response_len/mean": mask.sum(-1).mean().item(),
    })
    return loss, stats


def ppo_round(
    engine,
    rollout: Rollout,
    sampling: SamplingConfig,
    advantage_cfg: AdvantageConfig,
    loss_cfg: MiniLLMLossConfig,
    ppo_epochs: int,
    micro_batch_size: int,
    generator: torch.Generator,
    group: torch.distributed.ProcessGroup | None = None,
) -> list[dict[str, float]]:
    """``ppo_epochs`` shuffled passes over ``rollout``; one optimizer step per micro-batch.

    ``engine`` is a DeepSpeed engine or a :class:`~minillm_rl.trainer.engine.TorchEngine`.
    Returns the stats of every micro-batch, in order.
    """
    batch_size = rollout.response_ids.shape[0]
    history = []
    for epoch in range(ppo_epochs):
        order = torch.randperm(batch_size, generator=generator)
        for start in range(0, batch_size, micro_batch_size):
            micro = select_rows(rollout, order[start : start + micro_batch_size])
            loss, stats = minillm_micro_batch_loss(engine, micro, sampling, advantage_cfg, loss_cfg, group)
            engine.backward(loss)
            engine.step()
            stats["grad_norm"] = float(engine.get_global_grad_norm() or 0.0)
            stats["ppo_epoch"] = epoch
            history.append(stats)
    return history
