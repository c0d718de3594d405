"""Importance weights, rewards and advantages of MiniLLM (algorithm.md §3.4-§3.6).

Everything here is computed without gradients from the per-token records of a rollout
(``[batch, response_len]`` tensors that are 0 where ``response_mask`` is 0) and returns
``[batch, response_len]`` tensors that are again 0 at masked positions.

Defaults follow the authors' reference code (γ = 0.95, reward-to-go including ``r_t``, length
normalisation, whitening); :meth:`AdvantageConfig.paper` gives the paper's variant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask > 0``; 0 when there are none.

    ``torch.where`` rather than a product, so a non-finite value at a masked position (e.g. a
    log-prob of a filtered pad token) neither leaks into the result nor into its gradient.
    """
    valid = mask > 0
    total = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
    return total / valid.sum().clamp(min=1)


@torch.no_grad()
def importance_weights(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    alpha: float,
    response_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``w_t = q_old(y_t) / (alpha p(y_t) + (1 - alpha) q_old(y_t))`` in log space.

    Args:
        student_logprobs, teacher_logprobs: ``[B, T]`` processed log-probs of the sampled tokens.
        alpha: teacher-mix coefficient in ``[0, 1]``; 0 gives exactly 1 (pure on-policy).
        response_mask: optional ``[B, T]``; where given, ``w`` is 0 at masked positions.

    Returns:
        ``[B, T]`` float32 weights, ``0 < w <= 1 / (1 - alpha)`` at valid positions (not clipped).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"importance_weights: alpha must be in [0, 1], got {alpha}")
    if student_logprobs.shape != teacher_logprobs.shape:
        raise ValueError(
            f"importance_weights: student_logprobs {tuple(student_logprobs.shape)} and teacher_logprobs "
            f"{tuple(teacher_logprobs.shape)} must have the same shape"
        )
    student = student_logprobs.float()
    if alpha == 0.0:
        weights = torch.ones_like(student)
    else:
        log_alpha = math.log(alpha)
        log_one_minus_alpha = math.log1p(-alpha) if alpha < 1.0 else float("-inf")
        log_mixture = torch.logaddexp(teacher_logprobs.float() + log_alpha, student + log_one_minus_alpha)
        weights = torch.exp(student - log_mixture)
    if response_mask is not None:
        weights = torch.where(response_mask > 0, weights, torch.zeros_like(weights))
    return weights


@torch.no_grad()
def token_rewards(
    teacher_logprobs_raw: torch.Tensor,
    student_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    reward_scaling: float = 0.5,
    reward_clip: float = 100.0,
) -> torch.Tensor:
    """``r_t = clip((log p(y_t) - log q_old(y_t)) / reward_scaling, -reward_clip, reward_clip)``.

    Args:
        teacher_logprobs_raw: ``[B, T]`` teacher log-probs at temperature 1 over the full vocab.
        student_logprobs: ``[B, T]`` log q_old of the sampled tokens.
        response_mask: ``[B, T]``, 1 for valid tokens.

    Returns:
        ``[B, T]`` float32 rewards, 0 at masked positions.
    """
    if reward_scaling <= 0:
        raise ValueError(f"token_rewards: reward_scaling must be > 0, got {reward_scaling}")
    if reward_clip <= 0:
        raise ValueError(f"token_rewards: reward_clip must be > 0, got {reward_clip}")
    rewards = (teacher_logprobs_raw.float() - student_logprobs.float()) / reward_scaling
    rewards = rewards.clamp(-reward_clip, reward_clip)
    return torch.where(response_mask > 0, rewards, torch.zeros_like(rewards))


@torch.no_grad()
def reward_to_go(
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float = 0.95,
    length_normalize: bool = True,
    include_current: bool = True,
) -> torch.Tensor:
    """Discounted (optionally length-normalised) reward-to-go.

    ``G_t = sum_{k>=t} gamma^(k-t) r_k`` (``include_current=False``: ``sum_{k>=t+1} gamma^(k-t-1) r_k``).
    With ``length_normalize``, ``G_t`` is divided by ``n_t``, the number of valid tokens the sum
    runs over (from ``t``, or ``t+1``, to the end); ``0/0`` is 0. Without it the reverse-KL reward
    favours short answers (algorithm.md §4.2).

    Args:
        rewards: ``[B, T]`` per-token rewards.
        response_mask: ``[B, T]``, 1 for valid tokens (a prefix of each row).

    Returns:
        ``[B, T]`` float32, 0 at masked positions.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"reward_to_go: gamma must be in [0, 1], got {gamma}")
    length = rewards.shape[-1]
    valid = (response_mask > 0).double()
    rewards = rewards.double() * valid
    # discount[t, k] = gamma^(k - t - shift) for k >= t + shift: one [T, T] matmul instead of a
    # Python loop over positions; gamma <= 1 keeps every entry in [0, 1].
    shift = 0 if include_current else 1
    steps = torch.arange(length, device=rewards.device, dtype=torch.float64)
    offset = steps[None, :] - steps[:, None] - shift
    reaches = offset >= 0
    discount = torch.where(reaches, gamma ** offset.clamp(min=0), torch.zeros_like(offset))
    returns = rewards @ discount.T
    if length_normalize:
        counts = valid @ reaches.double().T
        returns = torch.where(counts > 0, returns / counts.clamp(min=1), torch.zeros_like(returns))
    return (returns * valid).float()


@torch.no_grad()
def whiten(
    values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """``(v - mean) / sqrt(var + eps)`` with statistics over valid tokens only.

    The reference code includes padded zeros in the statistics, which shifts the mean towards 0
    in proportion to the padding; here only positions with ``mask > 0`` count. When
    ``torch.distributed`` is initialised the statistics are over every rank of ``group`` (one
    float64 ``all_reduce`` of count, sum and sum of squares), so all ranks whiten identically.
    The variance is the population variance.

    Args:
        values: ``[B, T]``.
        mask: ``[B, T]``, 1 for valid tokens.

    Returns:
        ``[B, T]`` in ``values.dtype``, 0 at masked positions (all zeros if no rank has a valid token).
    """
    valid = mask > 0
    selected = torch.where(valid, values.double(), torch.zeros((), dtype=torch.float64, device=values.device))
    stats = torch.stack([valid.sum().double(), selected.sum(), (selected * selected).sum()])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    count, total, total_sq = stats.unbind()
    if count.item() == 0:
        return torch.zeros_like(values)
    mean = total / count
    variance = (total_sq / count - mean * mean).clamp(min=0.0)
    whitened = (values.double() - mean) * torch.rsqrt(variance + eps)
    return torch.where(valid, whitened, torch.zeros_like(whitened)).to(values.dtype)


@dataclass
class AdvantageConfig:
    """How rewards become advantages. Defaults: the reference code (algorithm.md §3.6).

    ``baseline``: ``"whiten"`` (reference) whitens the reward-to-go over the micro-batch;
    ``"constant"`` subtracts ``constant_baseline`` (the paper's ``b``): ``A_t = G_t - b``, so the
    paper's ``b = -1`` gives ``A_t = G_t + 1``; ``"none"`` uses ``G_t`` as is.
    """

    gamma: float = 0.95
    length_normalize: bool = True
    include_current_reward: bool = True
    baseline: Literal["whiten", "constant", "none"] = "whiten"
    constant_baseline: float = -1.0
    reward_scaling: float = 0.5
    reward_clip: float = 100.0

    def __post_init__(self):
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"AdvantageConfig.gamma must be in [0, 1], got {self.gamma}")
        if self.baseline not in ("whiten", "constant", "none"):
            raise ValueError(
                f"AdvantageConfig.baseline must be 'whiten', 'constant' or 'none', got {self.baseline!r}"
            )
        if self.reward_scaling <= 0:
            raise ValueError(f"AdvantageConfig.reward_scaling must be > 0, got {self.reward_scaling}")
        if self.reward_clip <= 0:
            raise ValueError(f"AdvantageConfig.reward_clip must be > 0, got {self.reward_clip}")

    @classmethod
    def paper(cls) -> "AdvantageConfig":
        """The paper's variant: γ = 1, reward-to-go from ``t+1`` (the single-step term covers
        ``r_t``), constant baseline -1 instead of whitening; length normalisation kept."""
        return cls(gamma=1.0, include_current_reward=False, baseline="constant", constant_baseline=-1.0)


@torch.no_grad()
def compute_advantages(
    rollout, cfg: AdvantageConfig | None = None, group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and rewards of a rollout batch.

    Args:
        rollout: anything with ``teacher_logprobs_raw``, ``student_logprobs`` and
            ``response_mask`` ``[B, T]`` attributes (e.g. :class:`minillm_rl.algorithm.sampler.Rollout`).
        cfg: defaults to the reference settings.
        group: process group for the whitening statistics (default: the world).

    Returns:
        ``(advantages, rewards)``, both ``[B, T]`` float32 and 0 at masked positions.
    """
    cfg = cfg or AdvantageConfig()
    mask = rollout.response_mask
    rewards = token_rewards(
        rollout.teacher_logprobs_raw, rollout.student_logprobs, mask, cfg.reward_scaling, cfg.reward_clip
    )
    returns = reward_to_go(rewards, mask, cfg.gamma, cfg.length_normalize, cfg.include_current_reward)
    if cfg.baseline == "whiten":
        advantages = whiten(returns, mask, group=group)
    elif cfg.baseline == "constant":
        advantages = torch.where(mask > 0, returns - cfg.constant_baseline, torch.zeros_like(returns))
    else:
        advantages = returns
    return advantages, rewards
